"""Per-destination limits and the dead-destination breaker (Postfix SCHEDULER_README)."""

from __future__ import annotations

import asyncio

from relay.delivery.courier import Courier
from relay.delivery.destinations import Destinations
from relay.model import DeliveryJob, RecipientState
from tests.delivery.mxlab import MxLab, Recorder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_marks_dead_after_consecutive_failures_and_probes_after_backoff() -> None:
    clock = Clock()
    d = Destinations(concurrency=10, per_domain=2, dead_after=3, dead_backoff=60, clock=clock)
    assert not d.record_failure("x.test", "refused")
    assert not d.record_failure("x.test", "refused")
    assert not d.is_dead("x.test")
    assert d.record_failure("X.test.", "refused")  # case and trailing dot do not matter
    assert d.is_dead("x.test") and d.dead_until("x.test") == 1060.0
    assert d.last_error("x.test") == "refused"
    clock.now += 61
    assert not d.is_dead("x.test")
    assert d.record_failure("x.test")  # the probe failed: dead again at once
    clock.now += 61
    d.record_success("x.test")
    assert not d.record_failure("x.test")  # a success reset the count
    assert not d.is_dead("x.test") and not d.is_dead("other.test")


async def _peaks(d: Destinations, domains: list[str]) -> tuple[int, int]:
    now: dict[str, int] = {}
    per_domain_peak = total_peak = 0

    async def work(domain: str) -> None:
        nonlocal per_domain_peak, total_peak
        async with d.slot(domain):
            now[domain] = now.get(domain, 0) + 1
            per_domain_peak = max(per_domain_peak, now[domain])
            total_peak = max(total_peak, d.active)
            await asyncio.sleep(0.01)
            now[domain] -= 1

    await asyncio.gather(*(work(dom) for dom in domains))
    return per_domain_peak, total_peak


async def test_slots_bound_concurrency() -> None:
    d = Destinations(concurrency=10, per_domain=2, dead_after=3, dead_backoff=60)
    assert await _peaks(d, ["a", "b", "c"] * 4) == (2, 6)
    d = Destinations(concurrency=3, per_domain=10, dead_after=3, dead_backoff=60)
    assert await _peaks(d, ["a"] * 8) == (3, 3)
    assert d._domains == {}  # idle domains are forgotten


def job(domain: str, qid: str = "Q1") -> DeliveryJob:
    return DeliveryJob(qid, domain, "a@sender.test", (f"b@{domain}",), b"x\r\n")


async def test_dead_destination_end_to_end(lab: MxLab) -> None:
    ip = lab.next_ip()  # nothing listens here yet
    lab.zone.add("dead.lab.test", "MX", (10, "mx.dead.lab.test"))
    lab.zone.set("mx.dead.lab.test", "A", [ip])
    clock = Clock()
    courier = Courier(lab.config(dead_after=3, dead_backoff=300), lab.resolver(), clock=clock)
    try:
        for i in range(3):
            res = await courier.deliver(job("dead.lab.test", f"Q{i}"))
            r = res.recipients[0]
            assert r.state is RecipientState.DEFERRED and r.enhanced == "4.4.1", r
        assert courier.is_dead("dead.lab.test")
        # the destination comes back, but the breaker holds until the back-off ends
        srv = await lab.add_server("mx.dead.lab.test", "good", ip=ip)
        queries = len(lab.zone.queries)
        res = await courier.deliver(job("dead.lab.test", "Q9"))
        r = res.recipients[0]
        assert r.state is RecipientState.DEFERRED and r.enhanced == "4.4.1"
        assert "marked dead" in r.reply
        assert srv.connections == 0 and len(lab.zone.queries) == queries  # not even DNS
        clock.now += 301
        assert not courier.is_dead("dead.lab.test")
        res = await courier.deliver(job("dead.lab.test", "Q10"))
        assert res.recipients[0].state is RecipientState.DELIVERED
        assert courier.destinations.last_error("dead.lab.test") == ""
    finally:
        await courier.close()


async def test_per_domain_concurrency_end_to_end(lab: MxLab) -> None:
    rec = Recorder(delay=0.2)
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "none", recorder=rec)
    courier = Courier(lab.config(concurrency_per_domain=1), lab.resolver())
    try:
        results = await asyncio.gather(
            *(courier.deliver(job("d.lab.test", f"Q{i}")) for i in range(3))
        )
    finally:
        await courier.close()
    assert all(r.recipients[0].state is RecipientState.DELIVERED for r in results)
    assert rec.max_active == 1
    assert srv.connections == 1  # one after the other, over one reused connection
