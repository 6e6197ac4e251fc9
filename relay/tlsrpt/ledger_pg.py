"""The TLS-RPT ledger (relay/tlsrpt/ledger.py: the same tables, rows and answers) on the
PostgreSQL store (``[storage] url``), shared by every node.

- Counts: each node adds its in-memory counts with ``INSERT ... ON CONFLICT DO UPDATE SET
  count = count + excluded.count`` (rows in one key order on every node, so two nodes'
  flushes never deadlock), so a day's rows hold the sessions of every node.
- One report per policy domain and day: ``save_report`` runs under
  ``pg_advisory_xact_lock`` on (day, domain) — the first node to build stores its report;
  a second one building at the same moment gets the first's back (same report-id, the
  summed counts the first read), never a second report.
- One send per report and rua URI: before a try the sender claims the delivery row
  (``claim_delivery``: one conditional UPDATE, status pending, attempts as read, no live
  claim): one node sends, the other skips it. A node that dies holding a claim loses it
  when ``claim_until`` passes; the delivery is then tried again (at-least-once, as on
  SQLite: same report-id, collectors drop a duplicate).
- A discovery result never overwrites a built report (``set_report_state`` updates only a
  row without a report-id: a node whose lookup failed cannot mark another's sent report
  ``no-record``).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from relay.pgstore import Conn, PgStore, rowcount
from relay.tlsrpt.ledger import (
    _KEY_COLUMNS,
    Delivery,
    DeliveryStatus,
    ReportRecord,
    ReportState,
    TlsLedger,
    _delivery,
    _row,
    day_start,
    utc_day,
)
from relay.tlsrpt.report import CountRow

MIGRATIONS = [
    """
    CREATE TABLE tlsrpt_counts (
        day text NOT NULL,
        policy_domain text NOT NULL,
        policy_type text NOT NULL,
        policy_strings text NOT NULL,
        mx_patterns text NOT NULL,
        mx_host text NOT NULL,
        receiving_ip text NOT NULL,
        sending_mta_ip text NOT NULL,
        result_type text NOT NULL,
        failure_reason text NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (day, policy_domain, policy_type, policy_strings, mx_patterns, mx_host,
                     receiving_ip, sending_mta_ip, result_type, failure_reason)
    );
    CREATE TABLE tlsrpt_reports (
        day text NOT NULL,
        policy_domain text NOT NULL,
        state text NOT NULL,
        report_id text NOT NULL DEFAULT '',
        report_json bytea NOT NULL DEFAULT '',
        created double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt double precision NOT NULL DEFAULT 0,
        last_error text NOT NULL DEFAULT '',
        PRIMARY KEY (day, policy_domain)
    );
    CREATE TABLE tlsrpt_deliveries (
        day text NOT NULL,
        policy_domain text NOT NULL,
        uri text NOT NULL,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        first_attempt double precision NOT NULL DEFAULT 0,
        next_attempt double precision NOT NULL DEFAULT 0,
        last_error text NOT NULL DEFAULT '',
        qid text NOT NULL DEFAULT '',
        updated double precision NOT NULL DEFAULT 0,
        claim_owner text NOT NULL DEFAULT '',
        claim_until double precision NOT NULL DEFAULT 0,
        PRIMARY KEY (day, policy_domain, uri),
        FOREIGN KEY (day, policy_domain) REFERENCES tlsrpt_reports(day, policy_domain)
            ON DELETE CASCADE
    );
    CREATE INDEX tlsrpt_deliveries_due ON tlsrpt_deliveries(status, next_attempt);
    """,
    # each ledger's (a worker of a node) watermark: every outcome it counted before
    # ``through`` is in tlsrpt_counts; a day's reports wait for the nodes that were
    # counting shortly before its midnight to have flushed past it
    """
    CREATE TABLE tlsrpt_flushed (
        owner text PRIMARY KEY,
        through double precision NOT NULL
    );
    """,
]

# A ledger whose watermark was this close before a day's end was counting then: the
# day's reports wait for it to flush past the midnight (its counts in memory), at most
# SETTLE_MAX after the midnight (a node that died then: its counts are lost anyway).
ALIVE_BEFORE_MIDNIGHT = 600.0
SETTLE_MAX = 3600.0
MARK_EVERY = 60.0  # an idle ledger still stores its watermark this often

_DELIVERY_COLUMNS = (
    "day, policy_domain, uri, status, attempts, first_attempt, next_attempt, last_error, qid"
)


class PgTlsRptLedger(TlsLedger):
    """TlsLedger over a PgStore (migrated by relay.pgschema at start)."""

    def __init__(
        self,
        store: PgStore,
        clock: Callable[[], float] = time.time,
        *,
        flush_interval: float = 1.0,
        owner: str = "",
    ) -> None:
        super().__init__(clock, flush_interval=flush_interval)
        self.store = store
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self._marked = 0.0  # the watermark last stored

    async def _add_counts(self, rows: list[tuple[Any, ...]], through: float) -> None:
        """The counts and this ledger's watermark, in one transaction."""

        async def run(c: Conn) -> None:
            if rows:
                await c.executemany(
                    f"INSERT INTO tlsrpt_counts({_KEY_COLUMNS}, count)"
                    " VALUES($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)"
                    f" ON CONFLICT ({_KEY_COLUMNS})"
                    " DO UPDATE SET count = tlsrpt_counts.count + excluded.count",
                    rows,
                )
            await c.execute(
                "INSERT INTO tlsrpt_flushed(owner, through) VALUES($1, $2) ON CONFLICT (owner)"
                " DO UPDATE SET through = GREATEST(tlsrpt_flushed.through, excluded.through)",
                self.owner,
                through,
            )

        await self.store.write(run)
        self._marked = max(self._marked, through)

    def _wants_mark(self, through: float) -> bool:
        """Idle: the watermark every MARK_EVERY seconds, and at once past a midnight (the
        day's reports wait for it)."""
        return through - self._marked >= MARK_EVERY or utc_day(through) != utc_day(self._marked)

    async def settled(self, day_end: float, now: float) -> bool:
        """True once no ledger that was counting in the last ALIVE_BEFORE_MIDNIGHT
        seconds of the day is still behind its end (or SETTLE_MAX after it)."""
        if now >= day_end + SETTLE_MAX:
            return True

        async def run(c: Conn) -> bool:
            behind = await c.fetchval(
                "SELECT count(*) FROM tlsrpt_flushed WHERE through >= $1 AND through < $2",
                day_end - ALIVE_BEFORE_MIDNIGHT,
                day_end,
            )
            return not behind

        return await self.store.read(run)

    # ---------------------------------------------------------------- reading counts

    async def days(self, before: str | None = None) -> list[str]:
        async def run(c: Conn) -> list[str]:
            if before is None:
                rows = await c.fetch("SELECT DISTINCT day FROM tlsrpt_counts ORDER BY day")
            else:
                rows = await c.fetch(
                    "SELECT DISTINCT day FROM tlsrpt_counts WHERE day < $1 ORDER BY day", before
                )
            return [str(r[0]) for r in rows]

        return await self.store.read(run)

    async def domains(self, day: str) -> list[str]:
        async def run(c: Conn) -> list[str]:
            rows = await c.fetch(
                "SELECT DISTINCT policy_domain FROM tlsrpt_counts WHERE day=$1 AND count > 0"
                " ORDER BY policy_domain",
                day,
            )
            return [str(r[0]) for r in rows]

        return await self.store.read(run)

    async def counts(self, day: str, domain: str | None = None) -> list[CountRow]:
        async def run(c: Conn) -> list[CountRow]:
            sql = f"SELECT {_KEY_COLUMNS}, count FROM tlsrpt_counts WHERE day=$1"
            args: tuple[str, ...] = (day,)
            if domain is not None:
                sql += " AND policy_domain=$2"
                args = (day, domain.lower())
            rows = await c.fetch(sql + f" ORDER BY {_KEY_COLUMNS}", *args)
            return [_row(tuple(r)) for r in rows]

        return await self.store.read(run)

    async def prune(self, before_day: str) -> int:
        async def run(c: Conn) -> int:
            a = await c.execute("DELETE FROM tlsrpt_counts WHERE day < $1", before_day)
            b = await c.execute("DELETE FROM tlsrpt_reports WHERE day < $1", before_day)
            # the watermarks of ledgers gone since before that day
            await c.execute(
                "DELETE FROM tlsrpt_flushed WHERE through < $1",
                day_start(before_day),
            )
            return rowcount(a) + rowcount(b)

        return await self.store.write(run)

    # ---------------------------------------------------------------- report state

    async def report(self, day: str, domain: str) -> ReportRecord | None:
        async def run(c: Conn) -> ReportRecord | None:
            return await _load_report(c, day, domain.lower())

        return await self.store.read(run)

    async def reports(self, day: str | None = None) -> list[ReportRecord]:
        async def run(c: Conn) -> list[ReportRecord]:
            if day is None:
                keys = await c.fetch(
                    "SELECT day, policy_domain FROM tlsrpt_reports ORDER BY day, policy_domain"
                )
            else:
                keys = await c.fetch(
                    "SELECT day, policy_domain FROM tlsrpt_reports WHERE day=$1"
                    " ORDER BY policy_domain",
                    day,
                )
            out = []
            for d, dom in keys:
                rec = await _load_report(c, str(d), str(dom))
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
        """Record a state without a report (DISCOVER, NO_RECORD, EXPIRED); a report built
        meanwhile (by another node) is kept."""
        now = self.clock()

        async def run(c: Conn) -> None:
            await c.execute(
                "INSERT INTO tlsrpt_reports(day, policy_domain, state, created, attempts,"
                " next_attempt, last_error) VALUES($1,$2,$3,$4,1,$5,$6)"
                " ON CONFLICT (day, policy_domain) DO UPDATE SET state=excluded.state,"
                " attempts=tlsrpt_reports.attempts+1, next_attempt=excluded.next_attempt,"
                " last_error=excluded.last_error WHERE tlsrpt_reports.report_id = ''",
                day,
                domain.lower(),
                state.value,
                now,
                next_attempt,
                error[:500],
            )

        await self.store.write(run, single=True)

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
        """Store a built report and one pending delivery per URI, unless a report is
        built for (day, domain) already — by this node or another: that one is returned.
        Under the (day, domain) advisory lock, so two nodes never both store one."""
        now = self.clock()
        dom = domain.lower()

        async def run(c: Conn) -> ReportRecord:
            await c.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended("
                "'relay tlsrpt report ' || $1 || ' ' || $2, 0))",
                day,
                dom,
            )
            existing = await _load_report(c, day, dom)
            if existing is not None and existing.report_id:
                return existing
            await c.execute(
                "INSERT INTO tlsrpt_reports(day, policy_domain, state, report_id, report_json,"
                " created) VALUES($1,$2,$3,$4,$5,$6) ON CONFLICT (day, policy_domain) DO UPDATE"
                " SET state=excluded.state, report_id=excluded.report_id,"
                " report_json=excluded.report_json, next_attempt=0, last_error=''",
                day,
                dom,
                ReportState.SENDING.value,
                report_id,
                report_json,
                now,
            )
            await c.executemany(
                "INSERT INTO tlsrpt_deliveries(day, policy_domain, uri, status, next_attempt,"
                " updated) VALUES($1,$2,$3,$4,$5,$6) ON CONFLICT DO NOTHING",
                [(day, dom, u, DeliveryStatus.PENDING.value, next_attempt, now) for u in uris],
            )
            rec = await _load_report(c, day, dom)
            assert rec is not None
            return rec

        return await self.store.write(run)

    async def claim_delivery(self, d: Delivery, until: float) -> Delivery | None:
        """Take d for one try until ``until``: one conditional UPDATE, so of two nodes
        claiming it at once one gets it; None when another node holds it or tried it
        since d was read (its attempts moved) or it is no longer pending."""
        now = self.clock()

        async def run(c: Conn) -> Delivery | None:
            row = await c.fetchrow(
                "UPDATE tlsrpt_deliveries SET claim_owner=$1, claim_until=$2"
                " WHERE day=$3 AND policy_domain=$4 AND uri=$5 AND status=$6 AND attempts=$7"
                " AND (claim_until <= $8 OR claim_owner = $1)"
                f" RETURNING {_DELIVERY_COLUMNS}",
                self.owner,
                until,
                d.day,
                d.policy_domain,
                d.uri,
                DeliveryStatus.PENDING.value,
                d.attempts,
                now,
            )
            return None if row is None else _delivery(tuple(row))

        return await self.store.write(run, single=True)

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
        """Record one delivery try (and drop the claim); the report becomes DONE once no
        delivery is pending. Under the report row's lock: two nodes finishing the last two
        deliveries of one report at once cannot both leave it SENDING."""
        now = self.clock()
        dom = domain.lower()

        async def run(c: Conn) -> ReportState:
            await c.execute(
                "SELECT 1 FROM tlsrpt_reports WHERE day=$1 AND policy_domain=$2 FOR UPDATE",
                day,
                dom,
            )
            await c.execute(
                "UPDATE tlsrpt_deliveries SET status=$1, attempts=$2, first_attempt=$3,"
                " next_attempt=$4, last_error=$5, qid=$6, updated=$7, claim_owner='',"
                " claim_until=0 WHERE day=$8 AND policy_domain=$9 AND uri=$10",
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
            )
            left = await c.fetchval(
                "SELECT count(*) FROM tlsrpt_deliveries WHERE day=$1 AND policy_domain=$2"
                " AND status=$3",
                day,
                dom,
                DeliveryStatus.PENDING.value,
            )
            state = ReportState.SENDING if left else ReportState.DONE
            await c.execute(
                "UPDATE tlsrpt_reports SET state=$1 WHERE day=$2 AND policy_domain=$3",
                state.value,
                day,
                dom,
            )
            return state

        return await self.store.write(run)

    async def due_deliveries(self, now: float) -> list[Delivery]:
        """Pending deliveries whose next attempt is due and that no node holds."""

        async def run(c: Conn) -> list[Delivery]:
            rows = await c.fetch(
                f"SELECT {_DELIVERY_COLUMNS} FROM tlsrpt_deliveries"
                " WHERE status=$1 AND next_attempt <= $2 AND claim_until <= $2"
                " ORDER BY day, policy_domain, uri",
                DeliveryStatus.PENDING.value,
                now,
            )
            return [_delivery(tuple(r)) for r in rows]

        return await self.store.read(run)

    async def next_due(self) -> float | None:
        async def run(c: Conn) -> float | None:
            a = await c.fetchval(
                "SELECT min(greatest(next_attempt, claim_until)) FROM tlsrpt_deliveries"
                " WHERE status=$1",
                DeliveryStatus.PENDING.value,
            )
            b = await c.fetchval(
                "SELECT min(next_attempt) FROM tlsrpt_reports WHERE state=$1",
                ReportState.DISCOVER.value,
            )
            vals = [float(v) for v in (a, b) if v is not None]
            return min(vals) if vals else None

        return await self.store.read(run)


async def _load_report(c: Conn, day: str, domain: str) -> ReportRecord | None:
    row = await c.fetchrow(
        "SELECT state, report_id, report_json, created, attempts, next_attempt, last_error"
        " FROM tlsrpt_reports WHERE day=$1 AND policy_domain=$2",
        day,
        domain,
    )
    if row is None:
        return None
    rows = await c.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM tlsrpt_deliveries WHERE day=$1 AND policy_domain=$2"
        " ORDER BY uri",
        day,
        domain,
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
        deliveries=tuple(_delivery(tuple(r)) for r in rows),
    )
