"""Proactive refresh of cached MTA-STS policies (RFC 8461 section 3.3: "implementations
SHOULD proactively refresh cached policies periodically").

Every ``[mta_sts] refresh_interval`` the refresher takes the cached domains not checked
within the interval (or expiring within it) and hands each to ``refresh_domain`` (the
manager's: a TXT lookup, and an HTTPS fetch when the id changed or when the policy
would expire before the next run), at most ``refresh_concurrency`` at a time. An
unchanged id never moves a policy's expiry: max_age counts from the fetch (RFC 8461
section 3.2), so a policy is renewed only by fetching it again. The time of the last
run is kept in the store, so a restart neither re-checks everything at once nor forgets
to run; a run is claimed by moving that time (compare-and-set), so of the processes or
nodes sharing the cache (PostgreSQL) one runs each round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from relay.mtasts.cache import StsCache

log = structlog.get_logger("relay.mtasts.refresher")

LAST_RUN_KEY = "refresher_last_run"
ERROR_PAUSE = 60.0  # seconds before trying again after a failed run


class PolicyRefresher:
    def __init__(
        self,
        cache: StsCache,
        refresh_domain: Callable[[str], Awaitable[str]],
        *,
        interval: float,
        concurrency: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.refresh_domain = refresh_domain
        self.interval = interval
        self.concurrency = max(1, concurrency)
        self.clock = clock
        self.runs = 0
        self.outcomes: dict[str, int] = {}

    async def last_run(self) -> float:
        return _as_time(await self.cache.get_meta(LAST_RUN_KEY))

    async def run_once(self) -> dict[str, int]:
        """Refresh every due domain now; return the count of each outcome."""
        now = self.clock()
        domains = await self.cache.due(now - self.interval, now + self.interval)
        sem = asyncio.Semaphore(self.concurrency)
        outcomes: dict[str, int] = {}

        async def one(domain: str) -> None:
            async with sem:
                try:
                    outcome = await self.refresh_domain(domain)
                except Exception as exc:  # one bad domain must not stop the others
                    log.error("mtasts_refresh_failed", domain=domain, error=repr(exc))
                    outcome = "error"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(one(d) for d in domains))
        await self.cache.set_meta(LAST_RUN_KEY, repr(now))
        self.runs += 1
        for k, v in outcomes.items():
            self.outcomes[k] = self.outcomes.get(k, 0) + v
        log.info("mtasts_refresh_run", domains=len(domains), **outcomes)
        return outcomes

    async def run(self, stop: asyncio.Event) -> None:
        """Run until stop is set. Waits for the persisted last run + interval."""
        while not stop.is_set():
            try:
                seen = await self.cache.get_meta(LAST_RUN_KEY)
                now = self.clock()
                wait = _as_time(seen) + self.interval - now
                if wait <= 0:
                    # claim the round: another process or node may have found it due too
                    if await self.cache.claim_meta(LAST_RUN_KEY, seen, repr(now)):
                        await self.run_once()
                    continue
            except Exception as exc:
                log.error("mtasts_refresher_error", error=repr(exc))
                wait = min(self.interval, ERROR_PAUSE)
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except TimeoutError:
                pass


def _as_time(value: str | None) -> float:
    try:
        return float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
