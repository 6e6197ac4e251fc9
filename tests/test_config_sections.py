"""Config: the listen port is required, `delivery.tls_required_no`, the SRS secret file,
and one reader per section."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import relay.config as config_module
from relay.cli import main
from relay.config import load_config
from relay.errors import ConfigError


def _load(tmp_path: Path, text: str) -> config_module.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("addr", ["127.0.0.1", "[::1]", "localhost"])
def test_listen_without_a_port_is_a_config_error(
    tmp_path: Path, addr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["{addr}"]\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == "server.listen" and "needs a port" in exc.value.problem
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "server.listen" in err[0] and "needs a port" in err[0]


def test_listen_with_ports_still_parses(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[server]\nlisten = ["127.0.0.1:2525", "[::1]:25", "localhost:0"]\n')
    assert [(h.host, h.port) for h in cfg.server.listen] == [
        ("127.0.0.1", 2525),
        ("::1", 25),
        ("localhost", 0),
    ]


@pytest.mark.parametrize("value", ["trusted", "all", "never"])
def test_tls_required_no_choices(tmp_path: Path, value: str) -> None:
    cfg = _load(tmp_path, f'[delivery]\ntls_required_no = "{value}"\n')
    assert cfg.delivery.tls_required_no == value


def test_tls_required_no_default_and_bad_value(tmp_path: Path) -> None:
    assert _load(tmp_path, "").delivery.tls_required_no == "trusted"
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, '[delivery]\ntls_required_no = "yes"\n')
    assert exc.value.key == "delivery.tls_required_no" and "one of" in exc.value.problem


def test_srs_secret_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "srs.secret").write_text("  r4nd0m-s3cret\n")
    cfg = _load(tmp_path, '[srs]\ndomain = "fwd.test"\nsecret_file = "var/srs.secret"\n')
    assert cfg.srs.secret == "r4nd0m-s3cret"
    assert cfg.srs.secret_file == tmp_path / "var" / "srs.secret"


def test_srs_secret_and_secret_file_together_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, '[srs]\nsecret = "x"\nsecret_file = "s"\n')
    assert exc.value.key == "srs.secret_file"


def test_missing_srs_secret_file_is_refused_at_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[srs]\ndomain = "fwd.test"\nsecret_file = "var/srs.secret"\n[arc]\nenabled = false\n'
        "[tlsrpt]\nenabled = false\n"
    )
    assert load_config(path).srs.secret == ""  # other commands still read the config
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "srs.secret_file" in err[0] and "srs.secret" in err[0]


def test_shipped_config_secret_is_refused_at_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[srs]\ndomain = "fwd.test"\nsecret = "change-me"\n[arc]\nenabled = false\n'
        "[tlsrpt]\nenabled = false\n"
    )
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "srs.secret" in err[0] and "shipped" in err[0]


def test_one_reader_per_section() -> None:
    for name in config_module._KNOWN:
        reader = getattr(config_module, f"read_{name.replace('.', '_')}")
        assert callable(reader)
        assert len(inspect.getsource(reader).splitlines()) <= 60, name
    assert len(inspect.getsource(config_module.parse_config).splitlines()) <= 40
