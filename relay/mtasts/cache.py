"""Durable MTA-STS policy cache in the Store (tables ``mtasts_*``; RFC 8461 sections 3.3, 10).

A restart keeps every cached policy: that is the defence against a DNS attacker who
blocks discovery (threats row 17). Rows are untrusted on reload: the stored policy
text is parsed again, and a row that no longer parses is ignored (and logged).

Tables:
- ``mtasts_policy``: domain, TXT id, policy text, fetched_at, checked_at (last time the
  TXT id was seen unchanged), expires_at (= fetched_at + max_age: only a fetch sets it,
  RFC 8461 section 3.2; a TXT id seen unchanged moves checked_at alone).
- ``mtasts_failure``: last failed fetch per (domain, id), its RFC 8460 result type and
  reason, for the per-id back-off.
- ``mtasts_meta``: small key/value rows (the refresher's last run).
- ``mtasts_fetching``: who fetches a domain's policy right now (owner, until): a lease,
  so that processes (or nodes, on PostgreSQL: relay.mtasts.cache_pg) sharing the cache
  fetch a policy once and the others read the result.

``PolicyCache`` is the SQLite cache; ``open_cache(store)`` gives the one for a store
(``PgPolicyCache`` for a ``PgStore``); ``StsCache`` is what both offer.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from relay.errors import PolicyError, RelayError
from relay.model import TlsResultType
from relay.mtasts.policy import StsPolicy, parse_policy
from relay.store import Store

log = structlog.get_logger("relay.mtasts.cache")

MIGRATIONS = [  # one statement per step (no executescript inside the writer's transaction)
    "CREATE TABLE mtasts_policy (domain TEXT PRIMARY KEY, policy_id TEXT NOT NULL, "
    "policy_text TEXT NOT NULL, fetched_at REAL NOT NULL, checked_at REAL NOT NULL, "
    "expires_at REAL NOT NULL)",
    "CREATE INDEX mtasts_policy_checked ON mtasts_policy(checked_at)",
    "CREATE TABLE mtasts_failure (domain TEXT NOT NULL, policy_id TEXT NOT NULL, "
    "failed_at REAL NOT NULL, result_type TEXT NOT NULL, reason TEXT NOT NULL, "
    "PRIMARY KEY (domain, policy_id))",
    "CREATE TABLE mtasts_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE mtasts_fetching (domain TEXT PRIMARY KEY, owner TEXT NOT NULL, "
    "until REAL NOT NULL)",
]


class CacheUnavailable(RelayError):
    """The policy cache could not be read (SQLITE_BUSY past the timeout, an I/O error):
    whether the domain has a cached policy is unknown. Delivery must not read this as
    "no policy" (RFC 8461 section 5: fail closed); it defers the recipients."""

    def __init__(self, domain: str, reason: str) -> None:
        self.domain = domain
        self.reason = reason
        super().__init__(f"MTA-STS policy cache unreadable for {domain}: {reason}")


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    domain: str
    policy_id: str
    policy: StsPolicy
    fetched_at: float
    checked_at: float
    expires_at: float

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


@dataclass(frozen=True, slots=True)
class FetchFailure:
    domain: str
    policy_id: str
    failed_at: float
    result_type: TlsResultType
    reason: str


class StsCache(Protocol):
    """What the manager and the refresher need of a policy cache (SQLite or PostgreSQL)."""

    async def get(self, domain: str) -> CachedPolicy | None: ...
    async def all(self) -> list[CachedPolicy]: ...
    async def put(self, cp: CachedPolicy) -> None: ...
    async def mark_checked(self, domain: str, checked_at: float) -> None: ...
    async def delete(self, domain: str) -> None: ...
    async def due(self, checked_before: float, expiring_before: float) -> list[str]: ...
    async def record_failure(self, f: FetchFailure) -> None: ...
    async def last_failure(self, domain: str, policy_id: str) -> FetchFailure | None: ...
    async def get_meta(self, key: str) -> str | None: ...
    async def set_meta(self, key: str, value: str) -> None: ...
    async def claim_meta(self, key: str, seen: str | None, value: str) -> bool: ...
    async def claim_fetch(self, domain: str, owner: str, now: float, until: float) -> bool: ...
    async def fetch_claimed(self, domain: str, now: float) -> bool: ...
    async def release_fetch(self, domain: str, owner: str) -> None: ...


def open_cache(store: Any) -> StsCache:
    """The policy cache on store: a ``PgStore`` (``[storage] url``, migrated at start by
    relay.pgschema) or the SQLite ``Store`` (migrated here)."""
    from relay.pgstore import PgStore

    if isinstance(store, PgStore):
        from relay.mtasts.cache_pg import PgPolicyCache

        return PgPolicyCache(store)
    return PolicyCache(store)


class PolicyCache:
    """Store-backed cache. ``open`` runs the migrations (synchronously, at start)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.migrate("mtasts", MIGRATIONS)

    # -------------------------------------------------------------- policies

    async def get(self, domain: str) -> CachedPolicy | None:
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT domain, policy_id, policy_text, fetched_at, checked_at, expires_at "
                "FROM mtasts_policy WHERE domain=?",
                (domain,),
            ).fetchone()
        )
        return _row(row) if row else None

    async def all(self) -> list[CachedPolicy]:
        rows = await self.store.read(_all_rows)
        return [cp for cp in (_row(r) for r in rows) if cp is not None]

    def all_sync(self) -> list[CachedPolicy]:
        return [cp for cp in (_row(r) for r in self.store.read_sync(_all_rows)) if cp is not None]

    async def put(self, cp: CachedPolicy) -> None:
        """Store a newly fetched policy; forget the failures recorded for the domain."""

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO mtasts_policy"
                "(domain, policy_id, policy_text, fetched_at, checked_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(domain) DO UPDATE SET "
                "policy_id=excluded.policy_id, policy_text=excluded.policy_text, "
                "fetched_at=excluded.fetched_at, checked_at=excluded.checked_at, "
                "expires_at=excluded.expires_at",
                (
                    cp.domain,
                    cp.policy_id,
                    cp.policy.text,
                    cp.fetched_at,
                    cp.checked_at,
                    cp.expires_at,
                ),
            )
            c.execute("DELETE FROM mtasts_failure WHERE domain=?", (cp.domain,))

        await self.store.write(fn)

    async def mark_checked(self, domain: str, checked_at: float) -> None:
        await self.store.write(
            lambda c: c.execute(
                "UPDATE mtasts_policy SET checked_at=? WHERE domain=?", (checked_at, domain)
            )
        )

    async def delete(self, domain: str) -> None:
        def fn(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM mtasts_policy WHERE domain=?", (domain,))
            c.execute("DELETE FROM mtasts_failure WHERE domain=?", (domain,))

        await self.store.write(fn)

    async def due(self, checked_before: float, expiring_before: float) -> list[str]:
        """Domains last checked before checked_before or expiring before expiring_before."""
        rows = await self.store.read(
            lambda c: c.execute(
                "SELECT domain FROM mtasts_policy WHERE checked_at<=? OR expires_at<=? "
                "ORDER BY expires_at",
                (checked_before, expiring_before),
            ).fetchall()
        )
        return [str(r[0]) for r in rows]

    # -------------------------------------------------------------- failures

    async def record_failure(self, f: FetchFailure) -> None:
        await self.store.write(
            lambda c: c.execute(
                "INSERT INTO mtasts_failure(domain, policy_id, failed_at, result_type, reason) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(domain, policy_id) DO UPDATE SET "
                "failed_at=excluded.failed_at, result_type=excluded.result_type, "
                "reason=excluded.reason",
                (f.domain, f.policy_id, f.failed_at, str(f.result_type), f.reason),
            )
        )

    async def last_failure(self, domain: str, policy_id: str) -> FetchFailure | None:
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT failed_at, result_type, reason FROM mtasts_failure "
                "WHERE domain=? AND policy_id=?",
                (domain, policy_id),
            ).fetchone()
        )
        if row is None:
            return None
        try:
            rtype = TlsResultType(row[1])
        except ValueError:
            rtype = TlsResultType.STS_POLICY_FETCH_ERROR
        return FetchFailure(domain, policy_id, float(row[0]), rtype, str(row[2]))

    # -------------------------------------------------------------- meta

    async def get_meta(self, key: str) -> str | None:
        row = await self.store.read(
            lambda c: c.execute("SELECT value FROM mtasts_meta WHERE key=?", (key,)).fetchone()
        )
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        await self.store.write(
            lambda c: c.execute(
                "INSERT INTO mtasts_meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )
        )

    async def claim_meta(self, key: str, seen: str | None, value: str) -> bool:
        """Set key to value only if it still holds ``seen`` (None: absent): the refresher
        claims a run this way, so processes sharing the cache do not run it twice."""

        def fn(c: sqlite3.Connection) -> bool:
            if seen is None:
                cur = c.execute(
                    "INSERT INTO mtasts_meta(key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (key, value),
                )
            else:
                cur = c.execute(
                    "UPDATE mtasts_meta SET value=? WHERE key=? AND value=?", (value, key, seen)
                )
            return cur.rowcount == 1

        return await self.store.write(fn)

    # -------------------------------------------------------------- fetch lease

    async def claim_fetch(self, domain: str, owner: str, now: float, until: float) -> bool:
        """Take the lease on fetching domain's policy until ``until``; False while another
        owner holds an unexpired one (it fetches; read its result)."""

        def fn(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "INSERT INTO mtasts_fetching(domain, owner, until) VALUES (?, ?, ?) "
                "ON CONFLICT(domain) DO UPDATE SET owner=excluded.owner, until=excluded.until "
                "WHERE mtasts_fetching.until <= ? OR mtasts_fetching.owner = excluded.owner",
                (domain, owner, until, now),
            )
            return cur.rowcount == 1

        return await self.store.write(fn)

    async def fetch_claimed(self, domain: str, now: float) -> bool:
        row = await self.store.read(
            lambda c: c.execute(
                "SELECT 1 FROM mtasts_fetching WHERE domain=? AND until > ?", (domain, now)
            ).fetchone()
        )
        return row is not None

    async def release_fetch(self, domain: str, owner: str) -> None:
        await self.store.write(
            lambda c: c.execute(
                "DELETE FROM mtasts_fetching WHERE domain=? AND owner=?", (domain, owner)
            )
        )


def _all_rows(c: sqlite3.Connection) -> list[tuple[object, ...]]:
    return list(
        c.execute(
            "SELECT domain, policy_id, policy_text, fetched_at, checked_at, expires_at "
            "FROM mtasts_policy ORDER BY domain"
        ).fetchall()
    )


def _row(row: Any) -> CachedPolicy | None:
    """A cached policy from a row of (domain, id, text, fetched, checked, expires) of
    either store; None (logged) when the stored text no longer parses."""
    domain, policy_id, text, fetched_at, checked_at, expires_at = row
    try:
        policy = parse_policy(str(text))
    except PolicyError as exc:  # re-validate what comes back from disk
        log.warning("mtasts_cache_row_invalid", domain=domain, error=str(exc))
        return None
    return CachedPolicy(
        domain=str(domain),
        policy_id=str(policy_id),
        policy=policy,
        fetched_at=float(fetched_at),
        checked_at=float(checked_at),
        expires_at=float(expires_at),
    )
