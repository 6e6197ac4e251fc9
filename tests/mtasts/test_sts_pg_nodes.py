"""The MTA-STS policy cache on PostgreSQL shared by two nodes (two managers, each with its
own connection pool, on one database): one policy fetch per change or refresh, one
refresher run per round, and fail-closed reads when the database cannot be reached. Real
lab DNS, a real HTTPS policy host (tests/mtasts/conftest.py)."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator

import pytest

from relay.model import StsMode, TlsResultType
from relay.mtasts.cache import CacheUnavailable
from relay.mtasts.refresher import LAST_RUN_KEY
from relay.pgstore import PgStore
from tests.mtasts.conftest import StsLab, new_pg_store
from tests.mtasts.sts_https_server import Answer
from tests.pg.pgcluster import PgCluster


def policy(mode: str = "enforce", max_age: int = 86400) -> str:
    return f"version: STSv1\nmode: {mode}\nmx: mx.example.com\nmax_age: {max_age}\n"


@pytest.fixture
async def nodes(pg_url: str) -> AsyncIterator[tuple[PgStore, PgStore]]:
    a, b = await new_pg_store(pg_url), await new_pg_store(pg_url)
    yield a, b
    await a.close()
    await b.close()


async def test_two_nodes_fetch_a_new_policy_once(
    lab: StsLab, nodes: tuple[PgStore, PgStore]
) -> None:
    lab.publish("example.com", None, "v1", answer=Answer(200, policy().encode(), delay=0.4))
    ma, mb = lab.manager(nodes[0]), lab.manager(nodes[1])
    results = await asyncio.gather(*(m.get_policy("example.com") for m in (ma, mb, ma, mb, ma, mb)))
    assert all(r.enforce and r.policy_id == "v1" for r in results)
    assert lab.fetches("example.com") == 1
    assert ma.counters.fetches + mb.counters.fetches == 1
    assert ma.counters.shared_fetches + mb.counters.shared_fetches == 1

    # a new id: again one fetch between the two nodes, and both apply the new policy
    lab.publish(
        "example.com", None, "v2", answer=Answer(200, policy("testing").encode(), delay=0.4)
    )
    pa, pb = await asyncio.gather(ma.get_policy("example.com"), mb.get_policy("example.com"))
    assert (pa.mode, pa.policy_id) == (pb.mode, pb.policy_id) == (StsMode.TESTING, "v2")
    assert lab.fetches("example.com") == 2


async def test_a_failed_fetch_is_shared_and_backed_off_on_both_nodes(
    lab: StsLab, nodes: tuple[PgStore, PgStore]
) -> None:
    lab.publish("example.com", None, "v1", answer=Answer(404, b"", delay=0.3))
    ma, mb = lab.manager(nodes[0]), lab.manager(nodes[1])
    pa, pb = await asyncio.gather(ma.get_policy("example.com"), mb.get_policy("example.com"))
    for p in (pa, pb):
        assert (p.mode, p.fetch_error) == (None, TlsResultType.STS_POLICY_FETCH_ERROR)
    assert lab.fetches("example.com") == 1
    await mb.get_policy("example.com")  # node B backs off on node A's failure
    assert lab.fetches("example.com") == 1


async def test_a_dead_holders_lease_expires_and_the_other_node_fetches(
    lab: StsLab, nodes: tuple[PgStore, PgStore]
) -> None:
    lab.publish("example.com", policy(), "v1")
    ma = lab.manager(nodes[0])
    # a node that took the lease and died: its lease runs until now + 1 s
    assert await ma.cache.claim_fetch("example.com", "dead:1:x", lab.clock.now, lab.clock.now + 1)
    mb = lab.manager(nodes[1])
    task = asyncio.create_task(mb.get_policy("example.com"))
    await asyncio.sleep(0.3)
    assert not task.done()  # waiting for the holder
    lab.clock.advance(2)
    assert (await asyncio.wait_for(task, 5)).enforce
    assert lab.fetches("example.com") == 1 and mb.counters.fetches == 1


async def test_two_nodes_refresh_once_per_round(
    lab: StsLab, nodes: tuple[PgStore, PgStore]
) -> None:
    for d in ("a.example", "b.example"):
        lab.publish(d, policy(max_age=7200), "v1")
    ma, mb = (lab.manager(s, refresh_interval=1800) for s in nodes)
    for d in ("a.example", "b.example"):
        await ma.get_policy(d)
    await ma.cache.set_meta(LAST_RUN_KEY, repr(lab.clock.now))
    lab.clock.advance(3600)  # due; b.example has a new id
    lab.publish("b.example", policy("testing"), "v2")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(m.run_refresher(stop)) for m in (ma, mb)]
    await asyncio.sleep(0.6)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert ma.refresher.runs + mb.refresher.runs == 1
    assert lab.fetches("b.example") == 2 and lab.fetches("a.example") == 1
    b = await mb.cache.get("b.example")
    assert b is not None and b.policy_id == "v2"
    assert float(await mb.cache.get_meta(LAST_RUN_KEY) or 0) == lab.clock.now


def _db(url: str) -> str:
    return urllib.parse.urlsplit(url).path.lstrip("/")


def _cut(cluster: PgCluster, db: str, gone: str) -> None:
    """Make the database unreachable: its connections killed, then renamed away (the
    relay's reconnects fail: database does not exist)."""
    for _ in range(50):
        cluster.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname='{db}'")
        try:
            cluster.psql(f"ALTER DATABASE {db} RENAME TO {gone}")
            return
        except RuntimeError:
            time.sleep(0.1)  # a backend still exiting
    raise AssertionError("could not take the database away")


async def test_an_unreachable_database_fails_closed(
    lab: StsLab, pg_cluster: PgCluster, pg_url: str
) -> None:
    """RFC 8461 section 5 on PostgreSQL: the cache read fails (connection cut, database
    gone): never "no policy" — CacheUnavailable (delivery answers 4.7.0), unless a policy
    is fetched now; once the database is back, the cached enforce policy applies."""
    store = await new_pg_store(pg_url)
    try:
        lab.publish("example.com", policy(), "v1")
        m = lab.manager(store)
        assert (await m.get_policy("example.com")).enforce  # cached in PostgreSQL
        lab.publish("example.com", None, "v1", answer=Answer(503, b"down"))  # host blocked
        db = _db(pg_url)
        _cut(pg_cluster, db, db + "_gone")
        try:
            with pytest.raises(CacheUnavailable) as exc:
                await m.get_policy("example.com")
            assert "policy fetch failed" in exc.value.reason
            assert any(w in exc.value.reason for w in ("does not exist", "connection was closed"))
            lab.zone.remove("_mta-sts.example.com")  # the record hidden: still closed
            with pytest.raises(CacheUnavailable) as exc:
                await m.get_policy("example.com")
            assert "TXT none" in exc.value.reason
            assert m.counters.cache_unavailable >= 2
        finally:
            pg_cluster.psql(f"ALTER DATABASE {db}_gone RENAME TO {db}")
        pol = await m.get_policy("example.com")  # back: the cached policy (TXT still hidden)
        assert (pol.enforce, pol.policy_id) == (True, "v1")
    finally:
        await store.close()
