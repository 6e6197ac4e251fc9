"""``relay db migrate --config P`` on the throwaway cluster: applies the queue's schema
once (a second run applies nothing), and a wrong password is one line, exit 2, without
the password."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.cli import main as cli_main
from relay.pgstore import PgStore
from relay.queue.pgspool import MIGRATIONS
from tests.pg.pgcluster import PASSWORD


def config(tmp_path: Path, url: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n')
    return str(path)


async def test_db_migrate_applies_the_schema_once(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, pg_url)
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["db", "migrate", "--config", cfg]) == 0
    n = len(MIGRATIONS)
    assert capsys.readouterr().out == f"queue: schema version {n} ({n} step(s) applied)\n"
    assert await asyncio.to_thread(cli_main, ["db", "migrate", "--config", cfg]) == 0
    assert "(0 step(s) applied)" in capsys.readouterr().out
    async with PgStore(pg_url, PASSWORD) as store:
        assert await store.schema_version("queue") == len(MIGRATIONS)
        tables = await store.read(
            lambda c: c.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        )
        assert {t[0] for t in tables} == {
            "relay_schema",
            "queue_messages",
            "queue_recipients",
            "queue_log",
        }


async def test_db_migrate_with_a_wrong_password_is_one_line(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_DB_PASSWORD", "not-the-password")
    capsys.readouterr()
    rc = await asyncio.to_thread(cli_main, ["db", "migrate", "--config", config(tmp_path, pg_url)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("relay: db migrate: cannot open store")
    assert err.count("\n") == 1, err
    assert "not-the-password" not in err and PASSWORD not in err
