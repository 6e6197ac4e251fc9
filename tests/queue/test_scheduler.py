"""Scheduler and spool: retries with back-off, expiry, DSNs, recovery, flush (fake courier,
real store)."""

from __future__ import annotations

import asyncio
import email
from pathlib import Path
from typing import Any

import pytest

from relay.config import parse_config
from relay.model import AttemptResult, DeliveryJob, RecipientResult, RecipientState
from relay.queue.scheduler import RetryPolicy, Scheduler
from relay.queue.spool import NewMessage, Spool
from relay.store import Store
from tests.pg.backends import QueueBackend

MSG = b"From: a@example.com\r\nTo: b@example.org\r\nMessage-ID: <m1@x>\r\nSubject: t\r\n\r\nhi\r\n"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class ScriptedCourier:
    """Answers each recipient from a script: address -> list of states (consumed in order)."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.jobs: list[DeliveryJob] = []
        self.dsns: list[DeliveryJob] = []  # the DSNs the scheduler queued: delivered

    async def deliver(self, job: DeliveryJob) -> AttemptResult:
        if not job.mail_from and b"report-type=delivery-status" in job.data:
            self.dsns.append(job)
            return AttemptResult(
                domain=job.domain,
                recipients=tuple(
                    RecipientResult(a, RecipientState.DELIVERED, "250 ok") for a in job.recipients
                ),
            )
        self.jobs.append(job)
        out = []
        for a in job.recipients:
            step = self.script[a].pop(0) if len(self.script[a]) > 1 else self.script[a][0]
            state = {
                "ok": RecipientState.DELIVERED,
                "tmp": RecipientState.DEFERRED,
                "perm": RecipientState.FAILED,
            }[step]
            reply = {
                "ok": "250 2.0.0 ok",
                "tmp": "451 4.3.0 try later",
                "perm": "550 5.1.1 no such user",
            }[step]
            out.append(RecipientResult(a, state, reply))
        return AttemptResult(domain=job.domain, recipients=tuple(out))


class Harness:
    def __init__(
        self,
        tmp: Path,
        script: dict[str, list[str]],
        sched: dict[str, Any] | None = None,
        *,
        spool: Any = None,
        **delivery: object,
    ) -> None:
        """``spool``: run over this spool (another store, e.g. PostgreSQL) and its clock
        instead of a SQLite store of the harness's own."""
        doc = {
            "delivery": {
                "retry_first": 300,
                "retry_max": 3600,
                "retry_jitter": 0.0,
                "queue_lifetime": 5 * 86400,
                **delivery,
            }
        }
        self.config = parse_config(doc, tmp / "config.toml")
        self._own_store = spool is None
        if spool is None:
            self.clock = Clock()
            self.store: Any = Store(tmp / "q.sqlite3").open()
            self.spool: Any = Spool(self.store, self.clock)
        else:
            self.clock, self.store, self.spool = spool.clock, spool.store, spool
        self.courier = ScriptedCourier(script)
        self.sched = Scheduler(
            self.config,
            self.spool,
            self.courier,
            clock=self.clock,
            poll_interval=0.02,
            **(sched or {}),
        )

    @property
    def injected(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        """The DSNs the scheduler queued and delivered (reverse-path, recipients, bytes)."""
        return [(j.mail_from, j.recipients, j.data) for j in self.courier.dsns]

    async def settle(self) -> None:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if self.sched.active == 0:
                await asyncio.sleep(0.03)
                if self.sched.active == 0:
                    return

    def close(self) -> None:
        if self._own_store:
            self.store.close()


@pytest.fixture
async def harness_factory(tmp_path: Path, queue_backend: QueueBackend):  # type: ignore[no-untyped-def]
    """One harness per test, over each store (SQLite, PostgreSQL: ``queue_backend``)."""
    spool = await queue_backend.spool(Clock())
    made: list[Harness] = []

    def make(
        script: dict[str, list[str]], sched: dict[str, Any] | None = None, **delivery: object
    ) -> Harness:
        assert not made, "one harness per test"
        h = Harness(tmp_path, script, sched, spool=spool, **delivery)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_retry_policy_grows_and_caps() -> None:
    p = RetryPolicy(first=300, maximum=14400, jitter=0.0)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5, 6, 7, 8)] == [
        300,
        600,
        1200,
        2400,
        4800,
        9600,
        14400,
        14400,
    ]
    j = RetryPolicy(first=300, maximum=14400, jitter=0.2)
    assert j.delay(1, lambda: 0.0) == pytest.approx(240)
    assert j.delay(1, lambda: 1.0) == pytest.approx(360)


async def test_deferred_then_delivered_after_backoff(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory({"b@example.org": ["tmp", "ok"]})
    task = asyncio.create_task(h.sched.run())
    qid = await h.spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
    h.sched.wake()
    await h.settle()
    [m] = await h.spool.list()
    [r] = m.recipients
    assert r.state is RecipientState.DEFERRED and r.attempts == 1
    assert r.next_attempt == pytest.approx(h.clock.t + 300)
    assert r.last_reply.startswith("451")
    h.clock.t += 299
    h.sched.wake()
    await h.settle()
    assert len(h.courier.jobs) == 1  # not due yet
    h.clock.t += 2
    h.sched.wake()
    await h.settle()
    assert len(h.courier.jobs) == 2
    assert await h.spool.get(qid) is None  # delivered -> removed
    assert h.injected == []
    await h.sched.stop()
    task.cancel()


async def test_one_of_two_rejected_gives_one_dsn_for_that_recipient(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory({"b@example.org": ["ok"], "c@example.org": ["perm"]})
    task = asyncio.create_task(h.sched.run())
    await h.spool.enqueue(NewMessage("a@example.com", ("b@example.org", "c@example.org"), MSG))
    h.sched.wake()
    await h.settle()
    assert len(h.courier.jobs) == 1 and h.courier.jobs[0].recipients == (
        "b@example.org",
        "c@example.org",
    )  # one transaction for the domain
    assert len(h.injected) == 1
    mail_from, rcpts, data = h.injected[0]
    assert mail_from == "" and rcpts == ("a@example.com",)
    dsn = email.message_from_bytes(data)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["Auto-Submitted"] == "auto-replied"
    status = data.decode()
    assert "Final-Recipient: rfc822; c@example.org" in status
    assert "b@example.org" not in status.split("message/delivery-status")[1].split("--=_")[0]
    assert "Status: 5.1.1" in status and "Action: failed" in status
    assert "Message-ID: <m1@x>" in status  # original headers included
    assert await h.spool.list() == []
    await h.sched.stop()
    task.cancel()


async def test_null_sender_gets_no_dsn(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory({"c@example.org": ["perm"]})
    task = asyncio.create_task(h.sched.run())
    await h.spool.enqueue(NewMessage("", ("c@example.org",), MSG))
    h.sched.wake()
    await h.settle()
    assert h.injected == [] and await h.spool.list() == []
    await h.sched.stop()
    task.cancel()


async def test_expiry_after_queue_lifetime_bounces(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory({"b@example.org": ["tmp"]})
    task = asyncio.create_task(h.sched.run())
    await h.spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
    h.sched.wake()
    await h.settle()
    for _ in range(40):  # keep retrying as the clock runs past 5 days
        h.clock.t += 4 * 3600
        h.sched.wake()
        await h.settle()
        if h.injected:
            break
    assert h.injected, "no DSN after the queue lifetime"
    text = h.injected[0][2].decode()
    assert "4.4.7" in text and "Action: failed" in text
    assert await h.spool.list() == []
    attempts = len(h.courier.jobs)
    assert 20 <= attempts <= 40  # retried within the lifetime, then gave up
    await h.sched.stop()
    task.cancel()


async def test_delay_warning_once(harness_factory) -> None:  # type: ignore[no-untyped-def]
    h = harness_factory({"b@example.org": ["tmp"]}, delay_warning=1000)
    task = asyncio.create_task(h.sched.run())
    await h.spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
    h.sched.wake()
    await h.settle()
    assert h.injected == []
    for _ in range(4):
        h.clock.t += 3600
        h.sched.wake()
        await h.settle()
    delayed = [i for i in h.injected if b"Action: delayed" in i[2]]
    assert len(delayed) == 1
    await h.sched.stop()
    task.cancel()


async def test_recovery_requeues_inflight(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path / "q.sqlite3").open()
    spool = Spool(store, clock)
    qid = await spool.enqueue(NewMessage("a@example.com", ("b@example.org", "c@example.org"), MSG))
    await spool.mark_inflight(qid, ["b@example.org"])
    store.close()
    store = Store(tmp_path / "q.sqlite3").open()
    spool = Spool(store, clock)
    assert spool.recover_sync() == 1
    m = await spool.get(qid)
    assert m is not None and {r.state for r in m.recipients} == {RecipientState.QUEUED}
    assert await spool.due(clock.t, 10, set()) == [qid]
    store.close()


async def test_flush_makes_deferred_due(tmp_path: Path) -> None:
    from relay.queue.spool import RecipientUpdate

    clock = Clock()
    store = Store(tmp_path / "q.sqlite3").open()
    spool = Spool(store, clock)
    qid = await spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
    await spool.record(
        qid, [RecipientUpdate("b@example.org", RecipientState.DEFERRED, "451 x", clock.t + 9999)]
    )
    assert await spool.due(clock.t, 10, set()) == []
    assert await spool.flush() == 1
    assert await spool.due(clock.t, 10, set()) == [qid]
    store.close()


async def test_store_failure_never_acknowledges(tmp_path: Path) -> None:
    from relay.errors import StoreError

    store = Store(tmp_path / "q.sqlite3").open()
    spool = Spool(store)
    store.fail_writes = lambda: True
    with pytest.raises(StoreError):
        await spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG))
    store.fail_writes = None
    assert await spool.list() == []
    store.close()


class BlockingCourier:
    """Holds every delivery until released, recording which messages were started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()

    async def deliver(self, job: DeliveryJob) -> AttemptResult:
        self.started.append(job.qid)
        await self.release.wait()
        return AttemptResult(
            domain=job.domain,
            recipients=tuple(
                RecipientResult(a, RecipientState.DELIVERED, "250 ok") for a in job.recipients
            ),
        )


async def test_backlog_never_takes_the_whole_active_window(tmp_path: Path) -> None:
    config = parse_config({"delivery": {"active_window": 8}}, tmp_path / "config.toml")
    clock = Clock()
    store = Store(tmp_path / "q.sqlite3").open()
    spool = Spool(store, clock)
    courier = BlockingCourier()

    sched = Scheduler(config, spool, courier, clock=clock, poll_interval=0.02)
    for i in range(50):  # a backlog of due mail in the store
        await spool.enqueue(NewMessage("a@example.com", (f"r{i}@example.org",), MSG))
    task = asyncio.create_task(sched.run())
    sched.wake()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(courier.started) >= 6:
            break
    await asyncio.sleep(0.1)
    assert len(courier.started) == 6  # 75 % of the window: the backlog waits in the store
    # a list fan-out's copies (share 0.75) find no room beside it either
    assert not sched.reserve(0.75)
    # new mail is claimed and started at once, ahead of the backlog
    assert sched.reserve()
    new = NewMessage("a@example.com", ("fresh@example.org",), MSG)
    qid = await spool.enqueue(new, claimed=True)
    sched.submit_new(qid, new, clock.t, True)
    await asyncio.sleep(0.05)
    assert courier.started[-1] == qid
    courier.release.set()
    for _ in range(300):
        await asyncio.sleep(0.02)
        if not await spool.list():
            break
    assert await spool.list() == [] and len(courier.started) == 51
    await sched.stop()
    task.cancel()
    store.close()


async def test_the_scheduler_sends_relayed_and_failed_dsns_with_the_parameters(
    harness_factory,
) -> None:  # type: ignore[no-untyped-def]
    """End to end over the scheduler: NOTIFY=SUCCESS delivered to a next hop without DSN
    gives a "relayed" DSN, a failure with NOTIFY=NEVER none; ENVID and ORCPT are in it."""
    h = harness_factory({"b@dest.test": ["ok"], "c@other.test": ["perm"]})
    task = asyncio.create_task(h.sched.run())
    try:
        msg = NewMessage(
            "a@x.test",
            ("b@dest.test", "c@other.test"),
            MSG,
            notify=("SUCCESS", "NEVER"),
            orcpts=("rfc822;b@alias.test", ""),
            envid="env-42",
        )
        await h.spool.enqueue(msg)
        h.sched.wake()
        for _ in range(5):
            await h.settle()
            if h.injected and await h.spool.list() == []:
                break
        [(mail_from, rcpts, data)] = h.injected
        text = data.decode()
        assert (mail_from, rcpts) == ("", ("a@x.test",))
        assert "Action: relayed" in text and "Original-Envelope-Id: env-42" in text
        assert "Original-Recipient: rfc822; b@alias.test" in text
        assert "c@other.test" not in text.split("message/delivery-status")[1].split("--=_")[0]
        assert await h.spool.list() == []
    finally:
        await h.sched.stop()
        task.cancel()
