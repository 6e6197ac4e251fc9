"""The queue on a real PostgreSQL (the throwaway cluster of pgcluster.py): owners on one
database never claim the same recipient, any owner sweeps an expired lease, a commit
that fails (the connection killed under it) raises and writes nothing, concurrent
enqueues share one transaction, migrations run once under the advisory lock, every
session commits synchronously, and the password comes from RELAY_DB_PASSWORD or a passfile."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.config import parse_config
from relay.errors import StoreError
from relay.model import RecipientState
from relay.pgstore import PgStore
from relay.queue.pgspool import MIGRATIONS, PgSpool
from relay.queue.spool import NewMessage, RecipientUpdate
from tests.pg.pgcluster import PASSWORD, PgCluster
from tests.queue.test_scheduler import MSG, Clock

INFLIGHT, QUEUED = RecipientState.INFLIGHT, RecipientState.QUEUED


async def test_two_nodes_never_claim_the_same_recipient(pg_url: str) -> None:
    clock = Clock()
    async with PgStore(pg_url, PASSWORD) as s1, PgStore(pg_url, PASSWORD) as s2:
        a = await PgSpool.open(s1, clock, node_id="node-a")
        b = await PgSpool.open(s2, clock, node_id="node-b")
        assert a.owner.startswith("node-a:") and b.owner.startswith("node-b:")
        rcpts = tuple(f"r{i}@example.org" for i in range(30))
        qids = [await a.enqueue(NewMessage("a@example.com", rcpts, MSG)) for _ in range(5)]
        claims = [a.claim(q, rcpts) for q in qids] + [b.claim(q, rcpts[::-1]) for q in qids]
        results = await asyncio.gather(*claims)
        for i, qid in enumerate(qids):
            got_a, got_b = set(results[i]), set(results[len(qids) + i])
            assert not got_a & got_b and got_a | got_b == set(rcpts)
            m = await a.get(qid)
            assert m is not None
            owners = {r.address: r.lease_owner for r in m.recipients}
            assert all(owners[x] == a.owner for x in got_a)
            assert all(owners[x] == b.owner for x in got_b)
        # an outcome written by the other owner is not applied over a held lease
        [q0] = qids[:1]
        mine = results[0][0] if results[0] else results[len(qids)][0]
        holder, other = (a, b) if results[0] else (b, a)
        await other.record(q0, [RecipientUpdate(mine, RecipientState.DELIVERED, "250")])
        m = await holder.get(q0)
        assert m is not None and {r.address: r.state for r in m.recipients}[mine] is INFLIGHT


async def test_an_expired_lease_is_swept_by_the_other_node(pg_url: str) -> None:
    clock = Clock()
    async with PgStore(pg_url, PASSWORD) as s1, PgStore(pg_url, PASSWORD) as s2:
        dead = await PgSpool.open(s1, clock, node_id="dead", lease=30)
        alive = await PgSpool.open(s2, clock, node_id="alive", lease=30)
        qid = await dead.enqueue(NewMessage("a@example.com", ("b@x.org", "c@x.org"), MSG))
        assert await dead.claim(qid, ["b@x.org", "c@x.org"]) == ("b@x.org", "c@x.org")
        clock.t += 29
        assert await alive.expire_leases() == 0  # still held
        assert await alive.claim(qid, ["b@x.org"]) == ()
        clock.t += 2
        assert await alive.expire_leases() == 2
        m = await alive.get(qid)
        assert m is not None
        assert {(r.state, r.lease_owner, r.next_attempt) for r in m.recipients} == {
            (QUEUED, "", 0.0)
        }
        assert await alive.due(clock.t, 10, set()) == [qid]
        assert await alive.claim(qid, ["b@x.org", "c@x.org"]) == ("b@x.org", "c@x.org")
        # the dead node's late outcome cannot overwrite the new owner's lease
        await dead.record(qid, [RecipientUpdate("b@x.org", RecipientState.DELIVERED, "250")])
        m = await alive.get(qid)
        assert m is not None and all(r.lease_owner == alive.owner for r in m.recipients)
        removed, _ = await alive.record(
            qid,
            [
                RecipientUpdate("b@x.org", RecipientState.DELIVERED, "250"),
                RecipientUpdate("c@x.org", RecipientState.DELIVERED, "250"),
            ],
        )
        assert removed and await alive.get(qid) is None


async def test_a_commit_on_a_killed_connection_raises_and_writes_nothing(pg_url: str) -> None:
    clock = Clock()
    async with PgStore(pg_url, PASSWORD) as store:
        spool = await PgSpool.open(store, clock)
        killer = await asyncpg.connect(pg_url, password=PASSWORD)
        try:

            async def kill_writer(conn: Any) -> None:  # the server side dies before COMMIT
                pid = conn.get_server_pid()
                assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
                await asyncio.sleep(0.05)

            store.before_commit = kill_writer
            msgs = [NewMessage("a@example.com", (f"r{i}@x.org",), MSG) for i in range(3)]
            results = await asyncio.gather(
                *(spool.enqueue(m, f"LOST{i}") for i, m in enumerate(msgs)),
                return_exceptions=True,
            )
            assert all(isinstance(r, StoreError) for r in results), results
            store.before_commit = None
            assert await spool.list() == []  # nothing of the group was committed
            qid = await spool.enqueue(msgs[0])  # a fresh connection: writes work again
            assert [m.id for m in await spool.list()] == [qid]
            store.before_commit = kill_writer  # a write alone (a claim) fails the same way
            with pytest.raises(StoreError, match="commit failed"):
                await spool.claim(qid, ["r0@x.org"])
            store.before_commit = None
            [r] = (await spool.get(qid)).recipients  # type: ignore[union-attr]
            assert (r.state, r.lease_owner) == (QUEUED, "")  # the claim was not committed
        finally:
            await killer.close()


async def test_a_server_that_is_down_gives_store_errors(pg_cluster: PgCluster) -> None:
    # a stopped cluster would stop it for every other test: point at a socket dir with
    # no server instead (connection refused), as while PostgreSQL restarts
    url = f"postgresql://relay@/postgres?host={pg_cluster.root}/nowhere"
    with pytest.raises(StoreError, match="cannot open store"):
        await PgStore(url, PASSWORD, connect_timeout=2).open()


async def test_concurrent_enqueues_share_one_transaction(pg_url: str) -> None:
    async with PgStore(pg_url, PASSWORD) as store:
        spool = await PgSpool.open(store, Clock())
        commits = store.commits
        msgs = [NewMessage("a@example.com", (f"r{i}@x.org",), MSG) for i in range(20)]
        qids = await asyncio.gather(*(spool.enqueue(m) for m in msgs))
        assert len(set(qids)) == 20 and len(await spool.list()) == 20
        assert store.commits - commits < 10  # grouped (first alone, the rest together)


async def test_a_group_of_enqueues_is_one_statement_with_every_row(pg_url: str) -> None:
    """Concurrent enqueues are merged into one multi-row statement (one round trip, one
    transaction): the rows of one group share a transaction id AND a command id. Each
    message keeps its own recipients, their order and DSN parameters, its history line,
    and its wake-up (sent only for mail any node may take, not for claimed mail)."""
    async with PgStore(pg_url, PASSWORD) as store:
        spool = await PgSpool.open(store, Clock())
        woken: list[str] = []
        listener = await asyncpg.connect(pg_url, password=PASSWORD)
        await listener.add_listener("relay_queue", lambda *a: woken.append(a[3]))
        try:
            await spool.enqueue(NewMessage("w@example.com", ("w@x.org",), MSG), "WARM")
            msgs = {
                f"G{i}": NewMessage(
                    f"s{i}@example.com",
                    tuple(f"r{j}-{i}@x.org" for j in range(i % 3 + 1)),
                    MSG + f"X-N: {i}\r\n".encode(),
                    notify=tuple("SUCCESS" if j else "" for j in range(i % 3 + 1)),
                    orcpts=tuple(f"rfc822;o{j}-{i}@y.org" for j in range(i % 3 + 1)),
                    envid=f"E{i}",
                )
                for i in range(12)
            }
            await asyncio.gather(
                *(spool.enqueue(m, q, claimed=int(q[1:]) % 2 == 1) for q, m in msgs.items())
            )
            rows = await listener.fetch(
                "SELECT id, xmin::text AS x, cmin::text AS c FROM queue_messages WHERE id LIKE 'G%'"
            )
            groups: dict[str, set[str]] = {}
            for r in rows:
                groups.setdefault(r["x"], set()).add(r["c"])
            assert len(rows) == 12 and len(groups) < 12  # grouped
            assert all(len(c) == 1 for c in groups.values())  # each group: one statement
            for q, m in msgs.items():
                loaded = await spool.load(q)
                assert loaded is not None and loaded[1] == m.data
                got = loaded[0]
                assert (got.mail_from, got.envid) == (m.mail_from, m.envid)
                rcpts = got.recipients
                assert [r.address for r in rcpts] == list(m.recipients)
                assert [",".join(r.notify) for r in rcpts] == list(m.notify)
                assert [r.orcpt for r in rcpts] == list(m.orcpts)
                claimed = int(q[1:]) % 2 == 1
                assert {r.state for r in rcpts} == {
                    RecipientState.INFLIGHT if claimed else RecipientState.QUEUED
                }
                log = await spool.history(q)
                assert [e.event for e in log] == ["received"]
                assert f"from=<{m.mail_from}>" in log[0].reply
            await asyncio.sleep(0.2)
            assert sorted(w for w in woken if w.startswith("G")) == sorted(
                f"G{i}" for i in range(0, 12, 2)
            )
        finally:
            await listener.close()


async def test_one_failing_write_of_a_group_leaves_the_others(pg_url: str) -> None:
    async with PgStore(pg_url, PASSWORD) as store:
        spool = await PgSpool.open(store, Clock())
        m = NewMessage("a@example.com", ("b@x.org",), MSG)
        await spool.enqueue(m, "DUP")
        results = await asyncio.gather(
            spool.enqueue(m, "OK1"),
            spool.enqueue(m, "DUP"),
            spool.enqueue(m, "OK2"),
            return_exceptions=True,
        )
        assert results[0] == "OK1" and results[2] == "OK2"
        assert isinstance(results[1], StoreError)
        assert sorted(x.id for x in await spool.list()) == ["DUP", "OK1", "OK2"]


async def test_migrations_run_once_under_the_advisory_lock(pg_url: str) -> None:
    stores = [await PgStore(pg_url, PASSWORD).open() for _ in range(3)]
    try:
        applied = await asyncio.gather(*(s.migrate("queue", MIGRATIONS) for s in stores))
        assert sorted(applied) == [0, 0, len(MIGRATIONS)]
        assert await stores[0].schema_version("queue") == len(MIGRATIONS)
        assert await stores[1].migrate("queue", MIGRATIONS) == 0
    finally:
        for s in stores:
            await s.close()


async def test_every_session_commits_synchronously(pg_cluster: PgCluster, pg_url: str) -> None:
    db = urllib.parse.urlsplit(pg_url).path.strip("/")
    pg_cluster.psql(f"ALTER DATABASE {db} SET synchronous_commit = off")  # a careless default
    async with PgStore(pg_url, PASSWORD) as store:
        got = await store.write(lambda c: c.fetchval("SHOW synchronous_commit"))
        assert got == "on"
        assert await store.read(lambda c: c.fetchval("SHOW synchronous_commit")) == "on"


async def test_password_from_the_environment_or_the_passfile(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    passfile = tmp_path / "dbpass"
    passfile.write_text(PASSWORD + "\n")
    doc = {"storage": {"url": pg_url, "passfile": str(passfile)}}
    storage = parse_config(doc, tmp_path / "config.toml").storage
    monkeypatch.delenv("RELAY_DB_PASSWORD")
    assert storage.password() == PASSWORD  # from the passfile
    async with PgStore(storage.url, storage.password()) as store:
        assert await store.read(lambda c: c.fetchval("SELECT 1")) == 1
    monkeypatch.setenv("RELAY_DB_PASSWORD", "wrong")  # the environment wins
    with pytest.raises(StoreError) as err:
        await PgStore(storage.url, storage.password()).open()
    assert "password" in str(err.value) and "wrong" not in str(err.value)


async def test_two_owners_finishing_halves_of_a_message_at_once_delete_it(pg_url: str) -> None:
    """Each settle sees the other half's outcome: the message row lock serialises them
    (without it both saw the other half pending and the message stayed, done, forever)."""
    clock = Clock()
    async with PgStore(pg_url, PASSWORD) as s1, PgStore(pg_url, PASSWORD) as s2:
        a, b = await PgSpool.open(s1, clock), await PgSpool.open(s2, clock)
        pair = ("x@a.example", "y@b.example")
        qids = [await a.enqueue(NewMessage("s@example.com", pair, MSG)) for _ in range(40)]
        for q in qids:
            assert await a.claim(q, pair[:1]) == pair[:1]
            assert await b.claim(q, pair[1:]) == pair[1:]
        done = RecipientState.DELIVERED
        results = await asyncio.gather(
            *(a.record(q, [RecipientUpdate(pair[0], done, "250")]) for q in qids),
            *(b.record(q, [RecipientUpdate(pair[1], done, "250")]) for q in qids),
        )
        assert await a.list() == []
        assert sum(removed for removed, _ in results) == len(qids)  # each deleted once


def test_a_password_in_a_url_never_reaches_a_message() -> None:
    from relay.pgstore import safe_url

    assert safe_url("postgresql://relay:s3cret@db/relay") == "postgresql://relay:***@db/relay"
    assert safe_url("postgresql://relay@db/relay?password=s3cret&x=1") == (
        "postgresql://relay@db/relay?password=***&x=1"
    )
    assert (
        safe_url("postgresql://relay@/relay?host=/run/pg")
        == "postgresql://relay@/relay?host=/run/pg"
    )


async def test_an_open_error_hides_a_password_given_in_the_url(pg_cluster: PgCluster) -> None:
    url = f"postgresql://relay:s3cret@/postgres?host={pg_cluster.root}/nowhere"
    with pytest.raises(StoreError) as err:
        await PgStore(url, connect_timeout=2).open()
    assert "s3cret" not in str(err.value) and ":***@" in str(err.value)


async def test_mail_queued_on_one_node_wakes_the_others(pg_url: str) -> None:
    """LISTEN/NOTIFY: queued (unclaimed) mail and expired leases wake every listening node,
    once the transaction commits; claimed mail (delivered by its own node) does not."""
    clock = Clock()
    async with PgStore(pg_url, PASSWORD) as s1, PgStore(pg_url, PASSWORD) as s2:
        a = await PgSpool.open(s1, clock, lease=30)
        b = await PgSpool.open(s2, clock, lease=30)
        woken = asyncio.Event()
        stop = await b.listen(woken.set)
        try:
            msg = NewMessage("a@example.com", ("r@x.org",), MSG)
            qid = await a.enqueue(msg, claimed=True)
            await asyncio.sleep(0.3)
            assert not woken.is_set()  # in flight under a's lease: nothing for b to do
            await a.enqueue(msg)
            await asyncio.wait_for(woken.wait(), 5)
            woken.clear()
            clock.t += 31  # a died holding the first one
            assert await b.expire_leases() == 1
            await asyncio.wait_for(woken.wait(), 5)
            assert qid in await b.due(clock.t, 10, set())
        finally:
            await stop()


async def test_each_sweeper_round_is_a_heartbeat_of_its_owner(pg_url: str) -> None:
    """relay_nodes: one row per lease owner, its heartbeat renewed by the scheduler's
    maintenance round; the recipients it holds are counted; silent rows are forgotten."""
    from relay.queue.pgspool import NODE_RETENTION
    from relay.queue.scheduler import Scheduler
    from relay.queue.spool import NewMessage

    t = [1_800_000_000.0]
    async with PgStore(pg_url, PASSWORD) as store:
        a = await PgSpool.open(store, lambda: t[0], node_id="node-a")
        b = await PgSpool.open(store, lambda: t[0], node_id="node-b")
        sched = Scheduler(parse_config({}, Path("c.toml")), a, courier=None, clock=lambda: t[0])  # type: ignore[arg-type]
        await sched.maintain()
        await b.heartbeat()
        qid = await a.enqueue(
            NewMessage("x@y.test", ("r@z.test",), b"Subject: x\r\n\r\n"), claimed=True
        )
        t[0] += 10
        await sched.maintain()
        rows = {n.node_id: n for n in await a.nodes()}
        assert set(rows) == {"node-a", "node-b"} and rows["node-a"].owner == a.owner
        assert (rows["node-a"].started, rows["node-a"].heartbeat) == (t[0] - 10, t[0])
        assert (rows["node-a"].inflight, rows["node-b"].inflight) == (1, 0)
        assert await a.delete(qid)
        t[0] += NODE_RETENTION + 1
        await b.heartbeat()  # a's row is a day silent: forgotten
        assert [n.node_id for n in await b.nodes()] == ["node-b"]


async def test_the_one_read_outcome_deletes_only_what_this_owner_finished(pg_url: str) -> None:
    """Migration 5's path (every recipient of the attempt delivered, all held by the
    recorder, nothing else pending): the message deleted without updating its rows, the
    history as before; a recorder whose lease was taken over, or a message with another
    recipient pending, takes the full path and deletes nothing."""
    clock = Clock()
    done = RecipientState.DELIVERED
    async with PgStore(pg_url, PASSWORD) as s1, PgStore(pg_url, PASSWORD) as s2:
        old = await PgSpool.open(s1, clock, node_id="old", lease=30)
        new = await PgSpool.open(s2, clock, node_id="new", lease=30)
        pair = ("b@x.org", "c@x.org")
        qid = await old.enqueue(NewMessage("a@example.com", pair, MSG), claimed=True)
        clock.t += 31
        assert await new.expire_leases() == 2
        assert await new.claim(qid, pair) == pair
        # the old owner's late outcome for both: not its rows any more
        assert await old.record(qid, [RecipientUpdate(a, done, "250 ok") for a in pair]) == (
            False,
            (),
        )
        m = await new.get(qid)
        assert m is not None and {(r.state, r.lease_owner) for r in m.recipients} == {
            (INFLIGHT, new.owner)
        }
        # one recipient finished, the other still in flight: kept, that one delivered
        assert await new.record(qid, [RecipientUpdate(pair[0], done, "250 one")]) == (False, ())
        m = await new.get(qid)
        assert m is not None and [r.state for r in m.recipients] == [done, INFLIGHT]
        assert await new.record(qid, [RecipientUpdate(pair[1], done, "250 two")]) == (True, ())
        assert await new.get(qid) is None

        both = await new.enqueue(NewMessage("a@example.com", pair, MSG), claimed=True)
        updates = [RecipientUpdate(a, done, f"250 {a}", mx_host="mx.x.org") for a in pair]
        assert await new.record(both, updates) == (True, ())
        assert await new.get(both) is None
        lines = [(e.address, e.event, e.reply) for e in await new.history(both)]
        assert lines == [
            ("", "received", lines[0][2]),
            ("b@x.org", "delivered", "250 b@x.org"),
            ("c@x.org", "delivered", "250 c@x.org"),
            ("", "removed", "done"),
        ]
        assert [(e.address, e.event) for e in await new.history(qid)] == [
            ("", "received"),
            ("b@x.org", "delivered"),
            ("c@x.org", "delivered"),
            ("", "removed"),
        ]
        # and the bodies are compressed with lz4 (Debian's server has it)
        method = await s1.read(
            lambda c: c.fetchval(
                "SELECT attcompression FROM pg_attribute WHERE attname = 'data'"
                " AND attrelid = 'queue_messages'::regclass"
            )
        )
        assert method in (b"l", "l")


async def test_a_lease_runs_from_its_write_not_from_a_wait_for_the_database(pg_url: str) -> None:
    """A claimed write that waited (the group writer busy, every pooled connection in
    use) still holds its lease for the whole lease after it is written: another node's
    sweeper must not take a recipient this node is about to deliver (it would be sent
    twice). Seen on a loaded machine: intake's claimed enqueue waited 2 s behind the
    writer with a 2 s lease, the other node swept it and both delivered."""
    clock = Clock()
    msg = NewMessage("a@example.com", ("b@x.org",), MSG)
    async with PgStore(pg_url, PASSWORD, pool_size=4) as s1, PgStore(pg_url, PASSWORD) as s2:
        busy = await PgSpool.open(s1, clock, node_id="busy", lease=10)
        other = await PgSpool.open(s2, clock, node_id="other", lease=10)
        gate = asyncio.Event()

        async def slow(_conn: Any) -> None:
            await gate.wait()

        # intake: the claimed enqueue waits behind a group write that takes 30 s
        blocker = asyncio.create_task(s1.write(slow, group=True))
        await asyncio.sleep(0.1)
        enqueue = asyncio.create_task(busy.enqueue(msg, "WAITED", claimed=True))
        await asyncio.sleep(0.1)
        clock.t += 30
        gate.set()
        await blocker
        assert await enqueue == "WAITED"
        written = clock.t
        clock.t += 5
        assert await other.expire_leases() == 0
        m = await other.get("WAITED")
        assert m is not None and [r.lease_expiry for r in m.recipients] == [written + 10]

        await busy.record("WAITED", [RecipientUpdate("b@x.org", RecipientState.DELIVERED, "250")])

        # the loader: a claim waits for a pooled connection (all four in use) for 30 s
        qid = await busy.enqueue(msg, "QUEUED")
        gate.clear()
        holders = [asyncio.create_task(s1.read(slow)) for _ in range(4)]
        await asyncio.sleep(0.1)
        claim = asyncio.create_task(busy.claim(qid, ["b@x.org"]))
        await asyncio.sleep(0.1)
        clock.t += 30
        gate.set()
        await asyncio.gather(*holders)
        assert await claim == ("b@x.org",)
        written = clock.t
        clock.t += 5
        assert await other.expire_leases() == 0
        m = await other.get(qid)
        assert m is not None and [r.lease_expiry for r in m.recipients] == [written + 10]
