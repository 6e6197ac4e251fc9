"""The lists on PostgreSQL: a post with list and other recipients is one transaction with
the queue's enqueue (killed before COMMIT: neither is there; committed: both, in one
commit), and the changes two nodes may make at once find one winner (a held post
approved by two nodes, a confirm token spent twice, two fan-outs of one post: one copy
per member and the post row gone)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.config import Config, parse_config
from relay.errors import StoreError
from relay.lists import members as db
from relay.lists.service import ListService
from relay.lists.stage import ListsStage
from relay.model import Envelope
from relay.pgschema import migrate_all
from relay.pgstore import PgStore
from relay.queue.pgspool import PgSpool
from relay.queue.spool import NewMessage
from tests.pg.pgcluster import PASSWORD

LIST = "dev@lists.example.org"
POST = (
    f"From: Alice <alice@author.test>\r\nTo: {LIST}, bob@else.test\r\nSubject: plan\r\n"
    "Message-ID: <plan@author.test>\r\n\r\nbody\r\n"
).encode()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse_config(
        {
            "storage": {"path": str(tmp_path / "unused.sqlite3")},
            "lists": {LIST: {"owners": ["owner@example.org"], "posting": "anyone"}},
            "lists_http": {"base_url": "https://lists.example.org"},
            "arc": {"enabled": False},
        },
        tmp_path / "config.toml",
    )


async def _count(store: PgStore, table: str) -> int:
    return int(await store.read(lambda c: c.fetchval(f"SELECT count(*) FROM {table}")))


async def test_a_post_with_other_recipients_is_one_transaction_with_the_enqueue(
    pg_url: str, config: Config
) -> None:
    async with PgStore(pg_url, PASSWORD) as store:
        await migrate_all(store)
        svc = ListService(config, store)
        await svc.store.write(lambda c: db.add_member(c, LIST, "m1@one.test", 1.0))
        spool = PgSpool(store)
        stage = ListsStage(svc)
        svc.start_fan_out = lambda post_id: None  # the post's rows alone are looked at
        env = Envelope("alice@author.test", (LIST, "bob@else.test"))
        rest, pending = await stage.prepare(env, POST, "Q1")
        assert rest is not None and rest.rcpt_tos == ("bob@else.test",) and pending is not None
        new = NewMessage(rest.mail_from, rest.rcpt_tos, POST)
        killer = await asyncpg.connect(pg_url, password=PASSWORD)
        try:

            async def kill_writer(conn: Any) -> None:  # the server side dies before COMMIT
                assert await killer.fetchval(
                    "SELECT pg_terminate_backend($1)", conn.get_server_pid()
                )
                await asyncio.sleep(0.05)

            store.before_commit = kill_writer
            with pytest.raises(StoreError, match="commit failed"):
                await spool.enqueue(new, "Q1", also=pending.run)
            store.before_commit = None
        finally:
            await killer.close()
        for table in ("queue_messages", "list_posts", "list_fanout", "list_archive"):
            assert await _count(store, table) == 0, table  # neither half was committed
        commits = store.commits
        await spool.enqueue(new, "Q1", also=pending.run)
        pending.done()
        assert store.commits == commits + 1  # the message and the post: one commit
        assert [m.id for m in await spool.list()] == ["Q1"]
        assert await svc.store.read(lambda c: db.fanout_todo(c, "Q1", 10)) != []
        with pytest.raises(StoreError, match="async callable"):  # the SQLite form is refused
            await spool.enqueue(new, "Q2", also=lambda conn: None)
        assert await spool.get("Q2") is None


async def test_two_nodes_racing_on_one_held_post_token_and_fan_out_find_one_winner(
    pg_url: str, config: Config
) -> None:
    async with PgStore(pg_url, PASSWORD) as a, PgStore(pg_url, PASSWORD) as b:
        await migrate_all(a)
        node_a, node_b = ListService(config, a), ListService(config, b)
        members = [f"m{i:03d}@one.test" for i in range(120)]

        async def add_all(c: Any) -> None:
            for m in members:
                await db.add_member(c, LIST, m, 1.0)

        await node_a.store.write(add_all)
        # a held post approved on both nodes at once: one approval, one fan-out's copies
        await node_a.store.write(
            lambda c: db.hold(c, "h1", LIST, "x@y.test", "x@y.test", "s", "r", POST, 1.0)
        )
        node_a.start_fan_out = node_b.start_fan_out = lambda post_id: None
        won = await asyncio.gather(node_a.approve(LIST, "h1"), node_b.approve(LIST, "h1"))
        assert sorted(won) == [False, True]
        # both nodes fan the post out at once (a resume on each): one copy per member
        counts = await asyncio.gather(node_a.fan_out("h1"), node_b.fan_out("h1"))
        assert sum(counts) == len(members)
        rows = await a.read(
            lambda c: c.fetch("SELECT r.address FROM queue_recipients r ORDER BY 1")
        )
        assert [r[0] for r in rows] == members  # each member once
        assert await _count(a, "list_posts") == 0  # the last batch's commit removed it
        # a confirm token spent on both nodes at once: one subscription
        token = await node_a.store.write(lambda c: db.new_confirm(c, LIST, "n@two.test", 1.0))
        got = await asyncio.gather(
            node_a.store.write(lambda c: db.take_confirm(c, token, 0.0, 2.0)),
            node_b.store.write(lambda c: db.take_confirm(c, token, 0.0, 2.0)),
        )
        assert sorted(m is not None for m in got) == [False, True]
        # one confirmation per address per interval, asked on both nodes at once
        asked = await asyncio.gather(
            node_a.store.write(lambda c: db.confirm_allowed(c, LIST, "q@two.test", 5.0, 3600)),
            node_b.store.write(lambda c: db.confirm_allowed(c, LIST, "q@two.test", 5.0, 3600)),
        )
        assert sorted(asked) == [False, True]
        # the same new member added on both nodes at once: added once, no error
        added = await asyncio.gather(
            node_a.store.write(lambda c: db.add_member(c, LIST, "z@two.test", 1.0)),
            node_b.store.write(lambda c: db.add_member(c, LIST, "z@two.test", 1.0)),
        )
        assert sorted(added) == [False, True]
