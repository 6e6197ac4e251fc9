"""Leases on claimed recipients (fake clock, real store): expiry returns a row to the queue,
renewal keeps it, two owners on one store never both claim a recipient, and a lost outcome
write or a lost notify no longer strands a row until a restart."""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relay.config import parse_config
from relay.model import AttemptResult, DeliveryJob, RecipientResult, RecipientState
from relay.queue.base import QueueSpool
from relay.queue.scheduler import Scheduler
from relay.queue.spool import MIGRATIONS, NewMessage, RecipientUpdate, Spool
from relay.store import Store
from tests.pg.backends import QueueBackend
from tests.queue.test_scheduler import MSG, Clock, Harness

INFLIGHT, QUEUED = RecipientState.INFLIGHT, RecipientState.QUEUED


class CountingCourier:
    """Delivers everything after ``delay`` seconds, counting each recipient it was given."""

    def __init__(self, delay: float = 0.0, state: RecipientState = RecipientState.DELIVERED):
        self.delay = delay
        self.state = state
        self.count: collections.Counter[str] = collections.Counter()
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def deliver(self, job: DeliveryJob) -> AttemptResult:
        self.count.update(job.recipients)
        self.started.set()
        await self.release.wait()
        await asyncio.sleep(self.delay)
        return AttemptResult(
            domain=job.domain,
            recipients=tuple(RecipientResult(a, self.state, "250 ok") for a in job.recipients),
        )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "q.sqlite3").open()
    yield s
    s.close()


async def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def scheduler(
    tmp: Path, spool: QueueSpool, courier: object, clock: Clock, **kw: object
) -> Scheduler:
    config = parse_config({"delivery": {"retry_jitter": 0.0}}, tmp / "config.toml")
    return Scheduler(
        config,
        spool,
        courier,
        clock=clock,
        poll_interval=0.02,
        **kw,  # type: ignore[arg-type]
    )


async def test_claim_takes_a_lease_and_its_expiry_returns_the_row(
    queue_backend: QueueBackend,
) -> None:
    clock = Clock()
    spool = await queue_backend.spool(clock, lease=30)
    qid = await spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
    assert await spool.claim(qid, ["b@example.org"]) == ("b@example.org",)
    [r] = (await spool.get(qid)).recipients  # type: ignore[union-attr]
    assert r.state is INFLIGHT and r.lease_owner == spool.owner
    assert r.lease_expiry == clock.t + 30
    assert await spool.claim(qid, ["b@example.org"]) == ()  # not twice
    clock.t += 29
    assert await spool.expire_leases() == 0
    assert await spool.due(clock.t, 10, set()) == []
    clock.t += 2
    assert await spool.expire_leases() == 1
    [r] = (await spool.get(qid)).recipients  # type: ignore[union-attr]
    assert (r.state, r.lease_owner, r.lease_expiry, r.next_attempt) == (QUEUED, "", 0.0, 0.0)
    assert await spool.due(clock.t, 10, set()) == [qid]  # due now


async def test_a_running_attempt_renews_its_lease(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    clock = Clock()
    spool = await queue_backend.spool(clock)
    courier = CountingCourier()
    courier.release.clear()
    sched = scheduler(tmp_path, spool, courier, clock, lease=30)
    assert sched.sweep_interval == 10
    task = asyncio.create_task(sched.run())
    qid = await spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
    sched.wake()
    await asyncio.wait_for(courier.started.wait(), 5)
    other = await queue_backend.spool(clock)  # another owner sweeping the same store
    try:
        for _ in range(6):  # 60 s of a stalled attempt: twice the lease
            clock.t += 10
            async with asyncio.timeout(5):  # the maintenance task renews (every 10 s)
                while (await spool.get(qid)).recipients[0].lease_expiry < clock.t + 30:  # type: ignore[union-attr]
                    await asyncio.sleep(0.01)
            assert await other.expire_leases() == 0
        [r] = (await spool.get(qid)).recipients  # type: ignore[union-attr]
        assert r.state is INFLIGHT and r.lease_owner == spool.owner
        assert r.lease_expiry > clock.t
        courier.release.set()
        await until(lambda: sched.active == 0)
        assert await spool.get(qid) is None and courier.count["b@example.org"] == 1
    finally:
        await sched.stop()
        task.cancel()


async def test_two_owners_on_one_store_never_claim_the_same_recipient(
    queue_backend: QueueBackend,
) -> None:
    clock = Clock()
    a = await queue_backend.spool(clock)
    b = await queue_backend.spool(clock)
    assert a.owner != b.owner
    rcpts = tuple(f"r{i}@example.org" for i in range(20))
    qid = await a.enqueue(NewMessage("a@example.com", rcpts, MSG))
    got_a, got_b = await asyncio.gather(a.claim(qid, rcpts), b.claim(qid, rcpts[::-1]))
    assert not set(got_a) & set(got_b) and set(got_a) | set(got_b) == set(rcpts)
    # neither can write an outcome over the other's lease
    for mine, other in ((got_a, b), (got_b, a)):
        if mine:
            await other.record(qid, [RecipientUpdate(mine[0], RecipientState.DELIVERED, "")])
            m = await a.get(qid)
            assert m is not None
            assert {r.address: r.state for r in m.recipients}[mine[0]] is INFLIGHT


async def test_two_schedulers_on_one_store_deliver_each_recipient_once(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    clock = Clock()
    courier = CountingCourier(delay=0.01)
    spools = [await queue_backend.spool(clock), await queue_backend.spool(clock)]
    scheds = [scheduler(tmp_path, s, courier, clock, lease=60) for s in spools]
    rcpts = []
    for i in range(30):
        mine = (f"r{i}@a.example", f"r{i}@b.example")
        rcpts += mine
        await spools[0].enqueue(NewMessage("a@example.com", mine, MSG))
    tasks = [asyncio.create_task(s.run()) for s in scheds]
    try:
        await until(lambda: sum(courier.count.values()) >= len(rcpts), 10)
        for _ in range(8):  # both sweep while attempts run: a claim is never taken twice
            clock.t += 5
            await asyncio.sleep(0.05)
        await until(lambda: all(s.active == 0 for s in scheds))
        assert await spools[0].list() == []
        assert set(courier.count) == set(rcpts) and max(courier.count.values()) == 1
    finally:
        for s, t in zip(scheds, tasks, strict=True):
            await s.stop()
            t.cancel()


async def test_lost_outcome_write_expires_and_the_recipient_is_retried(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    spool = await queue_backend.spool(Clock())
    h = Harness(tmp_path, {"b@example.org": ["tmp", "ok"]}, {"lease": 30}, spool=spool)
    fired = []

    def fail_once() -> bool:
        if h.courier.jobs and not fired:
            fired.append(True)
            return True  # the write of the first attempt's outcome
        return False

    h.store.fail_writes = fail_once
    task = asyncio.create_task(h.sched.run())
    try:
        qid = await h.spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
        h.sched.wake()
        await h.settle()
        assert fired and len(h.courier.jobs) == 1
        [r] = (await h.spool.get(qid)).recipients  # type: ignore[union-attr]
        assert r.state is INFLIGHT and r.attempts == 0  # the outcome was lost
        h.clock.t += 29
        await asyncio.sleep(0.1)
        assert len(h.courier.jobs) == 1  # the lease still holds
        h.clock.t += 12  # past the lease and the next sweep (every lease / 3)
        await until(lambda: len(h.courier.jobs) == 2)  # swept, loaded, tried: no restart
        await h.settle()
        assert await h.spool.get(qid) is None
    finally:
        await h.sched.stop()
        task.cancel()
        h.close()


async def test_claimed_mail_whose_notify_was_lost_is_delivered_after_the_lease(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    spool = await queue_backend.spool(Clock())
    h = Harness(tmp_path, {"b@example.org": ["ok"]}, {"lease": 30}, spool=spool)
    task = asyncio.create_task(h.sched.run())
    try:
        assert h.sched.reserve()
        new = NewMessage("a@example.com", ("b@example.org",), MSG)
        qid = await h.spool.enqueue(new, claimed=True)
        h.sched.release()  # intake's notify never reached submit_new
        h.sched.wake()
        await asyncio.sleep(0.1)
        assert h.courier.jobs == []  # in flight under our lease: the loader leaves it
        h.clock.t += 31
        await until(lambda: len(h.courier.jobs) == 1)
        await h.settle()
        assert await h.spool.get(qid) is None
    finally:
        await h.sched.stop()
        task.cancel()
        h.close()


async def test_stop_gives_back_the_leases_of_cancelled_attempts(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    clock = Clock()
    spool = await queue_backend.spool(clock)
    courier = CountingCourier()
    courier.release.clear()
    sched = scheduler(tmp_path, spool, courier, clock)
    task = asyncio.create_task(sched.run())
    qid = await spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
    sched.wake()
    await asyncio.wait_for(courier.started.wait(), 5)
    await sched.stop(grace=0.05)
    task.cancel()
    [r] = (await spool.get(qid)).recipients  # type: ignore[union-attr]
    assert (r.state, r.lease_owner) == (QUEUED, "")
    assert await spool.due(clock.t, 10, set()) == [qid]


async def test_recovery_at_start_expires_every_other_owner(store: Store) -> None:
    clock = Clock()
    old = Spool(store, clock)
    qid = await old.enqueue(NewMessage("a@example.com", ("b@x.org", "c@x.org"), MSG), claimed=True)
    fresh = Spool(store, clock)  # the next start: another owner
    assert fresh.recover_sync() == 2
    m = await fresh.get(qid)
    assert m is not None and {(r.state, r.lease_owner) for r in m.recipients} == {(QUEUED, "")}


def test_an_old_store_is_upgraded_and_its_inflight_rows_recovered(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    store = Store(path).open()
    store.migrate("queue", MIGRATIONS[:1])  # the schema before leases
    store.write_sync(
        lambda c: (
            c.execute(
                "INSERT INTO queue_messages(id, mail_from, data, size, created)"
                " VALUES('Q1', 'a@x', ?, ?, 1)",
                (MSG, len(MSG)),
            ),
            c.execute(
                "INSERT INTO queue_recipients(qid, address, state) VALUES('Q1', 'b@y', 'inflight')"
            ),
        )
    )
    store.close()
    store = Store(path).open()
    try:
        spool = Spool(store)
        version = store.read_sync(
            lambda c: c.execute(
                "SELECT version FROM schema_version WHERE component='queue'"
            ).fetchone()[0]
        )
        assert version == len(MIGRATIONS)
        assert spool.recover_sync() == 1
        conn = sqlite3.connect(path)
        assert conn.execute(
            "SELECT state, lease_owner, lease_expiry FROM queue_recipients"
        ).fetchall() == [("queued", "", 0.0)]
        conn.close()
    finally:
        store.close()


async def test_queue_list_json_keeps_its_keys_and_shows_the_states(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.cli import main as cli_main
    from tests.labutil import base_doc, write_config

    doc = base_doc(tmp_path, "127.0.0.1", 25)
    write_config(tmp_path / "config.toml", doc)
    store = Store(doc["storage"]["path"]).open()
    try:
        spool = Spool(store)
        qid = await spool.enqueue(NewMessage("a@x.test", ("b@y.test", "c@y.test"), MSG))
        await spool.claim(qid, ["b@y.test", "c@y.test"])
        await spool.record(qid, [RecipientUpdate("c@y.test", RecipientState.FAILED, "550")])
    finally:
        store.close()
    capsys.readouterr()
    rc = await asyncio.to_thread(
        cli_main, ["queue", "list", "--json", "--config", str(tmp_path / "config.toml")]
    )
    assert rc == 0
    [m] = json.loads(capsys.readouterr().out)
    assert set(m) == {"id", "mail_from", "size", "message_id", "created", "recipients"}
    assert [(r["address"], r["state"]) for r in m["recipients"]] == [
        ("b@y.test", "inflight"),
        ("c@y.test", "failed"),
    ]
    assert set(m["recipients"][0]) == {
        "address",
        "state",
        "attempts",
        "next_attempt",
        "last_reply",
        "lease_owner",
        "lease_expiry",
        "dsn_owed",
    }
    assert m["recipients"][1]["dsn_owed"] is True


async def test_a_lease_runs_from_its_write_not_from_a_wait_for_the_writer(store: Store) -> None:
    """The SQLite writer busy (a slow fsync) while intake's claimed enqueue and a claim
    wait for it: each lease runs its whole length from the write, so another worker's
    sweeper does not take what this one is about to deliver (tests/pg/test_pgspool.py
    has the same for PostgreSQL)."""
    import threading

    clock = Clock()
    busy = Spool(store, clock, lease=10)
    other = Spool(store, clock, lease=10)
    msg = NewMessage("a@example.com", ("b@x.org",), MSG)
    qid = await busy.enqueue(msg, "QUEUED")
    gate = threading.Event()
    blocker = asyncio.create_task(store.write(lambda _conn: gate.wait(5)))
    await asyncio.sleep(0.05)
    enqueue = asyncio.create_task(busy.enqueue(msg, "WAITED", claimed=True))
    claim = asyncio.create_task(busy.claim(qid, ["b@x.org"]))
    await asyncio.sleep(0.05)
    clock.t += 30
    gate.set()
    await blocker
    assert await enqueue == "WAITED" and await claim == ("b@x.org",)
    written = clock.t
    clock.t += 5
    assert await other.expire_leases() == 0
    for q in ("WAITED", qid):
        m = await other.get(q)
        assert m is not None and [r.lease_expiry for r in m.recipients] == [written + 10]


async def test_claim_due_leases_the_due_recipients_once_of_two_owners(
    queue_backend: QueueBackend,
) -> None:
    """The loader's claim: every due recipient of the message, to one owner only; none
    of a recipient not yet due, none of a held or corrupt message."""
    clock = Clock()
    a = await queue_backend.spool(clock)
    b = await queue_backend.spool(clock)
    rcpts = tuple(f"r{i}@example.org" for i in range(10))
    qid = await a.enqueue(NewMessage("a@example.com", rcpts, MSG))
    assert await a.claim(qid, [rcpts[0]]) == (rcpts[0],)  # deferred for an hour
    later = RecipientUpdate(rcpts[0], RecipientState.DEFERRED, "451 later", clock.t + 3600)
    await a.record(qid, [later])
    got_a, got_b = await asyncio.gather(a.claim_due(qid), b.claim_due(qid))
    assert not set(got_a) & set(got_b) and set(got_a) | set(got_b) == set(rcpts[1:])
    m = await a.get(qid)
    assert m is not None
    owners = {r.address: r.lease_owner for r in m.recipients}
    assert all(owners[x] == a.owner for x in got_a) and all(owners[x] == b.owner for x in got_b)
    assert await a.claim_due(qid) == ()  # nothing due left
    held = await a.enqueue(NewMessage("a@example.com", ("h@example.org",), MSG))
    assert await a.hold([held]) == [held]
    assert await b.claim_due(held) == ()
    bad = await a.enqueue(NewMessage("a@example.com", ("c@example.org",), MSG))
    await a.mark_corrupt(bad)
    assert await b.claim_due(bad) == ()


async def test_two_loaders_read_each_message_once(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    """Two schedulers loading from one store (worker processes, nodes) pick the same due
    messages; each message is read (and delivered) by the one whose claim won, the other
    spends only the claim."""
    clock = Clock()
    courier = CountingCourier(delay=0.005)
    spools = [await queue_backend.spool(clock), await queue_backend.spool(clock)]
    reads: collections.Counter[str] = collections.Counter()
    for s in spools:
        plain = s.load

        async def load(qid: str, plain: Callable[..., object] = plain) -> object:
            reads[qid] += 1
            return await plain(qid)  # type: ignore[misc]

        s.load = load  # type: ignore[method-assign]
    qids = [
        await spools[0].enqueue(NewMessage("a@example.com", (f"r{i}@a.example",), MSG))
        for i in range(40)
    ]
    scheds = [scheduler(tmp_path, s, courier, clock, lease=60) for s in spools]
    tasks = [asyncio.create_task(s.run()) for s in scheds]
    try:
        await until(lambda: sum(courier.count.values()) >= len(qids), 10)
        await until(lambda: all(s.active == 0 for s in scheds))
        assert await spools[0].list() == []
        assert max(courier.count.values()) == 1 and len(courier.count) == len(qids)
        assert set(reads) == set(qids) and max(reads.values()) == 1, reads
    finally:
        for s, t in zip(scheds, tasks, strict=True):
            await s.stop()
            t.cancel()
