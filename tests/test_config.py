"""Config loading: defaults, relative paths, and one clear line (exit 2) for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cli import main
from relay.config import load_config
from relay.errors import ConfigError


def test_shipped_config_loads() -> None:
    cfg = load_config(Path(__file__).parent.parent / "config.toml")
    assert [str(h) for h in cfg.server.listen] == ["127.0.0.1:2525"]
    assert cfg.storage.path == cfg.path.parent / "var/relay.sqlite3"
    assert cfg.aliases["info@example.org"] == ("alice@example.com", "bob@example.net")
    assert cfg.delivery.queue_lifetime == 5 * 86400
    assert cfg.arc.override_max_recipients == 50 and cfg.arc.override_per_sealer_hour == 0


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[delivery]\nport = 70000\n", "delivery.port", "1..65535"),
        ('[server]\nlisten = ["nohost:abc"]\n', "server.listen", "bad"),
        ('[server]\nmax_message_size = "big"\n', "server.max_message_size", "must be int"),
        ('[relay]\ntrusted_networks = ["10.0.0.0/33"]\n', "relay.trusted_networks", "network"),
        ('[auth]\ndmarc_reject = "bounce"\n', "auth.dmarc_reject", "one of"),
        ("[bogus]\nx = 1\n", "bogus", "unknown section"),
        ("[server]\nlistne = []\n", "server.listne", "unknown key"),
        ('[aliases]\n"info@other.org" = ["a@b.c"]\n', "aliases.info@other.org", "local_domains"),
        ('[server]\ntls_cert = "nope.pem"\ntls_key = "nope.key"\n', "server.tls_cert", "not found"),
        ("[delivery\n", "-", "not valid TOML"),
        ("[arc]\noverride_max_recipients = -1\n", "arc.override_max_recipients", ">= 0"),
        ("[arc]\noverride_window = 0\n", "arc.override_window", ">= 1"),
    ],
)
def test_config_errors_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == key and problem in exc.value.problem
    code = main(["queue", "list", "--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(path) in err[0] and key in err[0] and problem in err[0]
