"""The TLS-RPT ledger (RFC 8460 section 4): session counts and report delivery state in
the store (tables ``tlsrpt_*``).

``record`` is what delivery calls, once per connection attempt to an MTA (as Postfix's
TLSRPT support does): it only adds one to an in-memory counter and returns, so delivery
never waits for the disk. A background task (``run``) writes the counters to the store
about every second, in one group commit, as additions to the day's rows; ``close``
writes what is left. A failed write keeps the counts in memory for the next try.

Counts are kept per UTC day and policy domain: successful sessions per applied policy
(type, policy strings, MX patterns), failures additionally per MX host, receiving IP,
sending MTA IP, result type and failure reason.

The ledger also keeps the sent-report state, so that a restart neither resends nor
loses a report: one row per (day, domain) with the report-id, the report JSON exactly as
first built, and its state; one row per (day, domain, rua URI) with the delivery status,
attempts, next attempt and last error.

``TlsLedger`` is the counting half and the interface; ``TlsRptLedger`` keeps the rows in
the SQLite store, ``PgTlsRptLedger`` (relay.tlsrpt.ledger_pg) in PostgreSQL, shared by
several nodes; ``open_ledger(store)`` picks the one for a store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from relay.errors import StoreError
from relay.model import TlsOutcome
from relay.store import Store
from relay.tlsrpt.report import CountRow

log = structlog.get_logger("relay.tlsrpt.ledger")

MIGRATIONS = [
    """
    CREATE TABLE tlsrpt_counts (
        day TEXT NOT NULL,
        policy_domain TEXT NOT NULL,
        policy_type TEXT NOT NULL,
        policy_strings TEXT NOT NULL,
        mx_patterns TEXT NOT NULL,
        mx_host TEXT NOT NULL,
        receiving_ip TEXT NOT NULL,
        sending_mta_ip TEXT NOT NULL,
        result_type TEXT NOT NULL,
        failure_reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (day, policy_domain, policy_type, policy_strings, mx_patterns, mx_host,
                     receiving_ip, sending_mta_ip, result_type, failure_reason)
    );
    CREATE TABLE tlsrpt_reports (
        day TEXT NOT NULL,
        policy_domain TEXT NOT NULL,
        state TEXT NOT NULL,
        report_id TEXT NOT NULL DEFAULT '',
        report_json BLOB NOT NULL DEFAULT x'',
        created REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (day, policy_domain)
    );
    CREATE TABLE tlsrpt_deliveries (
        day TEXT NOT NULL,
        policy_domain TEXT NOT NULL,
        uri TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        first_attempt REAL NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        qid TEXT NOT NULL DEFAULT '',
        updated REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (day, policy_domain, uri),
        FOREIGN KEY (day, policy_domain) REFERENCES tlsrpt_reports(day, policy_domain)
            ON DELETE CASCADE
    );
    CREATE INDEX tlsrpt_deliveries_due ON tlsrpt_deliveries(status, next_attempt)
    """,
]

MAX_REASON = 256  # characters of a failure reason kept
MAX_PENDING_KEYS = 100_000  # distinct keys held in memory while the store is failing

_KEY_COLUMNS = (
    "day, policy_domain, policy_type, policy_strings, mx_patterns, mx_host, receiving_ip, "
    "sending_mta_ip, result_type, failure_reason"
)

CountKey = tuple[str, str, str, str, str, str, str, str, str, str]


class ReportState(enum.StrEnum):
    DISCOVER = "discover"  # the TLSRPT record lookup failed temporarily; try again
    NO_RECORD = "no-record"  # the domain publishes no (valid) record: nothing to send
    SENDING = "sending"  # built; some deliveries pending
    DONE = "done"  # every delivery delivered, queued or given up
    EXPIRED = "expired"  # discovery kept failing for 24 hours


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # to try (again) at next_attempt
    DELIVERED = "delivered"  # https: the collector answered 2xx
    QUEUED = "queued"  # mailto: in our durable queue (qid)
    FAILED = "failed"  # given up (24 hours of retries, or a permanent error)


FINAL_REPORT_STATES = (ReportState.NO_RECORD, ReportState.DONE, ReportState.EXPIRED)


@dataclass(frozen=True, slots=True)
class Delivery:
    day: str
    policy_domain: str
    uri: str
    status: DeliveryStatus
    attempts: int = 0
    first_attempt: float = 0.0
    next_attempt: float = 0.0
    last_error: str = ""
    qid: str = ""


@dataclass(frozen=True, slots=True)
class ReportRecord:
    day: str
    policy_domain: str
    state: ReportState
    report_id: str
    report_json: bytes
    created: float
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    deliveries: tuple[Delivery, ...] = ()


def utc_day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def day_start(day: str) -> float:
    """The UTC midnight that starts ``day`` (YYYY-MM-DD), as a timestamp."""
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), tzinfo=dt.UTC).timestamp()


def outcome_key(outcome: TlsOutcome, day: str) -> CountKey:
    """The ledger row an outcome counts in. Successes drop the per-session fields."""
    ok = outcome.result_type is None
    return (
        outcome.day or day,
        outcome.policy_domain.rstrip(".").lower(),
        outcome.policy_type.value,
        json.dumps(list(outcome.policy_strings)),
        json.dumps(list(outcome.mx_patterns)),
        "" if ok else outcome.mx_host.rstrip(".").lower(),
        "" if ok else outcome.receiving_ip,
        "" if ok else outcome.sending_mta_ip,
        "" if ok or outcome.result_type is None else outcome.result_type.value,
        "" if ok else outcome.failure_reason[:MAX_REASON],
    )


def _row(r: tuple[object, ...]) -> CountRow:
    return CountRow(
        day=str(r[0]),
        policy_domain=str(r[1]),
        policy_type=str(r[2]),
        policy_strings=tuple(json.loads(str(r[3]))),
        mx_patterns=tuple(json.loads(str(r[4]))),
        mx_host=str(r[5]),
        receiving_ip=str(r[6]),
        sending_mta_ip=str(r[7]),
        result_type=str(r[8]),
        failure_reason=str(r[9]),
        count=int(r[10]),  # type: ignore[call-overload]
    )


class TlsLedger:
    """Counts TLS sessions per policy domain and UTC day in memory, writes them with
    ``_add_counts`` (the store's); the report-state methods are the store's too."""

    def __init__(self, clock: Callable[[], float] = time.time, *, flush_interval: float = 1.0):
        self.clock = clock
        self.flush_interval = flush_interval
        self._pending: Counter[CountKey] = Counter()
        self._flush_lock = asyncio.Lock()
        self.recorded = 0  # outcomes handed to record()
        self.dropped = 0  # outcomes lost because the store kept failing (logged)

    # ---------------------------------------------------------------- counting

    def record(self, outcome: TlsOutcome) -> None:
        """Count one session outcome. Never blocks, never raises for a full buffer."""
        key = outcome_key(outcome, utc_day(self.clock()))
        if key not in self._pending and len(self._pending) >= MAX_PENDING_KEYS:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("tlsrpt_outcome_dropped", dropped=self.dropped, reason="buffer full")
            return
        self._pending[key] += 1
        self.recorded += 1

    @property
    def pending(self) -> int:
        """Outcomes counted in memory, not yet written."""
        return sum(self._pending.values())

    async def flush(self) -> int:
        """Write the counts held in memory; returns how many outcomes were written.
        On a store failure the counts stay in memory and StoreError is raised. Every
        outcome counted before the flush began is then stored: on a shared store the
        write also says so (``through``, the flush's start), for ``settled``."""
        async with self._flush_lock:
            through = self.clock()
            if not self._pending:
                if self._wants_mark(through):
                    await self._add_counts([], through)
                return 0
            batch, self._pending = self._pending, Counter()
            rows = sorted((*k, n) for k, n in batch.items())  # one lock order on every node
            try:
                await self._add_counts(rows, through)
            except StoreError:  # rolled back: keep the counts for the next flush
                batch.update(self._pending)
                self._pending = batch
                raise
            return sum(batch.values())

    async def _add_counts(self, rows: list[tuple[Any, ...]], through: float) -> None:
        """Add rows of (key columns..., n) to the stored counts, in one transaction;
        every outcome this ledger counted before ``through`` is stored once it commits."""
        raise NotImplementedError

    def _wants_mark(self, through: float) -> bool:
        """Whether an idle flush should still store ``through`` (a shared store's)."""
        return False

    async def settled(self, day_end: float, now: float) -> bool:
        """Whether the counts of a day ending at ``day_end`` are all stored, so its
        reports can be built: on a store of one relay, once its own flush is done (the
        sender flushes first); a shared store waits for the other nodes too."""
        return True

    async def run(self) -> None:
        """Flush about every ``flush_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except StoreError as exc:
                log.error("tlsrpt_flush_failed", error=str(exc), pending=self.pending)

    async def close(self) -> None:
        """Write what is left (call before the store closes)."""
        try:
            await self.flush()
        except StoreError as exc:
            log.error("tlsrpt_flush_failed", error=str(exc), pending=self.pending, lost=True)

    # ---------------------------------------------------------------- the store's

    async def days(self, before: str | None = None) -> list[str]:
        raise NotImplementedError

    async def domains(self, day: str) -> list[str]:
        raise NotImplementedError

    async def counts(self, day: str, domain: str | None = None) -> list[CountRow]:
        raise NotImplementedError

    async def prune(self, before_day: str) -> int:
        raise NotImplementedError

    async def report(self, day: str, domain: str) -> ReportRecord | None:
        raise NotImplementedError

    async def reports(self, day: str | None = None) -> list[ReportRecord]:
        raise NotImplementedError

    async def set_report_state(
        self,
        day: str,
        domain: str,
        state: ReportState,
        *,
        next_attempt: float = 0.0,
        error: str = "",
    ) -> None:
        raise NotImplementedError

    async def save_report(
        self,
        day: str,
        domain: str,
        report_id: str,
        report_json: bytes,
        uris: Sequence[str],
        *,
        next_attempt: float = 0.0,
    ) -> ReportRecord:
        raise NotImplementedError

    async def update_delivery(
        self,
        day: str,
        domain: str,
        uri: str,
        status: DeliveryStatus,
        *,
        attempts: int,
        first_attempt: float,
        next_attempt: float = 0.0,
        error: str = "",
        qid: str = "",
    ) -> ReportState:
        raise NotImplementedError

    async def due_deliveries(self, now: float) -> list[Delivery]:
        raise NotImplementedError

    async def next_due(self) -> float | None:
        raise NotImplementedError

    async def claim_delivery(self, d: Delivery, until: float) -> Delivery | None:
        """Take delivery d for one try (until ``until``): the delivery as stored now, or
        None when another node tries it (or tried it since d was read). One process
        sends the SQLite store's reports: every claim is granted."""
        return d


def open_ledger(store: Any, clock: Callable[[], float] = time.time, **kw: Any) -> TlsLedger:
    """The ledger on store: ``PgTlsRptLedger`` for a ``PgStore`` (migrated at start by
    relay.pgschema; ``owner`` names this node in its claims), else ``TlsRptLedger``."""
    from relay.pgstore import PgStore

    if isinstance(store, PgStore):
        from relay.tlsrpt.ledger_pg import PgTlsRptLedger

        return PgTlsRptLedger(store, clock, **kw)
    kw.pop("owner", None)
    return TlsRptLedger(store, clock, **kw)


class TlsRptLedger(TlsLedger):
    """The ledger in the SQLite store (migrated here)."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float] = time.time,
        *,
        flush_interval: float = 1.0,
    ) -> None:
        super().__init__(clock, flush_interval=flush_interval)
        self.store = store
        store.migrate("tlsrpt", MIGRATIONS)

    async def _add_counts(self, rows: list[tuple[Any, ...]], through: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"INSERT INTO tlsrpt_counts({_KEY_COLUMNS}, count) "
                "VALUES(?,?,?,?,?,?,?,?,?,?,?) "
                f"ON CONFLICT({_KEY_COLUMNS}) DO UPDATE SET count = count + excluded.count",
                rows,
            )

        await self.store.write(run)

    # ---------------------------------------------------------------- reading counts

    async def days(self, before: str | None = None) -> list[str]:
        """Days that have counts (optionally only days before ``before``), oldest first."""

        def run(conn: sqlite3.Connection) -> list[str]:
            if before is None:
                cur = conn.execute("SELECT DISTINCT day FROM tlsrpt_counts ORDER BY day")
            else:
                cur = conn.execute(
                    "SELECT DISTINCT day FROM tlsrpt_counts WHERE day < ? ORDER BY day",
                    (before,),
                )
            return [str(r[0]) for r in cur]

        return await self.store.read(run)

    async def domains(self, day: str) -> list[str]:
        """Policy domains that had at least one session on day."""

        def run(conn: sqlite3.Connection) -> list[str]:
            cur = conn.execute(
                "SELECT DISTINCT policy_domain FROM tlsrpt_counts WHERE day=? AND count > 0 "
                "ORDER BY policy_domain",
                (day,),
            )
            return [str(r[0]) for r in cur]

        return await self.store.read(run)

    async def counts(self, day: str, domain: str | None = None) -> list[CountRow]:
        """The day's rows (of one domain, or all)."""

        def run(conn: sqlite3.Connection) -> list[CountRow]:
            sql = f"SELECT {_KEY_COLUMNS}, count FROM tlsrpt_counts WHERE day=?"
            args: tuple[str, ...] = (day,)
            if domain is not None:
                sql += " AND policy_domain=?"
                args = (day, domain.lower())
            return [_row(r) for r in conn.execute(sql + " ORDER BY rowid", args)]

        return await self.store.read(run)

    async def prune(self, before_day: str) -> int:
        """Delete counts and report state of days before before_day; returns rows gone."""

        def run(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM tlsrpt_counts WHERE day < ?", (before_day,)).rowcount
            n += conn.execute("DELETE FROM tlsrpt_reports WHERE day < ?", (before_day,)).rowcount
            return int(n)

        return await self.store.write(run)

    # ---------------------------------------------------------------- report state

    async def report(self, day: str, domain: str) -> ReportRecord | None:
        def run(conn: sqlite3.Connection) -> ReportRecord | None:
            return _load_report(conn, day, domain.lower())

        return await self.store.read(run)

    async def reports(self, day: str | None = None) -> list[ReportRecord]:
        def run(conn: sqlite3.Connection) -> list[ReportRecord]:
            if day is None:
                keys = conn.execute(
                    "SELECT day, policy_domain FROM tlsrpt_reports ORDER BY day, policy_domain"
                ).fetchall()
            else:
                keys = conn.execute(
                    "SELECT day, policy_domain FROM tlsrpt_reports WHERE day=? "
                    "ORDER BY policy_domain",
                    (day,),
                ).fetchall()
            out = []
            for d, dom in keys:
                rec = _load_report(conn, str(d), str(dom))
                if rec is not None:
                    out.append(rec)
            return out

        return await self.store.read(run)

    async def set_report_state(
        self,
        day: str,
        domain: str,
        state: ReportState,
        *,
        next_attempt: float = 0.0,
        error: str = "",
    ) -> None:
        """Record a state without a report (DISCOVER, NO_RECORD, EXPIRED)."""
        now = self.clock()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO tlsrpt_reports(day, policy_domain, state, created, attempts, "
                "next_attempt, last_error) VALUES(?,?,?,?,1,?,?) "
                "ON CONFLICT(day, policy_domain) DO UPDATE SET state=excluded.state, "
                "attempts=attempts+1, next_attempt=excluded.next_attempt, "
                "last_error=excluded.last_error",
                (day, domain.lower(), state.value, now, next_attempt, error[:500]),
            )

        await self.store.write(run)

    async def save_report(
        self,
        day: str,
        domain: str,
        report_id: str,
        report_json: bytes,
        uris: Sequence[str],
        *,
        next_attempt: float = 0.0,
    ) -> ReportRecord:
        """Store a built report and one pending delivery per URI (state SENDING), due at
        next_attempt. Idempotent: a report already built for (day, domain) is kept and
        returned."""
        now = self.clock()
        dom = domain.lower()

        def run(conn: sqlite3.Connection) -> ReportRecord:
            existing = _load_report(conn, day, dom)
            if existing is not None and existing.report_id:
                return existing
            conn.execute(
                "INSERT INTO tlsrpt_reports(day, policy_domain, state, report_id, report_json, "
                "created) VALUES(?,?,?,?,?,?) ON CONFLICT(day, policy_domain) DO UPDATE SET "
                "state=excluded.state, report_id=excluded.report_id, "
                "report_json=excluded.report_json, next_attempt=0, last_error=''",
                (day, dom, ReportState.SENDING.value, report_id, report_json, now),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO tlsrpt_deliveries(day, policy_domain, uri, status, "
                "next_attempt, updated) VALUES(?,?,?,?,?,?)",
                [(day, dom, u, DeliveryStatus.PENDING.value, next_attempt, now) for u in uris],
            )
            rec = _load_report(conn, day, dom)
            assert rec is not None
            return rec

        return await self.store.write(run)

    async def update_delivery(
        self,
        day: str,
        domain: str,
        uri: str,
        status: DeliveryStatus,
        *,
        attempts: int,
        first_attempt: float,
        next_attempt: float = 0.0,
        error: str = "",
        qid: str = "",
    ) -> ReportState:
        """Record one delivery try; the report becomes DONE once no delivery is pending.
        Returns the report's state."""
        now = self.clock()
        dom = domain.lower()

        def run(conn: sqlite3.Connection) -> ReportState:
            conn.execute(
                "UPDATE tlsrpt_deliveries SET status=?, attempts=?, first_attempt=?, "
                "next_attempt=?, last_error=?, qid=?, updated=? "
                "WHERE day=? AND policy_domain=? AND uri=?",
                (
                    status.value,
                    attempts,
                    first_attempt,
                    next_attempt,
                    error[:500],
                    qid,
                    now,
                    day,
                    dom,
                    uri,
                ),
            )
            left = conn.execute(
                "SELECT COUNT(*) FROM tlsrpt_deliveries WHERE day=? AND policy_domain=? "
                "AND status=?",
                (day, dom, DeliveryStatus.PENDING.value),
            ).fetchone()[0]
            state = ReportState.SENDING if left else ReportState.DONE
            conn.execute(
                "UPDATE tlsrpt_reports SET state=? WHERE day=? AND policy_domain=?",
                (state.value, day, dom),
            )
            return state

        return await self.store.write(run)

    async def due_deliveries(self, now: float) -> list[Delivery]:
        """Pending deliveries whose next attempt is due."""

        def run(conn: sqlite3.Connection) -> list[Delivery]:
            cur = conn.execute(
                "SELECT day, policy_domain, uri, status, attempts, first_attempt, "
                "next_attempt, last_error, qid FROM tlsrpt_deliveries "
                "WHERE status=? AND next_attempt <= ? ORDER BY day, policy_domain, uri",
                (DeliveryStatus.PENDING.value, now),
            )
            return [_delivery(r) for r in cur]

        return await self.store.read(run)

    async def next_due(self) -> float | None:
        """When the earliest pending delivery or discovery retry is due."""

        def run(conn: sqlite3.Connection) -> float | None:
            a = conn.execute(
                "SELECT MIN(next_attempt) FROM tlsrpt_deliveries WHERE status=?",
                (DeliveryStatus.PENDING.value,),
            ).fetchone()[0]
            b = conn.execute(
                "SELECT MIN(next_attempt) FROM tlsrpt_reports WHERE state=?",
                (ReportState.DISCOVER.value,),
            ).fetchone()[0]
            vals = [float(v) for v in (a, b) if v is not None]
            return min(vals) if vals else None

        return await self.store.read(run)


def _delivery(r: tuple[object, ...]) -> Delivery:
    return Delivery(
        day=str(r[0]),
        policy_domain=str(r[1]),
        uri=str(r[2]),
        status=DeliveryStatus(str(r[3])),
        attempts=int(r[4]),  # type: ignore[call-overload]
        first_attempt=float(r[5]),  # type: ignore[arg-type]
        next_attempt=float(r[6]),  # type: ignore[arg-type]
        last_error=str(r[7]),
        qid=str(r[8]),
    )


def _load_report(conn: sqlite3.Connection, day: str, domain: str) -> ReportRecord | None:
    row = conn.execute(
        "SELECT state, report_id, report_json, created, attempts, next_attempt, last_error "
        "FROM tlsrpt_reports WHERE day=? AND policy_domain=?",
        (day, domain),
    ).fetchone()
    if row is None:
        return None
    deliveries = tuple(
        _delivery(r)
        for r in conn.execute(
            "SELECT day, policy_domain, uri, status, attempts, first_attempt, next_attempt, "
            "last_error, qid FROM tlsrpt_deliveries WHERE day=? AND policy_domain=? "
            "ORDER BY uri",
            (day, domain),
        )
    )
    return ReportRecord(
        day=day,
        policy_domain=domain,
        state=ReportState(str(row[0])),
        report_id=str(row[1]),
        report_json=bytes(row[2]),
        created=float(row[3]),
        attempts=int(row[4]),
        next_attempt=float(row[5]),
        last_error=str(row[6]),
        deliveries=deliveries,
    )
