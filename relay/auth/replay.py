"""ARC replay guard: how far one trusted seal and one trusted sealer may carry a DMARC
override (RFC 8617 section 9.5; threats.md row 22).

ARC binds headers and body, never the envelope: a message sealed once by a trusted
forwarder can be replayed to any number of recipients, and every copy would earn the
DMARC override. Two limits, both counted in the store so every relay worker shares them
and they survive a restart:

- per seal: recipients accepted under an override with the same newest ARC-Seal (its b=
  signature, hashed) within ``[arc] override_window`` seconds, at most ``[arc]
  override_max_recipients`` (a mailing list that sends one copy per subscriber reuses
  its seal, so the limit counts recipients, not transactions);
- per sealer: overrides a trusted sealer earns in one clock hour, at most ``[arc]
  override_per_sealer_hour``.

0 means no limit. A transaction that would pass a limit gets no override (and so the
DMARC policy applies); it is not counted, so a refused replay does not use up the
allowance of the genuine copies.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from typing import Protocol

from relay.auth.keys import signature_tags
from relay.message import Message
from relay.store import Store

MIGRATIONS = [
    "CREATE TABLE arc_replay_seal ("
    " fingerprint TEXT PRIMARY KEY, sealer TEXT NOT NULL,"
    " first_seen REAL NOT NULL, recipients INTEGER NOT NULL);"
    "CREATE INDEX arc_replay_seal_first ON arc_replay_seal(first_seen);"
    "CREATE TABLE arc_replay_sealer ("
    " sealer TEXT NOT NULL, hour INTEGER NOT NULL, overrides INTEGER NOT NULL,"
    " PRIMARY KEY (sealer, hour))",
]


def seal_fingerprint(message: Message, instance: int) -> str:
    """sha256 (hex) of the b= value of the ARC-Seal with i=instance, whitespace removed;
    "" when the message has no such seal."""
    from relay.auth.arc import arc_structure

    for arc_set in arc_structure(message).sets:
        if arc_set.instance == instance:
            b = signature_tags(arc_set.seal).get(b"b", b"")
            return hashlib.sha256(b).hexdigest() if b else ""
    return ""


@dataclass(frozen=True, slots=True)
class ReplayLimits:
    max_recipients: int = 50  # per seal within window; 0 = no limit
    window: float = 7 * 86400.0
    per_sealer_hour: int = 0  # 0 = no limit


class ReplayGuard(Protocol):
    """What the authenticator asks (this SQLite guard, or relay.auth.replay_pg's)."""

    async def admit(self, sealer: str, fingerprint: str, recipients: int, now: float) -> str: ...


class ArcReplayGuard:
    """Counts overrides per seal and per sealer in the store (table prefix arc_replay)."""

    def __init__(self, store: Store, limits: ReplayLimits) -> None:
        self.store = store
        self.limits = limits
        store.migrate("arc_replay", MIGRATIONS)

    async def admit(self, sealer: str, fingerprint: str, recipients: int, now: float) -> str:
        """Count one override of ``recipients`` recipients; "" when admitted, else why not
        (plain words, for the reply and the log). Atomic across relay processes."""
        limits = self.limits
        if limits.max_recipients and recipients > limits.max_recipients:
            return (
                f"{recipients} recipients exceed the {limits.max_recipients} a sealed "
                "message may carry"
            )

        def run(conn: sqlite3.Connection) -> str:
            return _admit(conn, limits, sealer, fingerprint, recipients, now)

        return await self.store.write(run)


def _admit(
    conn: sqlite3.Connection,
    limits: ReplayLimits,
    sealer: str,
    fingerprint: str,
    recipients: int,
    now: float,
) -> str:
    cutoff = now - limits.window
    hour = int(now // 3600)
    conn.execute("DELETE FROM arc_replay_seal WHERE first_seen < ?", (cutoff,))
    conn.execute("DELETE FROM arc_replay_sealer WHERE hour < ?", (hour - 1,))
    if limits.max_recipients and fingerprint:
        row = conn.execute(
            "SELECT recipients FROM arc_replay_seal WHERE fingerprint=?", (fingerprint,)
        ).fetchone()
        seen = int(row[0]) if row else 0
        if seen + recipients > limits.max_recipients:
            return (
                f"seal of {sealer} already carried {seen} recipients "
                f"(limit {limits.max_recipients}): a replay"
            )
    if limits.per_sealer_hour:
        row = conn.execute(
            "SELECT overrides FROM arc_replay_sealer WHERE sealer=? AND hour=?", (sealer, hour)
        ).fetchone()
        if row and int(row[0]) >= limits.per_sealer_hour:
            return f"{sealer} reached its {limits.per_sealer_hour} overrides this hour"
        conn.execute(
            "INSERT INTO arc_replay_sealer(sealer, hour, overrides) VALUES(?, ?, 1) "
            "ON CONFLICT(sealer, hour) DO UPDATE SET overrides = overrides + 1",
            (sealer, hour),
        )
    if limits.max_recipients and fingerprint:
        conn.execute(
            "INSERT INTO arc_replay_seal(fingerprint, sealer, first_seen, recipients) "
            "VALUES(?, ?, ?, ?) ON CONFLICT(fingerprint) "
            "DO UPDATE SET recipients = recipients + excluded.recipients",
            (fingerprint, sealer, now, recipients),
        )
    return ""
