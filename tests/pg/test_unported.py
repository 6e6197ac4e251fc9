"""With ``[storage] url`` set, a configuration that turns on a part not ported to
PostgreSQL yet (MTA-STS cache, TLS-RPT ledger) refuses to start with one line
naming it — never silently on a local SQLite file at storage.path; the commands whose
tables are not ported refuse the same way."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.cli import main as cli_main
from relay.config import load_config
from relay.errors import StartupError

URL = "postgresql://relay@127.0.0.1:1/relay"


def config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nurl = "{URL}"\n{extra}')
    return str(path)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["serve"], "MTA-STS policy cache (set mta_sts.enabled = false); the TLS-RPT ledger"),
        (["sts", "cache"], "the tables it reads"),
    ],
)
async def test_commands_on_a_postgresql_store_refuse_in_one_line(
    tmp_path: Path, argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    capsys.readouterr()
    rc = await asyncio.to_thread(cli_main, [*argv, "--config", cfg])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "storage.url (PostgreSQL) does not hold" in err
    assert named in err
    assert not list(tmp_path.rglob("*.sqlite3"))  # no local store was created


def test_the_app_refuses_exactly_the_unported_parts(tmp_path: Path) -> None:
    from relay.app import RelayApp

    off = "[mta_sts]\nenabled = false\n[tlsrpt]\nenabled = false\n"
    with pytest.raises(StartupError, match="MTA-STS policy cache") as err:
        RelayApp(load_config(config(tmp_path)))
    assert "lists" not in str(err.value)  # none configured: not named
    with pytest.raises(StartupError, match=r"not hold the TLS-RPT ledger \(set tlsrpt"):
        RelayApp(load_config(config(tmp_path, "[mta_sts]\nenabled = false\n")))
    RelayApp(load_config(config(tmp_path, off)))  # the queue and ARC counters: ported
    lists = (
        '[lists_http]\nbase_url = "https://lists.example.org"\n'
        '[lists."dev@lists.example.org"]\nowners = ["o@example.org"]\n'
    )
    RelayApp(load_config(config(tmp_path, off + lists)))  # the lists: ported
    assert not list(tmp_path.rglob("*.sqlite3"))


async def test_queue_commands_name_an_unreachable_database_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    capsys.readouterr()
    rc = await asyncio.to_thread(cli_main, ["queue", "list", "--config", cfg])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("relay: cannot open store postgresql://relay@127.0.0.1:1/relay")
    assert not list(tmp_path.rglob("*.sqlite3"))
