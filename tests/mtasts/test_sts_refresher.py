"""Proactive refresh: skip the fetch on an unchanged id, refetch on a new one, bounded
concurrency, last run persisted across restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from relay.model import StsMode
from relay.mtasts.cache import PolicyCache, open_cache
from relay.mtasts.refresher import LAST_RUN_KEY, PolicyRefresher
from relay.store import Store
from tests.mtasts.conftest import StsLab, execute


def policy(mode: str = "enforce", max_age: int = 7200) -> str:
    return f"version: STSv1\nmode: {mode}\nmx: mx.example.com\nmax_age: {max_age}\n"


async def test_refresh_skips_the_fetch_on_unchanged_id_and_fetches_on_new(
    lab: StsLab, sts_store: Any
) -> None:
    for d in ("a.example", "b.example", "c.example"):
        lab.publish(d, policy(), "v1")
    m = lab.manager(sts_store, refresh_interval=1800)
    t0 = lab.clock.now
    for d in ("a.example", "b.example", "c.example"):
        await m.get_policy(d)
    assert len(lab.https.seen) == 3

    assert await m.refresh_once() == {}  # nothing due yet
    lab.clock.advance(3600)
    lab.publish("b.example", policy("testing"), "v2")
    lab.zone.remove("_mta-sts.c.example")
    outcomes = await m.refresh_once()
    assert outcomes == {"unchanged": 1, "updated": 1, "kept": 1}
    assert len(lab.https.seen) == 4  # only b.example fetched again
    a = await m.cache.get("a.example")
    # checked now; the expiry still counts from the fetch at t0 (RFC 8461 section 3.2)
    assert a is not None and a.checked_at == lab.clock.now
    assert a.expires_at == t0 + 7200 and a.fetched_at == t0
    b = await m.cache.get("b.example")
    assert b is not None and b.policy_id == "v2" and b.policy.mode is StsMode.TESTING
    c = await m.cache.get("c.example")
    assert c is not None and c.expires_at == t0 + 7200  # not extended

    lab.clock.advance(3601)  # a and c have expired; c has no record any more
    outcomes = await m.refresh_once()
    assert outcomes == {"refetched": 1, "unchanged": 1, "removed": 1}
    assert await m.cache.get("c.example") is None
    assert len(lab.https.seen) == 5  # a.example fetched again: the only way to renew it
    a = await m.cache.get("a.example")
    assert a is not None and a.fetched_at == lab.clock.now
    assert a.expires_at == lab.clock.now + 7200


async def test_unchanged_id_does_not_push_the_expiry_and_the_policy_is_refetched_in_time(
    lab: StsLab, sts_store: Any
) -> None:
    """RFC 8461 3.2: max_age counts from the fetch. Fetched at t0 with max_age M, the TXT
    id unchanged at t0+M/2: the expiry stays t0+M; the refresher fetches the policy again
    before t0+M (3.3: proactive refresh), so enforce never lapses, and only then moves."""
    big_m = 7200
    lab.publish("a.example", policy(max_age=big_m), "v1")
    m = lab.manager(sts_store, refresh_interval=600)
    t0 = lab.clock.now
    assert (await m.get_policy("a.example")).enforce
    lab.clock.advance(big_m / 2)
    assert await m.refresh_once() == {"unchanged": 1}
    a = await m.cache.get("a.example")
    assert a is not None and a.expires_at == t0 + big_m and a.checked_at == t0 + big_m / 2
    assert lab.fetches("a.example") == 1
    # the old code set expires_at = t0 + M/2 + M here: a policy unverified for 1.5 M
    lab.clock.advance(big_m / 2 - 700)  # t0 + M - 700: not yet within the next run
    assert await m.refresh_once() == {"unchanged": 1}
    lab.clock.advance(200)  # t0 + M - 500: it would expire before the next run
    assert await m.refresh_once() == {"refetched": 1}
    assert lab.fetches("a.example") == 2
    a = await m.cache.get("a.example")
    assert a is not None and a.fetched_at == lab.clock.now
    assert a.expires_at == lab.clock.now + big_m
    assert (await m.get_policy("a.example")).enforce


async def test_refresh_failure_keeps_cached_policy(lab: StsLab, sts_store: Any) -> None:
    lab.publish("a.example", policy(), "v1")
    m = lab.manager(sts_store, refresh_interval=600, failed_fetch_backoff=300)
    await m.get_policy("a.example")
    lab.clock.advance(600)
    lab.set_id("a.example", "v2")
    lab.zone.remove("mta-sts.a.example")
    assert await m.refresh_once() == {"failed": 1}
    lab.clock.advance(100)
    await execute(sts_store, "UPDATE mtasts_policy SET checked_at=0")
    assert await m.refresh_once() == {"backoff": 1}
    pol = await m.get_policy("a.example")
    assert (pol.enforce, pol.policy_id) == (True, "v1")


async def test_concurrency_is_bounded(sts_store: Any) -> None:
    cache = open_cache(sts_store)
    now = 1000.0
    names = [f"d{i}.example" for i in range(12)]
    for n in names:
        await execute(sts_store, "INSERT INTO mtasts_policy VALUES (?, 'x', ?, 0, 0, 5000)", n,
                      policy())  # fmt: skip
    active = peak = 0
    done: list[str] = []

    async def refresh(domain: str) -> str:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        done.append(domain)
        return "unchanged"

    r = PolicyRefresher(cache, refresh, interval=60, concurrency=3, clock=lambda: now)
    assert await r.run_once() == {"unchanged": 12}
    assert peak == 3 and sorted(done) == sorted(names)
    assert float(await cache.get_meta(LAST_RUN_KEY) or 0) == now


async def test_one_failing_domain_does_not_stop_the_run(sts_store: Any) -> None:
    cache = open_cache(sts_store)
    for n in ("bad.example", "good.example"):
        await execute(sts_store, "INSERT INTO mtasts_policy VALUES (?, 'x', ?, 0, 0, 5000)", n,
                      policy())  # fmt: skip

    async def refresh(domain: str) -> str:
        if domain == "bad.example":
            raise RuntimeError("boom")
        return "unchanged"

    r = PolicyRefresher(cache, refresh, interval=60, concurrency=2, clock=lambda: 1000.0)
    assert await r.run_once() == {"error": 1, "unchanged": 1}


async def test_loop_runs_and_last_run_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    runs: list[float] = []

    async def refresh(domain: str) -> str:
        return "unchanged"

    store = Store(path).open()
    try:
        r = PolicyRefresher(PolicyCache(store), refresh, interval=0.15, concurrency=1)
        orig = r.run_once

        async def counted() -> dict[str, int]:
            runs.append(time.time())
            return await orig()

        r.run_once = counted  # type: ignore[method-assign]
        stop = asyncio.Event()
        task = asyncio.create_task(r.run(stop))
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, 2)
        assert 2 <= len(runs) <= 5
        last = await r.last_run()
        assert abs(last - runs[-1]) < 0.1
    finally:
        store.close()

    store = Store(path).open()  # restart: the persisted last run is honoured
    try:
        r2 = PolicyRefresher(PolicyCache(store), refresh, interval=3600, concurrency=1)
        assert await r2.last_run() == last
        stop = asyncio.Event()
        task = asyncio.create_task(r2.run(stop))
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 2)
        assert r2.runs == 0  # not due for an hour
    finally:
        store.close()
