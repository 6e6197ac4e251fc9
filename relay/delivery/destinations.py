"""Outbound limits per destination: global and per-domain concurrency, and the
dead-destination breaker (Postfix SCHEDULER_README, "dead destination").

A destination (recipient domain) is marked dead after ``dead_after`` consecutive
attempts that failed at connect or SMTP-handshake level on every MX (nothing listening,
timeouts, 421 greetings). While dead, the courier defers its recipients at once
(4.4.1) without connecting, for ``dead_backoff`` seconds. When the back-off has passed,
the destination is probed: one more failure marks it dead again, one success clears it.
This breaker is separate from the per-recipient retry schedule, which the scheduler owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _DomainState:
    failures: int = 0
    dead_until: float = 0.0
    last_error: str = ""
    users: int = 0
    semaphore: asyncio.Semaphore | None = None


class Destinations:
    """Concurrency slots and dead-destination state, per recipient domain."""

    def __init__(
        self,
        *,
        concurrency: int,
        per_domain: int,
        dead_after: int,
        dead_backoff: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._global = asyncio.Semaphore(max(1, concurrency))
        self.per_domain = max(1, per_domain)
        self.dead_after = max(1, dead_after)
        self.dead_backoff = dead_backoff
        self.clock = clock
        self._domains: dict[str, _DomainState] = {}
        self.active = 0

    def _state(self, domain: str) -> _DomainState:
        key = domain.lower().rstrip(".")
        st = self._domains.get(key)
        if st is None:
            st = self._domains[key] = _DomainState()
        return st

    def _forget_if_idle(self, domain: str) -> None:
        key = domain.lower().rstrip(".")
        st = self._domains.get(key)
        if st is not None and st.users == 0 and st.failures == 0 and st.dead_until == 0.0:
            del self._domains[key]

    @contextlib.asynccontextmanager
    async def slot(self, domain: str) -> AsyncIterator[None]:
        """Hold one per-domain and one global slot (the per-domain one first, so that a
        busy domain never sits on global slots while it waits)."""
        st = self._state(domain)
        st.users += 1
        if st.semaphore is None:
            st.semaphore = asyncio.Semaphore(self.per_domain)
        sem = st.semaphore
        try:
            async with sem, self._global:
                self.active += 1
                try:
                    yield
                finally:
                    self.active -= 1
        finally:
            st.users -= 1
            self._forget_if_idle(domain)

    # ------------------------------------------------------------------ breaker

    def is_dead(self, domain: str) -> bool:
        """True while the destination is in its dead back-off."""
        st = self._domains.get(domain.lower().rstrip("."))
        return st is not None and st.dead_until > self.clock()

    def dead_until(self, domain: str) -> float | None:
        """Clock time at which a dead destination may be tried again (None: not dead)."""
        st = self._domains.get(domain.lower().rstrip("."))
        if st is None or st.dead_until <= self.clock():
            return None
        return st.dead_until

    def last_error(self, domain: str) -> str:
        st = self._domains.get(domain.lower().rstrip("."))
        return st.last_error if st is not None else ""

    def record_failure(self, domain: str, error: str = "") -> bool:
        """One attempt failed at connect/handshake level on every MX. Returns True when
        this marks the destination dead."""
        st = self._state(domain)
        st.failures += 1
        st.last_error = error
        if st.failures >= self.dead_after:
            st.dead_until = self.clock() + self.dead_backoff
            st.failures = self.dead_after - 1  # after the back-off one failure re-marks it
            return True
        return False

    def record_success(self, domain: str) -> None:
        """A session reached the transaction stage: the destination is alive."""
        key = domain.lower().rstrip(".")
        st = self._domains.get(key)
        if st is None:
            return
        st.failures = 0
        st.dead_until = 0.0
        st.last_error = ""
        self._forget_if_idle(domain)
