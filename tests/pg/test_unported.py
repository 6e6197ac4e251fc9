"""With ``[storage] url`` set, the parts not ported to PostgreSQL refuse to start with one
line naming what is missing — never silently on a local SQLite file at storage.path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.cli import main as cli_main
from relay.config import load_config
from relay.errors import StartupError


def config(tmp_path: Path) -> str:
    path = tmp_path / "config.toml"
    path.write_text('[storage]\nurl = "postgresql://relay@127.0.0.1:1/relay"\n')
    return str(path)


@pytest.mark.parametrize(
    "argv", [["serve"], ["queue", "list"], ["queue", "flush"], ["list", "members", "x@y.test"]]
)
async def test_commands_on_a_postgresql_store_refuse_in_one_line(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    capsys.readouterr()
    rc = await asyncio.to_thread(cli_main, [*argv, "--config", cfg])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "not ported yet" in err and "TLS-RPT ledger" in err
    assert not list(tmp_path.rglob("*.sqlite3"))  # no local store was created


def test_the_app_refuses_a_postgresql_store(tmp_path: Path) -> None:
    from relay.app import RelayApp

    with pytest.raises(StartupError, match="MTA-STS policy cache"):
        RelayApp(load_config(config(tmp_path)))
    assert not list(tmp_path.rglob("*.sqlite3"))
