"""With ``[storage] url`` set, a configuration that turns on a part not ported to
PostgreSQL refuses to start with one line
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


def test_a_command_reading_the_sqlite_file_refuses_in_one_line(tmp_path: Path) -> None:
    """open_existing_store is the SQLite file's opener: on storage.url it never creates or
    reads a local file (every command now opens the PostgreSQL store through open_store)."""
    from relay.commands import open_existing_store
    from relay.errors import StartupError

    with pytest.raises(StartupError, match="storage.url \\(PostgreSQL\\) does not hold"):
        open_existing_store(load_config(config(tmp_path)))
    assert not list(tmp_path.rglob("*.sqlite3"))  # no local store was created


def test_the_app_starts_with_every_part_on(tmp_path: Path) -> None:
    from relay.app import RelayApp

    # every part on: the queue, ARC counters, MTA-STS cache, TLS-RPT ledger (on by
    # default) and a list
    lists = (
        '[lists_http]\nbase_url = "https://lists.example.org"\n'
        '[lists."dev@lists.example.org"]\nowners = ["o@example.org"]\n'
    )
    RelayApp(load_config(config(tmp_path, lists)))
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
