"""The scheduler's lanes: new messages for one domain, handed over in memory (a list's
batch of copies, intake), are sent by at most the domain's concurrency of runners, one
after another (Courier.deliver_many); each message's outcome is written as soon as its
transaction ends, and a stop gives back the leases of the messages still waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from relay.config import parse_config
from relay.model import AttemptResult, DeliveryJob, RecipientResult, RecipientState
from relay.queue.scheduler import Scheduler
from relay.queue.spool import NewMessage, Spool
from relay.store import Store
from tests.queue.test_scheduler import MSG, Clock


def delivered(job: DeliveryJob) -> AttemptResult:
    return AttemptResult(
        job.domain,
        tuple(RecipientResult(a, RecipientState.DELIVERED, "250 2.0.0 ok") for a in job.recipients),
    )


class LaneCourier:
    """deliver_many that records who sent what; ``gate`` (awaited before each job)
    lets a test hold a runner in the middle of its lane."""

    def __init__(self, gate: Callable[[DeliveryJob], object] | None = None) -> None:
        self.runs: list[list[str]] = []  # qids, per deliver_many call
        self.running = 0
        self.peak = 0
        self.gate = gate

    async def deliver(self, job: DeliveryJob) -> AttemptResult:
        self.runs.append([job.qid])
        return delivered(job)

    async def deliver_many(
        self,
        next_job: Callable[[], DeliveryJob | None],
        done: Callable[[DeliveryJob, AttemptResult], None],
    ) -> None:
        sent: list[str] = []
        self.runs.append(sent)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            while (job := next_job()) is not None:
                if self.gate is not None:
                    await self.gate(job)  # type: ignore[misc]
                await asyncio.sleep(0.005)  # the transaction
                sent.append(job.qid)
                done(job, delivered(job))
        finally:
            self.running -= 1


async def queue_claimed(sched: Scheduler, spool: Spool, clock: Clock, n: int) -> list[str]:
    qids = []
    for i in range(n):
        assert sched.reserve()
        new = NewMessage("a@example.com", (f"r{i}@example.org",), MSG)
        qid = await spool.enqueue(new, claimed=True)
        sched.submit_new(qid, new, clock.t, True)
        qids.append(qid)
    return qids


def setup(tmp: Path, courier: object, per_domain: int) -> tuple[Store, Spool, Scheduler, Clock]:
    config = parse_config(
        {"delivery": {"concurrency_per_domain": per_domain, "retry_jitter": 0.0}},
        tmp / "config.toml",
    )
    clock = Clock()
    store = Store(tmp / "q.sqlite3").open()
    spool = Spool(store, clock)
    sched = Scheduler(config, spool, courier, clock=clock, poll_interval=0.02)  # type: ignore[arg-type]
    return store, spool, sched, clock


async def settle(sched: Scheduler) -> None:
    for _ in range(300):
        await asyncio.sleep(0.01)
        if sched.active == 0:
            return
    raise AssertionError(f"{sched.active} messages still active")


async def test_a_domains_messages_go_through_at_most_its_concurrency_of_runners(
    tmp_path: Path,
) -> None:
    courier = LaneCourier()
    store, spool, sched, clock = setup(tmp_path, courier, per_domain=2)
    try:
        qids = await queue_claimed(sched, spool, clock, 8)
        await settle(sched)
        sent = [q for run in courier.runs for q in run]
        assert sorted(sent) == sorted(qids)  # each once
        assert courier.peak == 2 and len(courier.runs) <= 4
        assert max(len(run) for run in courier.runs) > 1  # one after another on a runner
        assert await spool.list() == []  # every outcome written, every message settled
    finally:
        await sched.stop()
        store.close()


async def test_each_outcome_is_written_while_the_runner_sends_the_next(
    tmp_path: Path,
) -> None:
    """The runner holds its next transaction until the message before it is gone from
    the store: if outcomes were written only at the end of the lane this would hang (and
    a crash in the middle of a lane would send the finished ones again)."""
    spool_ref: list[Spool] = []
    first: list[str] = []

    async def gate(job: DeliveryJob) -> None:
        if first:
            for _ in range(200):
                if await spool_ref[0].load(first[0]) is None:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the first message's outcome was not written")
        first.append(job.qid)

    courier = LaneCourier(gate)
    store, spool, sched, clock = setup(tmp_path, courier, per_domain=1)
    spool_ref.append(spool)
    try:
        qids = await queue_claimed(sched, spool, clock, 3)
        await settle(sched)
        assert courier.runs == [qids]
        assert await spool.list() == []
    finally:
        await sched.stop()
        store.close()


async def test_a_stop_in_the_middle_of_a_lane_gives_the_waiting_messages_back(
    tmp_path: Path,
) -> None:
    """A runner stuck in its first transaction at stop: after the grace, that message and
    the ones waiting behind it are queued again (due for the next start), none lost."""
    hold = asyncio.Event()

    async def gate(job: DeliveryJob) -> None:
        await hold.wait()

    courier = LaneCourier(gate)
    store, spool, sched, clock = setup(tmp_path, courier, per_domain=1)
    try:
        qids = await queue_claimed(sched, spool, clock, 4)
        await asyncio.sleep(0.05)
        assert sched.active == 4 and courier.running == 1
        await sched.stop(grace=0.1)
        assert sched.active == 0
        due = await spool.due(clock.t + 1, 10, set())
        assert sorted(due) == sorted(qids)  # all four queued again, no lease left
        assert [q for run in courier.runs for q in run] == []
    finally:
        store.close()
