"""With ``[storage] url`` set, a configuration that turns on a part not ported to
PostgreSQL yet (lists) refuses to start with one line
naming it — never silently on a local SQLite file at storage.path; the commands whose
tables are not ported refuse the same way."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.cli import main as cli_main
from relay.config import load_config

URL = "postgresql://relay@127.0.0.1:1/relay"


def config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nurl = "{URL}"\n{extra}')
    return str(path)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["list", "members", "x@y.test"], "lists"),
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

    # the queue, ARC counters, MTA-STS cache and TLS-RPT ledger (on by default): ported
    RelayApp(load_config(config(tmp_path)))
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
