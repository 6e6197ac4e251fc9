"""``relay db migrate --config P`` on the throwaway cluster: applies every component's
schema once (a second run applies nothing), upgrades a queue of the first schema with its
mail, and a wrong password is one line, exit 2, without the password."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.auth import replay_pg
from relay.cli import main as cli_main
from relay.pgschema import COMPONENTS
from relay.pgstore import PgStore
from relay.queue.pgspool import MIGRATIONS, PgSpool
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
    assert list(COMPONENTS) == ["queue", "arc_replay", "lists", "mtasts", "tlsrpt"]
    assert len(replay_pg.MIGRATIONS) == len(COMPONENTS["arc_replay"])
    assert capsys.readouterr().out == "".join(
        f"{name}: schema version {len(steps)} ({len(steps)} step(s) applied)\n"
        for name, steps in COMPONENTS.items()
    )
    assert await asyncio.to_thread(cli_main, ["db", "migrate", "--config", cfg]) == 0
    assert capsys.readouterr().out.count("(0 step(s) applied)") == len(COMPONENTS)
    async with PgStore(pg_url, PASSWORD) as store:
        assert await store.schema_version("queue") == len(MIGRATIONS)
        tables = await store.read(
            lambda c: c.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        )
        assert {t[0] for t in tables} >= {
            "relay_schema",
            "queue_messages",
            "queue_recipients",
            "queue_log",
            "arc_replay_seal",
            "arc_replay_sealer",
            "relay_nodes",
            "list_members",
            "list_confirms",
            "list_confirm_sent",
            "list_posts",
            "list_fanout",
            "list_held",
            "list_archive",
            "mtasts_policy",
            "mtasts_failure",
            "mtasts_meta",
            "mtasts_fetching",
            "tlsrpt_counts",
            "tlsrpt_reports",
            "tlsrpt_deliveries",
        }


async def test_a_queue_of_the_first_schema_is_upgraded_with_its_mail(pg_url: str) -> None:
    """A database migrated by the first slice (queue version 1) with mail in it: version 2
    adds the columns with their defaults, and the mail is still there and deliverable."""
    async with PgStore(pg_url, PASSWORD) as store:
        await store.migrate("queue", MIGRATIONS[:1])
        await store.write(
            lambda c: c.execute(
                "INSERT INTO queue_messages(id, mail_from, data, size, created)"
                " VALUES('OLD1', 'a@x.test', 'x'::bytea, 1, 1.0);"
                "INSERT INTO queue_recipients(qid, address, pos, state)"
                " VALUES('OLD1', 'b@y.test', 0, 'queued')"
            )
        )
        spool = await PgSpool.open(store)
        assert await store.schema_version("queue") == len(MIGRATIONS)
        m = await spool.get("OLD1")
        assert m is not None and not m.held and m.env_from is None and m.ret == ""
        assert [(r.address, r.notify, r.relayed_owed) for r in m.recipients] == [
            ("b@y.test", (), False)
        ]
        assert await spool.claim("OLD1", ["b@y.test"]) == ("b@y.test",)


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
