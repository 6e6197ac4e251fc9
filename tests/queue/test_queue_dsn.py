"""A bounce can never be lost, nor sent twice: a failed recipient owes its DSN until the DSN
message is queued, in the same transaction that marks it reported (fake clock, real store,
fault-injecting store)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from relay.model import RecipientState
from relay.queue.spool import FLAG_NO_DSN, NewMessage, RecipientUpdate, Spool
from relay.store import Store
from tests.pg.backends import QueueBackend
from tests.queue.test_queue_leases import CountingCourier, scheduler, until
from tests.queue.test_scheduler import MSG, Clock, Harness

FAILED = RecipientState.FAILED


def owed(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM queue_recipients WHERE state='failed' AND dsn_done=0"
            ).fetchone()[0]
        )
    finally:
        conn.close()


async def test_dsn_write_failing_after_the_failure_commit_is_retried_once(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, {"c@example.org": ["perm"]}, {"lease": 30})
    fired: list[bool] = []

    def fail_dsn_write() -> bool:
        # the first write after the failure is durable: the DSN's (enqueue + dsn_done)
        if not fired and owed(h.store.path):
            fired.append(True)
            return True
        return False

    h.store.fail_writes = fail_dsn_write
    task = asyncio.create_task(h.sched.run())
    try:
        qid = await h.spool.enqueue(NewMessage("a@example.com", ("c@example.org",), MSG))
        h.sched.wake()
        await h.settle()
        assert fired and h.injected == []
        m = await h.spool.get(qid)
        assert m is not None  # the failure stays, owing its DSN, under our lease
        [r] = m.recipients
        assert (r.state, r.dsn_done, r.lease_owner) == (FAILED, False, h.spool.owner)
        assert [x.id for x in await h.spool.list()] == [qid]  # and no DSN was queued
        h.clock.t += 41  # past the lease and the next sweep
        await until(lambda: len(h.injected) == 1)
        await h.settle()
        for _ in range(3):  # later sweeps find nothing owed: never a second DSN
            h.clock.t += 20
            await asyncio.sleep(0.1)
        await h.settle()
        assert len(h.injected) == 1 and await h.spool.list() == []
        [(mail_from, rcpts, data)] = h.injected
        assert (mail_from, rcpts) == ("", ("a@example.com",))
        assert b"Final-Recipient: rfc822; c@example.org" in data
    finally:
        await h.sched.stop()
        task.cancel()
        h.close()


async def test_the_dsn_and_its_mark_are_one_write(queue_backend: QueueBackend) -> None:
    clock = Clock()
    spool = await queue_backend.spool(clock)
    store = queue_backend.primary
    qid = await spool.enqueue(NewMessage("a@example.com", ("c@x.org", "d@x.org"), MSG))
    await spool.claim(qid, ["c@x.org", "d@x.org"])
    removed, failed = await spool.record(
        qid,
        [
            RecipientUpdate("c@x.org", FAILED, "550 no"),
            RecipientUpdate("d@x.org", FAILED, "550 no"),
        ],
    )
    assert not removed and [r.address for r in failed] == ["c@x.org", "d@x.org"]
    dsn = NewMessage("", ("a@example.com",), b"Subject: dsn\r\n\r\nx\r\n", (), FLAG_NO_DSN)
    store.fail_writes = lambda: True
    try:
        await spool.enqueue_report(dsn, "DSN1", about=qid, failed=["c@x.org", "d@x.org"])
    except Exception:  # noqa: BLE001 - the injected I/O error
        pass
    store.fail_writes = None
    assert await queue_backend.owed() == 2 and await spool.get("DSN1") is None  # neither
    assert await spool.enqueue_report(dsn, "DSN1", about=qid, failed=["c@x.org", "d@x.org"])
    assert await queue_backend.owed() == 0 and await spool.get(qid) is None  # both
    got = await spool.get("DSN1")
    assert got is not None and got.flags & FLAG_NO_DSN and got.mail_from == ""
    # a second report of the same failures writes nothing
    assert await spool.enqueue_report(dsn, "DSN2", about=qid, failed=["c@x.org"]) is None
    assert await spool.get("DSN2") is None


async def test_two_owners_sweeping_an_owed_dsn_queue_it_once(tmp_path: Path) -> None:
    clock = Clock()
    stores = [Store(tmp_path / "q.sqlite3").open() for _ in range(2)]
    spools = [Spool(s, clock) for s in stores]
    courier = CountingCourier(state=RecipientState.DEFERRED)  # the DSNs stay queued
    scheds = [scheduler(tmp_path, s, courier, clock, lease=30) for s in spools]
    try:
        qids = []
        for i in range(10):  # failures committed, then the process died before the DSNs
            qid = await spools[0].enqueue(NewMessage("a@example.com", (f"r{i}@x.org",), MSG))
            await spools[0].claim(qid, [f"r{i}@x.org"])
            await spools[0].record(qid, [RecipientUpdate(f"r{i}@x.org", FAILED, "550 no")])
            qids.append(qid)
        assert Spool(stores[1], clock).recover_sync() == 0  # the next start frees them
        await asyncio.gather(*(s.maintain() for s in scheds))
        await until(lambda: all(s.active == 0 for s in scheds))
        msgs = await spools[0].list()
        assert not {m.id for m in msgs} & set(qids)  # every original is done
        dsns = [m for m in msgs if m.mail_from == ""]
        assert len(dsns) == 10 and all(m.flags & FLAG_NO_DSN for m in dsns)
    finally:
        for sc in scheds:
            await sc.stop()
        for s in stores:
            s.close()


async def test_null_sender_failure_is_settled_without_a_dsn(queue_backend: QueueBackend) -> None:
    clock = Clock()
    spool = await queue_backend.spool(clock)
    qid = await spool.enqueue(NewMessage("", ("c@x.org",), MSG))
    await spool.claim(qid, ["c@x.org"])
    assert await spool.record(qid, [RecipientUpdate("c@x.org", FAILED, "550")]) == (True, ())
    assert await spool.get(qid) is None


async def test_owed_dsns_of_a_dead_owner_are_queued_once_after_its_lease(
    tmp_path: Path, queue_backend: QueueBackend
) -> None:
    """Failures committed, then the owner died before their DSNs: once its leases expire,
    two other owners sweeping at once queue each DSN exactly once (no restart needed)."""
    clock = Clock()
    dead = await queue_backend.spool(clock, lease=30)
    spools = [await queue_backend.spool(clock, lease=30) for _ in range(2)]
    courier = CountingCourier(state=RecipientState.DEFERRED)  # the DSNs stay queued
    scheds = [scheduler(tmp_path, s, courier, clock, lease=30) for s in spools]
    try:
        qids = []
        for i in range(10):
            qid = await dead.enqueue(NewMessage("a@example.com", (f"r{i}@x.org",), MSG))
            await dead.claim(qid, [f"r{i}@x.org"])
            await dead.record(qid, [RecipientUpdate(f"r{i}@x.org", FAILED, "550 no")])
            qids.append(qid)
        await asyncio.gather(*(s.maintain() for s in scheds))
        assert await queue_backend.owed() == 10  # the dead owner's leases still hold
        clock.t += 31
        await asyncio.gather(*(s.maintain() for s in scheds))
        await until(lambda: all(s.active == 0 for s in scheds))
        msgs = await spools[0].list()
        assert not {m.id for m in msgs} & set(qids)  # every original is done
        dsns = [m for m in msgs if m.mail_from == ""]
        assert len(dsns) == 10 and all(m.flags & FLAG_NO_DSN for m in dsns)
        assert await queue_backend.owed() == 0
    finally:
        for sc in scheds:
            await sc.stop()
