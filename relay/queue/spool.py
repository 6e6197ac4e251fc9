"""The queue's tables in the store, and every state transition of a message and its recipients.

A message row holds the sealed bytes exactly as they will be sent; each recipient row holds
its own state (queued, inflight, deferred, delivered, failed), attempt count, next attempt
time and last reply. ``enqueue`` returns only once the rows are fsync'd (group commit), so
the SMTP 250 may follow. Rows read back are re-validated; an unreadable message is moved
to the corrupt state rather than crashing the scheduler.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.model import QueueId, RecipientState
from relay.store import Store

MIGRATIONS = [
    """
    CREATE TABLE queue_messages (
        id TEXT PRIMARY KEY,
        mail_from TEXT NOT NULL,
        data BLOB NOT NULL,
        size INTEGER NOT NULL,
        message_id TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        flags INTEGER NOT NULL DEFAULT 0,
        delay_warned INTEGER NOT NULL DEFAULT 0,
        corrupt INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE queue_recipients (
        qid TEXT NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        orig TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        updated REAL NOT NULL DEFAULT 0,
        dsn_done INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (qid, address)
    );
    CREATE INDEX queue_recipients_due ON queue_recipients(state, next_attempt);
    """,
]

# message flags
FLAG_NO_TLS_REQUIRED = 1  # "TLS-Required: No" (RFC 8689): no MTA-STS enforcement, no TLS-RPT
FLAG_NO_DSN = 2  # never generate a DSN (NOTIFY=NEVER, or the message is itself a report)

PENDING_STATES = (RecipientState.QUEUED, RecipientState.DEFERRED, RecipientState.INFLIGHT)
_QID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZ"
_QID_TAILS = len(_QID_ALPHABET) ** 6


def new_qid(now: float | None = None) -> QueueId:
    """Short sortable queue id: time-derived prefix plus random suffix."""
    t = int((now if now is not None else time.time()) * 1000)
    head = ""
    for _ in range(9):
        t, r = divmod(t, len(_QID_ALPHABET))
        head = _QID_ALPHABET[r] + head
    r = secrets.randbelow(_QID_TAILS)  # one draw from the OS (not one per character)
    tail = ""
    for _ in range(6):
        r, d = divmod(r, len(_QID_ALPHABET))
        tail += _QID_ALPHABET[d]
    return head + tail


_MSGID_RE = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)


def extract_message_id(data: bytes) -> str:
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    m = _MSGID_RE.search(head)
    return m.group(1).strip().decode("ascii", "replace")[:250] if m else ""


@dataclass(frozen=True, slots=True)
class NewMessage:
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    orig_recipients: tuple[str, ...] = ()  # the address given at RCPT, per recipient
    flags: int = 0
    message_id: str | None = None  # None: taken from data's header when needed

    def msgid(self) -> str:
        """The Message-ID field's value ("" when none), computed once by whoever built it."""
        return self.message_id if self.message_id is not None else extract_message_id(self.data)

    def recipient_pairs(self) -> list[tuple[str, str]]:
        """(address, original address) per recipient, the first of each address only."""
        return _dedupe(zip(self.recipients, self.orig_recipients or self.recipients, strict=True))


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    address: str
    state: RecipientState
    attempts: int
    next_attempt: float
    last_reply: str
    orig: str = ""
    dsn_done: bool = False


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: QueueId
    mail_from: str
    size: int
    message_id: str
    created: float
    flags: int
    recipients: tuple[QueuedRecipient, ...]
    delay_warned: bool = False

    def pending(self) -> tuple[QueuedRecipient, ...]:
        return tuple(r for r in self.recipients if r.state in PENDING_STATES)


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    address: str
    state: RecipientState
    reply: str
    next_attempt: float = 0.0


class Spool:
    """Queue tables over a Store."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        store.migrate("queue", MIGRATIONS)

    # ------------------------------------------------------------ writes

    async def enqueue(
        self, msg: NewMessage, qid: QueueId | None = None, *, claimed: bool = False
    ) -> QueueId:
        """Write the message and its recipients durably; return the queue id.

        ``claimed``: the caller delivers it at once, so the recipients are written in
        flight (no other scheduler may load them; a crash requeues them at start)."""
        now = self.clock()
        qid = qid or new_qid(now)
        mid = msg.msgid()
        state = RecipientState.INFLIGHT if claimed else RecipientState.QUEUED
        rows = [(qid, a, o, state.value, now) for a, o in msg.recipient_pairs()]

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO queue_messages(id, mail_from, data, size, message_id, created, flags)"
                " VALUES(?,?,?,?,?,?,?)",
                (qid, msg.mail_from, msg.data, len(msg.data), mid, now, msg.flags),
            )
            conn.executemany(
                "INSERT INTO queue_recipients(qid, address, orig, state, next_attempt)"
                " VALUES(?,?,?,?,?)",
                rows,
            )

        await self.store.write(run)
        return qid

    async def mark_inflight(self, qid: QueueId, addresses: Sequence[str]) -> None:
        now = self.clock()

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE queue_recipients SET state=?, updated=? WHERE qid=? AND address=?",
                [(RecipientState.INFLIGHT.value, now, qid, a) for a in addresses],
            )

        await self.store.write(run)

    async def record(
        self, qid: QueueId, updates: Sequence[RecipientUpdate]
    ) -> tuple[bool, tuple[QueuedRecipient, ...]]:
        """Store the outcome of an attempt (one attempt more for each recipient), in one
        write: the message is deleted when nothing is pending and no failure awaits its
        DSN. Returns (removed, failed recipients whose DSN is still to be sent)."""
        now = self.clock()

        def run(conn: sqlite3.Connection) -> tuple[bool, tuple[QueuedRecipient, ...]]:
            conn.executemany(
                "UPDATE queue_recipients SET state=?, attempts=attempts+1, next_attempt=?,"
                " last_reply=?, updated=? WHERE qid=? AND address=?",
                [
                    (u.state.value, u.next_attempt, u.reply[:1000], now, qid, u.address)
                    for u in updates
                ],
            )
            return _settle(conn, qid, ())

        return await self.store.write(run)

    async def finish(self, qid: QueueId, dsn_addresses: Iterable[str] = ()) -> bool:
        """Mark DSNs done for addresses; delete the message when nothing is left to do.
        Returns True when the message was removed."""
        addrs = tuple(dsn_addresses)

        def run(conn: sqlite3.Connection) -> bool:
            return _settle(conn, qid, addrs)[0]

        return await self.store.write(run)

    async def set_delay_warned(self, qid: QueueId) -> None:
        await self.store.write(
            lambda c: c.execute("UPDATE queue_messages SET delay_warned=1 WHERE id=?", (qid,))
        )

    async def mark_corrupt(self, qid: QueueId) -> None:
        await self.store.write(
            lambda c: c.execute("UPDATE queue_messages SET corrupt=1 WHERE id=?", (qid,))
        )

    def recover_sync(self) -> int:
        """At start: every recipient left in flight by a crash is queued again."""

        def run(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE queue_recipients SET state=?, next_attempt=0 WHERE state=?",
                (RecipientState.QUEUED.value, RecipientState.INFLIGHT.value),
            )
            return cur.rowcount

        return self.store.write_sync(run)

    async def flush(self) -> int:
        """Make every deferred recipient due now."""
        return await self.store.write(_flush)

    async def delete(self, qid: QueueId) -> bool:
        return await self.store.write(
            lambda c: c.execute("DELETE FROM queue_messages WHERE id=?", (qid,)).rowcount > 0
        )

    # ------------------------------------------------------------ reads

    async def due(self, now: float, limit: int, exclude: set[QueueId]) -> list[QueueId]:
        def run(conn: sqlite3.Connection) -> list[QueueId]:
            rows = conn.execute(
                "SELECT DISTINCT r.qid FROM queue_recipients r JOIN queue_messages m"
                " ON m.id=r.qid WHERE r.state IN (?,?) AND r.next_attempt<=? AND m.corrupt=0"
                " ORDER BY r.next_attempt LIMIT ?",
                (
                    RecipientState.QUEUED.value,
                    RecipientState.DEFERRED.value,
                    now,
                    limit + len(exclude),
                ),
            ).fetchall()
            return [r[0] for r in rows if r[0] not in exclude][:limit]

        return await self.store.read(run)

    async def next_due(self) -> float | None:
        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(next_attempt) FROM queue_recipients WHERE state IN (?,?)",
                (RecipientState.QUEUED.value, RecipientState.DEFERRED.value),
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self.store.read(run)

    async def load(self, qid: QueueId) -> tuple[QueuedMessage, bytes] | None:
        return await self.store.read(lambda c: _load(c, qid, with_data=True))

    async def get(self, qid: QueueId) -> QueuedMessage | None:
        res = await self.store.read(lambda c: _load(c, qid, with_data=False))
        return None if res is None else res[0]

    async def list(self) -> list[QueuedMessage]:
        return await self.store.read(_list)


def _settle(
    conn: sqlite3.Connection, qid: str, dsn_done: Sequence[str]
) -> tuple[bool, tuple[QueuedRecipient, ...]]:
    conn.executemany(
        "UPDATE queue_recipients SET dsn_done=1 WHERE qid=? AND address=?",
        [(qid, a) for a in dsn_done],
    )
    rcpts = _recipients(conn, qid)
    pending = [r for r in rcpts if r.state in PENDING_STATES]
    failed = tuple(r for r in rcpts if r.state is RecipientState.FAILED and not r.dsn_done)
    if not pending and not failed:
        conn.execute("DELETE FROM queue_messages WHERE id=?", (qid,))
        return True, ()
    return False, failed


def _flush(conn: sqlite3.Connection) -> int:
    return conn.execute(
        "UPDATE queue_recipients SET next_attempt=0 WHERE state IN (?,?)",
        (RecipientState.DEFERRED.value, RecipientState.QUEUED.value),
    ).rowcount


def _dedupe(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for a, o in pairs:
        key = a.lower()
        if key not in seen:
            seen.add(key)
            out.append((a, o))
    return out


def _recipients(conn: sqlite3.Connection, qid: str) -> tuple[QueuedRecipient, ...]:
    rows = conn.execute(
        "SELECT address, state, attempts, next_attempt, last_reply, orig, dsn_done"
        " FROM queue_recipients WHERE qid=? ORDER BY rowid",
        (qid,),
    ).fetchall()
    return tuple(
        QueuedRecipient(
            address=r[0],
            state=RecipientState(r[1]),
            attempts=r[2],
            next_attempt=r[3],
            last_reply=r[4],
            orig=r[5],
            dsn_done=bool(r[6]),
        )
        for r in rows
    )


_MSG_COLS = "id, mail_from, size, message_id, created, flags, delay_warned"


def _msg(conn: sqlite3.Connection, row: tuple[Any, ...]) -> QueuedMessage:
    qid = str(row[0])
    return QueuedMessage(
        id=qid,
        mail_from=str(row[1]),
        size=int(row[2]),
        message_id=str(row[3]),
        created=float(row[4]),
        flags=int(row[5]),
        delay_warned=bool(row[6]),
        recipients=_recipients(conn, qid),
    )


def _load(
    conn: sqlite3.Connection, qid: str, with_data: bool
) -> tuple[QueuedMessage, bytes] | None:
    row = conn.execute(
        f"SELECT {_MSG_COLS}, data FROM queue_messages WHERE id=?", (qid,)
    ).fetchone()
    if row is None:
        return None
    data = row[7] if with_data else b""
    if with_data and (not isinstance(data, bytes) or len(data) != row[2]):
        raise ValueError(f"queue message {qid} is corrupt (size mismatch)")
    return _msg(conn, row[:7]), data


def _list(conn: sqlite3.Connection) -> list[QueuedMessage]:
    rows = conn.execute(f"SELECT {_MSG_COLS} FROM queue_messages ORDER BY created").fetchall()
    return [_msg(conn, r) for r in rows]
