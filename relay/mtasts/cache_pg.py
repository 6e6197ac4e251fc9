"""The MTA-STS policy cache (relay/mtasts/cache.py: the same tables, rows and answers) on
the PostgreSQL store (``[storage] url``), shared by every node.

A node that is about to fetch a domain's policy takes the domain's row in
``mtasts_fetching`` (one statement: the insert wins, or the update wins only over an
expired lease); the other nodes see the lease, wait for it to go and read the policy (or
the failure) the holder stored: one fetch per policy change or refresh across the nodes
(relay.mtasts.manager). The refresher's last run is claimed with a compare-and-set on
``mtasts_meta`` so one node runs each round.

A read that fails (the connection lost, the server down) raises ``StoreError`` like the
SQLite cache's, which the manager turns into ``CacheUnavailable``: fail closed, never "no
policy" (RFC 8461 section 5). Rows are parsed again on the way out (relay.mtasts.cache).
"""

from __future__ import annotations

from relay.model import TlsResultType
from relay.mtasts.cache import CachedPolicy, FetchFailure, _row
from relay.pgstore import Conn, PgStore, rowcount

MIGRATIONS = [
    """
    CREATE TABLE mtasts_policy (
        domain text PRIMARY KEY,
        policy_id text NOT NULL,
        policy_text text NOT NULL,
        fetched_at double precision NOT NULL,
        checked_at double precision NOT NULL,
        expires_at double precision NOT NULL
    );
    CREATE INDEX mtasts_policy_checked ON mtasts_policy(checked_at);
    CREATE TABLE mtasts_failure (
        domain text NOT NULL,
        policy_id text NOT NULL,
        failed_at double precision NOT NULL,
        result_type text NOT NULL,
        reason text NOT NULL,
        PRIMARY KEY (domain, policy_id)
    );
    CREATE TABLE mtasts_meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE mtasts_fetching (
        domain text PRIMARY KEY,
        owner text NOT NULL,
        until double precision NOT NULL
    );
    """,
]

_COLUMNS = "domain, policy_id, policy_text, fetched_at, checked_at, expires_at"


class PgPolicyCache:
    """StsCache over a PgStore (migrated by relay.pgschema at start)."""

    def __init__(self, store: PgStore) -> None:
        self.store = store

    # -------------------------------------------------------------- policies

    async def get(self, domain: str) -> CachedPolicy | None:
        async def run(c: Conn) -> CachedPolicy | None:
            row = await c.fetchrow(f"SELECT {_COLUMNS} FROM mtasts_policy WHERE domain=$1", domain)
            return _row(tuple(row)) if row is not None else None

        return await self.store.read(run)

    async def all(self) -> list[CachedPolicy]:
        async def run(c: Conn) -> list[CachedPolicy]:
            rows = await c.fetch(f"SELECT {_COLUMNS} FROM mtasts_policy ORDER BY domain")
            return [cp for cp in (_row(tuple(r)) for r in rows) if cp is not None]

        return await self.store.read(run)

    async def put(self, cp: CachedPolicy) -> None:
        """Store a newly fetched policy; forget the failures recorded for the domain."""

        async def run(c: Conn) -> None:
            await c.execute(
                f"INSERT INTO mtasts_policy({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (domain) DO UPDATE SET policy_id=excluded.policy_id,"
                " policy_text=excluded.policy_text, fetched_at=excluded.fetched_at,"
                " checked_at=excluded.checked_at, expires_at=excluded.expires_at",
                cp.domain,
                cp.policy_id,
                cp.policy.text,
                cp.fetched_at,
                cp.checked_at,
                cp.expires_at,
            )
            await c.execute("DELETE FROM mtasts_failure WHERE domain=$1", cp.domain)

        await self.store.write(run)

    async def mark_checked(self, domain: str, checked_at: float) -> None:
        async def run(c: Conn) -> None:
            await c.execute(
                "UPDATE mtasts_policy SET checked_at=$1 WHERE domain=$2", checked_at, domain
            )

        await self.store.write(run, single=True)

    async def delete(self, domain: str) -> None:
        async def run(c: Conn) -> None:
            await c.execute("DELETE FROM mtasts_policy WHERE domain=$1", domain)
            await c.execute("DELETE FROM mtasts_failure WHERE domain=$1", domain)

        await self.store.write(run)

    async def due(self, checked_before: float, expiring_before: float) -> list[str]:
        async def run(c: Conn) -> list[str]:
            rows = await c.fetch(
                "SELECT domain FROM mtasts_policy WHERE checked_at<=$1 OR expires_at<=$2"
                " ORDER BY expires_at",
                checked_before,
                expiring_before,
            )
            return [str(r[0]) for r in rows]

        return await self.store.read(run)

    # -------------------------------------------------------------- failures

    async def record_failure(self, f: FetchFailure) -> None:
        async def run(c: Conn) -> None:
            await c.execute(
                "INSERT INTO mtasts_failure(domain, policy_id, failed_at, result_type, reason)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (domain, policy_id) DO UPDATE SET"
                " failed_at=excluded.failed_at, result_type=excluded.result_type,"
                " reason=excluded.reason",
                f.domain,
                f.policy_id,
                f.failed_at,
                str(f.result_type),
                f.reason,
            )

        await self.store.write(run, single=True)

    async def last_failure(self, domain: str, policy_id: str) -> FetchFailure | None:
        async def run(c: Conn) -> FetchFailure | None:
            row = await c.fetchrow(
                "SELECT failed_at, result_type, reason FROM mtasts_failure"
                " WHERE domain=$1 AND policy_id=$2",
                domain,
                policy_id,
            )
            if row is None:
                return None
            try:
                rtype = TlsResultType(row[1])
            except ValueError:
                rtype = TlsResultType.STS_POLICY_FETCH_ERROR
            return FetchFailure(domain, policy_id, float(row[0]), rtype, str(row[2]))

        return await self.store.read(run)

    # -------------------------------------------------------------- meta

    async def get_meta(self, key: str) -> str | None:
        async def run(c: Conn) -> str | None:
            v = await c.fetchval("SELECT value FROM mtasts_meta WHERE key=$1", key)
            return None if v is None else str(v)

        return await self.store.read(run)

    async def set_meta(self, key: str, value: str) -> None:
        async def run(c: Conn) -> None:
            await c.execute(
                "INSERT INTO mtasts_meta(key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                key,
                value,
            )

        await self.store.write(run, single=True)

    async def claim_meta(self, key: str, seen: str | None, value: str) -> bool:
        """Set key to value only if it still holds ``seen`` (None: absent): one node of
        those that found the refresher due wins the run."""

        async def run(c: Conn) -> bool:
            if seen is None:
                status = await c.execute(
                    "INSERT INTO mtasts_meta(key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    key,
                    value,
                )
            else:
                status = await c.execute(
                    "UPDATE mtasts_meta SET value=$1 WHERE key=$2 AND value=$3", value, key, seen
                )
            return rowcount(status) == 1

        return await self.store.write(run, single=True)

    # -------------------------------------------------------------- fetch lease

    async def claim_fetch(self, domain: str, owner: str, now: float, until: float) -> bool:
        """Take the lease on fetching domain's policy; False while another owner holds an
        unexpired one. One statement: two nodes claiming at once, one wins (the loser's
        insert turns into an update whose condition fails on the winner's row)."""

        async def run(c: Conn) -> bool:
            status = await c.execute(
                "INSERT INTO mtasts_fetching(domain, owner, until) VALUES ($1, $2, $3)"
                " ON CONFLICT (domain) DO UPDATE SET owner=excluded.owner, until=excluded.until"
                " WHERE mtasts_fetching.until <= $4 OR mtasts_fetching.owner = excluded.owner",
                domain,
                owner,
                until,
                now,
            )
            return rowcount(status) == 1

        return await self.store.write(run, single=True)

    async def fetch_claimed(self, domain: str, now: float) -> bool:
        async def run(c: Conn) -> bool:
            v = await c.fetchval(
                "SELECT 1 FROM mtasts_fetching WHERE domain=$1 AND until > $2", domain, now
            )
            return v is not None

        return await self.store.read(run)

    async def release_fetch(self, domain: str, owner: str) -> None:
        async def run(c: Conn) -> None:
            await c.execute(
                "DELETE FROM mtasts_fetching WHERE domain=$1 AND owner=$2", domain, owner
            )

        await self.store.write(run, single=True)
