"""The ARC replay counters (relay/auth/replay.py, RFC 8617 section 9.5) on the PostgreSQL
store (``[storage] url``), shared by every node: the same two limits (recipients per seal
within the window, overrides per sealer and clock hour), the same answers.

Each admission is one transaction that first takes a transaction-scoped advisory lock on
the sealer, so two nodes admitting overrides of one sealer (or one seal: a seal belongs to
its sealer) at once are serialised and never both pass a limit that only one of them may
reach; admissions of different sealers do not wait for each other."""

from __future__ import annotations

from relay.auth.replay import ReplayLimits
from relay.pgstore import Conn, PgStore

MIGRATIONS = [
    """
    CREATE TABLE arc_replay_seal (
        fingerprint text PRIMARY KEY,
        sealer text NOT NULL,
        first_seen double precision NOT NULL,
        recipients integer NOT NULL
    );
    CREATE INDEX arc_replay_seal_first ON arc_replay_seal(first_seen);
    CREATE TABLE arc_replay_sealer (
        sealer text NOT NULL,
        hour bigint NOT NULL,
        overrides integer NOT NULL,
        PRIMARY KEY (sealer, hour)
    );
    """,
]


class PgArcReplayGuard:
    """ArcReplayGuard over a PgStore (migrated by relay.pgschema at start)."""

    def __init__(self, store: PgStore, limits: ReplayLimits) -> None:
        self.store = store
        self.limits = limits

    async def admit(self, sealer: str, fingerprint: str, recipients: int, now: float) -> str:
        """Count one override of ``recipients`` recipients; "" when admitted, else why not.
        Atomic across nodes (the sealer's advisory lock)."""
        limits = self.limits
        if limits.max_recipients and recipients > limits.max_recipients:
            return (
                f"{recipients} recipients exceed the {limits.max_recipients} a sealed "
                "message may carry"
            )

        async def run(conn: Conn) -> str:
            return await _admit(conn, limits, sealer, fingerprint, recipients, now)

        return await self.store.write(run)


async def _admit(
    conn: Conn, limits: ReplayLimits, sealer: str, fingerprint: str, recipients: int, now: float
) -> str:
    hour = int(now // 3600)
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('relay arc_replay ' || $1, 0))", sealer
    )
    await conn.execute("DELETE FROM arc_replay_seal WHERE first_seen < $1", now - limits.window)
    await conn.execute("DELETE FROM arc_replay_sealer WHERE hour < $1", hour - 1)
    if limits.max_recipients and fingerprint:
        seen = await conn.fetchval(
            "SELECT recipients FROM arc_replay_seal WHERE fingerprint=$1", fingerprint
        )
        seen = int(seen or 0)
        if seen + recipients > limits.max_recipients:
            return (
                f"seal of {sealer} already carried {seen} recipients "
                f"(limit {limits.max_recipients}): a replay"
            )
    if limits.per_sealer_hour:
        n = await conn.fetchval(
            "SELECT overrides FROM arc_replay_sealer WHERE sealer=$1 AND hour=$2", sealer, hour
        )
        if n is not None and int(n) >= limits.per_sealer_hour:
            return f"{sealer} reached its {limits.per_sealer_hour} overrides this hour"
        await conn.execute(
            "INSERT INTO arc_replay_sealer(sealer, hour, overrides) VALUES($1, $2, 1)"
            " ON CONFLICT (sealer, hour) DO UPDATE SET overrides = arc_replay_sealer.overrides + 1",
            sealer,
            hour,
        )
    if limits.max_recipients and fingerprint:
        await conn.execute(
            "INSERT INTO arc_replay_seal(fingerprint, sealer, first_seen, recipients)"
            " VALUES($1, $2, $3, $4) ON CONFLICT (fingerprint)"
            " DO UPDATE SET recipients = arc_replay_seal.recipients + excluded.recipients",
            fingerprint,
            sealer,
            now,
            recipients,
        )
    return ""
