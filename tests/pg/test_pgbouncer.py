"""The PostgreSQL store behind pgbouncer in transaction pooling mode (``[storage]
pgbouncer = true``): Debian's pgbouncer in front of the test cluster, fewer server
connections than client ones, so a client's transactions move between server
connections as they do in production."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import asyncpg
import pytest

from relay.errors import StoreError
from relay.model import RecipientState
from relay.pgschema import migrate_all
from relay.pgstore import PgStore
from relay.queue.pgspool import PgSpool
from relay.queue.spool import NewMessage, RecipientUpdate
from tests.pg.pgcluster import PASSWORD, PgCluster
from tests.queue.test_scheduler import MSG, Clock


def _db(url: str) -> str:
    return urllib.parse.urlsplit(url).path.strip("/")


async def _through(url: str, **kw: Any) -> PgStore:
    return await PgStore(url, PASSWORD, pool_size=4, pgbouncer=True, **kw).open()


async def test_the_queue_works_through_pgbouncer(pgb_urls: tuple[str, str]) -> None:
    """Four stores (16 client connections) over 3 server connections: group commits of
    merged inserts, claims, outcomes and reads from all at once; every message queued,
    delivered and deleted, with its history. (Without ``pgbouncer`` the pooler refuses
    the connection: it does not pass on synchronous_commit; with asyncpg's statement
    cache, statements prepared on one server connection are missing on the next.)"""
    bouncer, _direct = pgb_urls
    stores = [await _through(bouncer) for _ in range(4)]
    try:
        await migrate_all(stores[0])
        spools = [await PgSpool.open(s, Clock()) for s in stores]

        async def one(spool: PgSpool, n: int) -> str:
            msg = NewMessage("a@example.com", (f"r{n}@x.org", f"s{n}@y.org"), MSG)
            qid = await spool.enqueue(msg, claimed=True)
            assert (await spool.list()) is not None  # reads beside the writes
            await spool.record(
                qid,
                [
                    RecipientUpdate(a, RecipientState.DELIVERED, "250 ok")
                    for a in (f"r{n}@x.org", f"s{n}@y.org")
                ],
            )
            return qid

        qids = await asyncio.gather(
            *(one(spools[i % 4], i) for i in range(120)), return_exceptions=True
        )
        errors = [q for q in qids if isinstance(q, BaseException)]
        assert not errors, errors[:3]
        assert await spools[1].list() == []
        for qid in qids[:5]:
            events = [e.event for e in await spools[2].history(str(qid))]
            assert events[0] == "received" and events[-1] == "removed", events
            assert events.count("delivered") == 2
    finally:
        for s in stores:
            await s.close()


async def test_a_direct_store_is_refused_by_the_pooler(pgb_urls: tuple[str, str]) -> None:
    """Why the setting exists: a store that sets synchronous_commit per session at
    connect time cannot even connect through pgbouncer."""
    bouncer, _direct = pgb_urls
    with pytest.raises(StoreError, match="synchronous_commit"):
        await PgStore(bouncer, PASSWORD, pool_size=4).open()


async def test_synchronous_commit_off_by_default_is_refused(
    pgb_urls: tuple[str, str], pg_cluster: PgCluster
) -> None:
    """Behind pgbouncer the 250 rests on the role's or database's default: off is
    refused at open, naming the fix, before anything is accepted."""
    bouncer, _direct = pgb_urls
    pg_cluster.psql(f"ALTER DATABASE {_db(bouncer)} SET synchronous_commit = off")
    with pytest.raises(StoreError, match=r"synchronous_commit is 'off'.*ALTER ROLE"):
        await _through(bouncer)  # (the other tests open fresh databases: default on)


async def test_listen_goes_direct_or_not_at_all(pgb_urls: tuple[str, str]) -> None:
    """A LISTEN through the pooler would stay on whichever server connection ran it;
    with listen_url it has a direct connection of its own and hears another store's
    NOTIFY (sent through the pooler at commit); without one there is no LISTEN."""
    bouncer, direct = pgb_urls
    writer = await _through(bouncer)
    hearing = await _through(bouncer, listen_url=direct)
    deaf = await _through(bouncer)
    try:
        await migrate_all(writer)
        spool = await PgSpool.open(writer, Clock())
        heard: list[str] = []
        missed: list[str] = []
        stop_hearing = await hearing.listen("relay_queue", heard.append)
        stop_deaf = await deaf.listen("relay_queue", missed.append)
        direct_conns = await _count_direct(direct)
        qid = await spool.enqueue(NewMessage("a@example.com", ("b@x.org",), MSG))
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard == [qid] and missed == []
        assert direct_conns >= 1  # the listener's own connection, not the pooler's
        await stop_hearing()
        await stop_deaf()
    finally:
        for s in (writer, hearing, deaf):
            await s.close()


async def _count_direct(direct: str) -> int:
    """Connections to the server that did not come through pgbouncer and are LISTENing
    (pg_stat_activity: application_name 'relay', a LISTEN as the last query)."""
    conn = await asyncpg.connect(direct, password=PASSWORD)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'relay'"
                " AND query LIKE 'LISTEN%'"
            )
        )
    finally:
        await conn.close()
