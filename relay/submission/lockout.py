"""Brute-force guard for AUTH (shared/threats row 12): per client IP and per user, a
pure state machine over an injected clock.

* A failure is counted against the IP and the user (when one was named); counts older
  than ``window`` seconds are forgotten.
* Each failure is answered after a back-off: ``delay`` seconds for the first failure of
  the IP or user, doubling with each one after, at most ``MAX_DELAY`` (the client waits
  for its 535, Postfix's ``smtpd_error_sleep_time`` idea).
* At ``max_failures`` the IP or user is locked for ``lockout`` seconds: every AUTH from
  it, right password or not, gets 454 4.7.0 (RFC 4954 section 6, a temporary failure).
* A success forgets the user's failures (not the IP's: one good account must not reset
  an IP trying many).

The state lives in one process: with several worker processes each counts on its own,
so an attacker gets up to ``workers`` times the attempts (docs say so). Memory is
bounded: at ``MAX_KEYS`` keys the stale ones are dropped, then the oldest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_DELAY = 30.0
MAX_KEYS = 100_000


@dataclass
class _Entry:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class Lockout:
    def __init__(
        self,
        max_failures: int,
        window: float,
        lockout: float,
        delay: float,
        clock: Callable[[], float],
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.delay = delay
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    @staticmethod
    def _keys(ip: str, user: str | None) -> list[str]:
        keys = [f"ip:{ip}"]
        if user:
            keys.append(f"user:{user.lower()}")
        return keys

    def locked(self, ip: str, user: str | None = None) -> bool:
        """Whether AUTH from this IP (for this user) is refused now."""
        now = self.clock()
        for k in self._keys(ip, user):
            e = self._entries.get(k)
            if e is not None and e.locked_until > now:
                return True
        return False

    def failure(self, ip: str, user: str | None) -> float:
        """Count one failed AUTH; return the seconds to wait before answering it."""
        now = self.clock()
        worst = 0
        for k in self._keys(ip, user):
            e = self._entries.get(k)
            if e is None:
                self._make_room(now)
                e = self._entries[k] = _Entry()
            e.failures = [t for t in e.failures if t > now - self.window]
            e.failures.append(now)
            worst = max(worst, len(e.failures))
            if len(e.failures) >= self.max_failures:
                e.locked_until = now + self.lockout
                e.failures = []
        if self.delay <= 0:
            return 0.0
        return min(self.delay * 2 ** (worst - 1), MAX_DELAY) if worst else self.delay

    def success(self, user: str) -> None:
        self._entries.pop(f"user:{user.lower()}", None)

    def _make_room(self, now: float) -> None:
        if len(self._entries) < MAX_KEYS:
            return
        for k in [k for k, e in self._entries.items() if self._stale(e, now)]:
            del self._entries[k]
        while len(self._entries) >= MAX_KEYS:
            del self._entries[next(iter(self._entries))]

    def _stale(self, e: _Entry, now: float) -> bool:
        return e.locked_until <= now and all(t <= now - self.window for t in e.failures)
