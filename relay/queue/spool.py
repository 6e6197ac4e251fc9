"""The queue's tables in the store, and every state transition of a message and its recipients.

A message row holds the sealed bytes exactly as they will be sent; each recipient row holds
its own state, attempt count, next attempt time, last reply, its lease and whether its DSN
has been queued. ``enqueue`` returns only once the rows are fsync'd (group commit), so the
SMTP 250 may follow. Rows read back are re-validated; an unreadable message is moved to the
corrupt state rather than crashing the scheduler. docs/queue.md is the operator's account.

Recipient states and transitions (every arrow is one store transaction):

    queued | deferred (due) --claim--> inflight [lease: owner, expiry]
    new mail, claimed at intake ------> inflight [lease]
    inflight --outcome--> delivered | deferred (next_attempt) | failed [lease kept, dsn_done=0]
    inflight, lease expired --sweep---> queued (due now)
    failed, dsn_done=0 --DSN queued---> failed, dsn_done=1 (the DSN message is inserted in
                                        the same transaction; no DSN for <> or NO_DSN mail)
    nothing pending and no DSN owed --> the message is deleted (in the outcome's transaction)

A lease says "this owner (one process: host:pid:random) is working on the row until expiry";
a running attempt renews it, the outcome clears it (a failed row keeps it until its DSN is
queued). Every claim and every write of an outcome is conditional on the row's state and
lease, so several owners on one store never both claim a recipient and an owner whose lease
was taken over cannot overwrite the new owner's work. A crash leaves leases that expire:
``expire_leases`` (the sweeper) returns such rows to the queue, ``unreported`` finds failed
rows whose DSN is still owed, and at start ``recover_sync`` expires every other owner's lease
at once (one relay holds a SQLite store).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.model import ConnInfo, Envelope, QueueId, RecipientState
from relay.store import Store, address_domain

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
    # 2: leases (owner, expiry) instead of "inflight until the next start"
    """
    ALTER TABLE queue_recipients ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_recipients ADD COLUMN lease_expiry REAL NOT NULL DEFAULT 0;
    CREATE INDEX queue_recipients_lease ON queue_recipients(state, lease_expiry);
    """,
    # 3: hold, the stored envelope (for diagnose), a listing index, the attempt log
    """
    ALTER TABLE queue_messages ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE queue_messages ADD COLUMN client_ip TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_messages ADD COLUMN helo TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_messages ADD COLUMN env_from TEXT;
    CREATE INDEX queue_messages_created ON queue_messages(created, id);
    CREATE TABLE queue_log (
        qid TEXT NOT NULL,
        at REAL NOT NULL,
        address TEXT NOT NULL DEFAULT '',
        event TEXT NOT NULL,
        reply TEXT NOT NULL DEFAULT '',
        mx_host TEXT NOT NULL DEFAULT '',
        tls TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX queue_log_qid ON queue_log(qid, at);
    CREATE INDEX queue_log_at ON queue_log(at);
    """,
    # 4: the DSN extension (RFC 3461): RET and ENVID per message, NOTIFY and ORCPT per
    # recipient, and a "relayed" DSN owed for a delivered one (SUCCESS, no DSN next hop)
    """
    ALTER TABLE queue_messages ADD COLUMN ret TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_messages ADD COLUMN envid TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_recipients ADD COLUMN notify TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_recipients ADD COLUMN orcpt TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_recipients ADD COLUMN relayed_owed INTEGER NOT NULL DEFAULT 0;
    """,
]

# message flags
FLAG_NO_TLS_REQUIRED = 1  # "TLS-Required: No" (RFC 8689): no MTA-STS enforcement, no TLS-RPT
FLAG_NO_DSN = 2  # never generate a DSN (NOTIFY=NEVER, or the message is itself a report)
FLAG_REQUIRETLS = 4  # MAIL FROM ... REQUIRETLS (RFC 8689): delivered only over a verified path

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
    # the envelope as received, for `relay diagnose --queue-id` (mail_from above may be
    # SRS-rewritten): the client's IP and HELO, and its MAIL FROM (None: locally made)
    client_ip: str = ""
    helo: str = ""
    env_from: str | None = None
    # DSN parameters (RFC 3461): per recipient NOTIFY (comma-joined, "" not given) and
    # ORCPT ("addr-type;address", "" not given), aligned with recipients; RET and ENVID
    notify: tuple[str, ...] = ()
    orcpts: tuple[str, ...] = ()
    ret: str = ""
    envid: str = ""

    def msgid(self) -> str:
        """The Message-ID field's value ("" when none), computed once by whoever built it."""
        return self.message_id if self.message_id is not None else extract_message_id(self.data)

    def recipient_rows(self) -> list[tuple[str, str, str, str]]:
        """(address, original address, NOTIFY, ORCPT) per recipient, the first of each."""
        n = len(self.recipients)
        rows = zip(
            self.recipients,
            self.orig_recipients or self.recipients,
            self.notify or ("",) * n,
            self.orcpts or ("",) * n,
            strict=True,
        )
        seen: set[str] = set()
        out = []
        for row in rows:
            if row[0].lower() not in seen:
                seen.add(row[0].lower())
                out.append(row)
        return out

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
    lease_owner: str = ""  # "" when nobody holds the row
    lease_expiry: float = 0.0
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY: () not given, ("NEVER",) or words
    orcpt: str = ""  # RFC 3461 ORCPT, "addr-type;address" ("" not given)
    relayed_owed: bool = False  # delivered to a next hop without DSN; SUCCESS asked

    @property
    def dsn_owed(self) -> bool:
        if self.dsn_done:
            return False
        return self.state is RecipientState.FAILED or (
            self.state is RecipientState.DELIVERED and self.relayed_owed
        )


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
    held: bool = False  # `relay queue hold`: not tried until released
    client_ip: str = ""
    helo: str = ""
    env_from: str | None = None  # MAIL FROM as the client gave it (None: not recorded)
    ret: str = ""  # RFC 3461 RET: FULL, HDRS or "" (not given)
    envid: str = ""  # RFC 3461 ENVID, decoded

    def pending(self) -> tuple[QueuedRecipient, ...]:
        return tuple(r for r in self.recipients if r.state in PENDING_STATES)


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    address: str
    state: RecipientState
    reply: str
    next_attempt: float = 0.0
    mx_host: str = ""  # the host that answered (for the attempt log)
    tls: str = ""  # the TLS outcome of the attempt (for the attempt log)
    relayed: bool = False  # delivered, SUCCESS asked, next hop without DSN: DSN owed


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of a message's history (`relay queue log`): received, an attempt's outcome
    (delivered, deferred, failed), a DSN queued, an operator action, removed."""

    qid: QueueId
    at: float
    address: str
    event: str
    reply: str = ""
    mx_host: str = ""
    tls: str = ""


@dataclass(frozen=True, slots=True)
class ListFilter:
    """What `relay queue list` shows: recipients of a domain and/or in a state ("held":
    the messages on hold), a page of at most ``limit`` messages after ``offset``."""

    domain: str = ""
    state: str = ""
    limit: int = 0  # 0: all
    offset: int = 0


def envelope_fields(conn: ConnInfo, env: Envelope, origs: Sequence[str]) -> dict[str, Any]:
    """What the queue keeps of the session besides the routed envelope: the client's IP,
    HELO and MAIL FROM as given (for `relay diagnose --queue-id`), and the DSN parameters
    (RFC 3461), each routed recipient taking those of the RCPT it came from (``origs``:
    the RCPT address of each), so aliases and SRS keep the sender's ORCPT and NOTIFY."""
    by_rcpt = dict(zip(env.rcpt_tos, env.rcpt_dsn, strict=True)) if env.rcpt_dsn else {}
    params = [by_rcpt.get(o) for o in origs]
    return {
        "client_ip": conn.peer_ip,
        "helo": conn.helo,
        "env_from": env.mail_from,
        "notify": tuple(",".join(p.notify) if p else "" for p in params) if by_rcpt else (),
        "orcpts": tuple(p.orcpt if p else "" for p in params) if by_rcpt else (),
        "ret": env.dsn.ret,
        "envid": env.dsn.envid,
    }


def new_owner() -> str:
    """This process's lease owner id: host:pid:random (a restarted pid is another owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


DEFAULT_LEASE = 60.0
_CHUNK = 500  # ids per IN (...) list
_Q, _I, _D, _F = (
    RecipientState.QUEUED.value,
    RecipientState.INFLIGHT.value,
    RecipientState.DEFERRED.value,
    RecipientState.FAILED.value,
)


class Spool:
    """Queue tables over a Store, seen by one lease owner (one per process)."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float] = time.time,
        *,
        owner: str | None = None,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.store = store
        self.clock = clock
        self.owner = owner or new_owner()
        self.lease = lease  # seconds a claim holds without renewal
        store.migrate("queue", MIGRATIONS)

    # ------------------------------------------------------------ writes

    async def enqueue(
        self,
        msg: NewMessage,
        qid: QueueId | None = None,
        *,
        claimed: bool = False,
        also: Callable[[sqlite3.Connection], object] | None = None,
    ) -> QueueId:
        """Write the message and its recipients durably; return the queue id.

        ``claimed``: the caller delivers it at once, so the recipients are written in
        flight under this owner's lease (no other scheduler loads them; if the attempt
        never starts or never ends, the lease expires and the sweeper queues them).
        ``also``: a write of the caller's run in the same transaction (the list part of
        a message with list and other recipients: both are committed, or neither)."""
        now = self.clock()
        qid = qid or new_qid(now)
        write = _insert(qid, msg, now, self.owner if claimed else "", self.lease, self.clock)
        if also is not None:
            await self.store.write(lambda c: (also(c), write(c)))
        else:
            await self.store.write(write)
        return qid

    async def claim(self, qid: QueueId, addresses: Sequence[str]) -> tuple[str, ...]:
        """Take the lease of those recipients that are still queued or deferred and due;
        return the addresses claimed (another owner may have taken the others)."""
        owner = self.owner

        def run(conn: sqlite3.Connection) -> tuple[str, ...]:
            now = self.clock()  # the lease runs from the write, not from the call
            until = now + self.lease
            got = []
            for a in addresses:
                cur = conn.execute(
                    "UPDATE queue_recipients SET state=?, updated=?, lease_owner=?,"
                    " lease_expiry=? WHERE qid=? AND address=? AND state IN (?,?)"
                    " AND next_attempt<=? AND qid NOT IN"
                    " (SELECT id FROM queue_messages WHERE id=? AND held=1)",
                    (_I, now, owner, until, qid, a, _Q, _D, now, qid),
                )
                if cur.rowcount:
                    got.append(a)
            return tuple(got)

        return await self.store.write(run)

    async def claim_due(self, qid: QueueId) -> tuple[str, ...]:
        """Take the lease of every recipient of the message that is queued or deferred
        and due (not held, not corrupt): the loader's claim, made before the message is
        read, so of several loaders that picked the same message one reads it and the
        others have spent one small write. Returns the addresses claimed."""
        owner = self.owner

        def run(conn: sqlite3.Connection) -> tuple[str, ...]:
            now = self.clock()  # the lease runs from the write, not from the call
            rows = conn.execute(
                "UPDATE queue_recipients SET state=?, updated=?, lease_owner=?,"
                " lease_expiry=? WHERE qid=? AND state IN (?,?) AND next_attempt<=?"
                " AND qid NOT IN (SELECT id FROM queue_messages WHERE id=?"
                " AND (held=1 OR corrupt=1)) RETURNING address",
                (_I, now, owner, now + self.lease, qid, _Q, _D, now, qid),
            ).fetchall()
            return tuple(r[0] for r in rows)

        return await self.store.write(run)

    async def mark_inflight(self, qid: QueueId, addresses: Sequence[str]) -> tuple[str, ...]:
        """Former name of ``claim``."""
        return await self.claim(qid, addresses)

    async def renew(self, qids: Iterable[QueueId]) -> int:
        """Push the expiry of this owner's leases on those messages (attempts running)."""
        ids = list(qids)
        if not ids:
            return 0
        owner = self.owner

        def run(conn: sqlite3.Connection) -> int:
            until = self.clock() + self.lease
            n = 0
            for part in _chunks(ids):
                n += conn.execute(
                    "UPDATE queue_recipients SET lease_expiry=? WHERE lease_owner=?"
                    f" AND qid IN ({','.join('?' * len(part))})",
                    (until, owner, *part),
                ).rowcount
            return n

        return await self.store.write(run)

    async def record(
        self, qid: QueueId, updates: Sequence[RecipientUpdate], *, settle: bool = True
    ) -> tuple[bool, tuple[QueuedRecipient, ...]]:
        """Store the outcome of an attempt (one attempt more for each recipient) and clear
        its leases, in one write. A row whose lease another owner holds is left alone. A
        failed row keeps this owner's lease until its DSN is queued (``enqueue_report``).

        With ``settle``, in the same write: the message is deleted when nothing is
        pending and no DSN is owed. Returns (removed, failed recipients whose DSN this
        owner must now queue)."""
        now = self.clock()
        owner = self.owner
        logged = [
            (qid, now, u.address, u.state.value, u.reply[:1000], u.mx_host, u.tls) for u in updates
        ]

        def run(conn: sqlite3.Connection) -> tuple[bool, tuple[QueuedRecipient, ...]]:
            until = self.clock() + self.lease  # from the write, as in claim
            done = []
            for u, entry in zip(updates, logged, strict=True):
                held = u.state is RecipientState.FAILED or u.relayed  # kept for its DSN
                row = (
                    u.state.value,
                    u.next_attempt,
                    u.reply[:1000],
                    now,
                    owner if held else "",
                    until if held else 0.0,
                    int(u.relayed and u.state is RecipientState.DELIVERED),
                    qid,
                    u.address,
                    owner,
                    _Q,
                    _D,
                    _I,
                )
                if conn.execute(
                    "UPDATE queue_recipients SET state=?, attempts=attempts+1, next_attempt=?,"
                    " last_reply=?, updated=?, lease_owner=?, lease_expiry=?, relayed_owed=?"
                    " WHERE qid=? AND address=? AND (lease_owner=?"
                    " OR (lease_owner='' AND state IN (?,?,?)))",
                    row,
                ).rowcount:
                    done.append(entry)
            _log(conn, done)  # the attempt's history, in the outcome's transaction
            if not settle:
                return False, ()
            return _settle(conn, qid, owner, now, until)

        return await self.store.write(run)

    async def settle(self, qid: QueueId) -> tuple[bool, tuple[QueuedRecipient, ...]]:
        """``record`` with no outcome: delete the message if done, else claim the DSNs owed."""
        return await self.record(qid, ())

    async def enqueue_report(
        self,
        report: NewMessage,
        qid: QueueId,
        *,
        about: QueueId,
        failed: Sequence[str] = (),
        delay_warning: bool = False,
        claimed: bool = False,
    ) -> bool | None:
        """Queue a DSN about message ``about`` and, in the same transaction, mark its
        ``failed`` recipients reported (dsn_done=1, lease cleared) or the message delay-
        warned; then delete ``about`` if nothing is left to do. A crash before the commit
        leaves both undone, after it both done: the DSN is sent once.

        Returns None (and writes nothing) when the rows are no longer this owner's to
        report (another owner did it), else whether ``about`` was removed."""
        now = self.clock()
        owner = self.owner
        insert = _insert(qid, report, now, owner if claimed else "", self.lease, self.clock)
        addrs = tuple(failed)

        def run(conn: sqlite3.Connection) -> bool | None:
            # check every condition before changing anything (the write lock is held)
            if delay_warning:
                row = conn.execute(
                    "SELECT delay_warned FROM queue_messages WHERE id=?", (about,)
                ).fetchone()
                if row is None or row[0]:
                    return None
            for a in addrs:
                if (
                    conn.execute(
                        "SELECT 1 FROM queue_recipients WHERE qid=? AND address=?"
                        f" AND {_OWED} AND lease_owner=?",
                        (about, a, owner),
                    ).fetchone()
                    is None
                ):
                    return None
            if delay_warning:
                conn.execute("UPDATE queue_messages SET delay_warned=1 WHERE id=?", (about,))
            conn.executemany(
                "UPDATE queue_recipients SET dsn_done=1, lease_owner='', lease_expiry=0"
                " WHERE qid=? AND address=?",
                [(about, a) for a in addrs],
            )
            event = "delay_dsn_queued" if delay_warning else "dsn_queued"
            _log(conn, [(about, now, a, event, qid, "", "") for a in addrs or ("",)])
            insert(conn)
            if not addrs:
                return False
            return _settle(conn, about, owner, now, self.clock() + self.lease)[0]

        return await self.store.write(run)

    async def set_delay_warned(self, qid: QueueId) -> None:
        await self.store.write(
            lambda c: c.execute("UPDATE queue_messages SET delay_warned=1 WHERE id=?", (qid,))
        )

    async def mark_corrupt(self, qid: QueueId) -> None:
        await self.store.write(
            lambda c: c.execute("UPDATE queue_messages SET corrupt=1 WHERE id=?", (qid,))
        )

    async def expire_leases(self, keep: Iterable[QueueId] = ()) -> int:
        """The sweeper: every recipient in flight whose lease has expired (its owner
        crashed, hung, or lost a write) is queued again, due now. Rows of ``keep`` (this
        owner's attempts still running) are left alone. Returns how many."""
        now = self.clock()
        kept = set(keep)

        def run(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT rowid, qid, lease_owner FROM queue_recipients"
                " WHERE state=? AND lease_expiry<=?",
                (_I, now),
            ).fetchall()
            ids = [r[0] for r in rows if not (r[2] == self.owner and r[1] in kept)]
            for part in _chunks(ids):
                conn.execute(
                    "UPDATE queue_recipients SET state=?, next_attempt=0, lease_owner='',"
                    f" lease_expiry=0 WHERE rowid IN ({','.join('?' * len(part))})"
                    " AND state=?",
                    (_Q, *part, _I),
                )
            return len(ids)

        return await self.store.write(run)

    async def heartbeat(self) -> None:
        """Nothing: one relay holds a SQLite store (its lock says so); the shared store's
        spool records its owners here (relay nodes)."""

    def recover_sync(self) -> int:
        """At start: the leases of every other owner are stale (one relay holds a SQLite
        store), so every recipient they held in flight is queued again, due now, and
        every failed one awaiting its DSN is released for the sweeper. Returns how many
        recipients were requeued."""

        def run(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE queue_recipients SET state=?, next_attempt=0, lease_owner='',"
                " lease_expiry=0 WHERE state=? AND lease_owner!=?",
                (_Q, _I, self.owner),
            )
            conn.execute(
                "UPDATE queue_recipients SET lease_owner='', lease_expiry=0"
                f" WHERE {_OWED} AND lease_owner!='' AND lease_owner!=?",
                (self.owner,),
            )
            return cur.rowcount

        return self.store.write_sync(run)

    async def release(self, qids: Iterable[QueueId]) -> int:
        """Give up this owner's leases on those messages at once (attempts cancelled at
        stop): their in-flight recipients are queued, due now."""
        ids = list(qids)
        if not ids:
            return 0
        owner = self.owner

        def run(conn: sqlite3.Connection) -> int:
            n = 0
            for part in _chunks(ids):
                marks = ",".join("?" * len(part))
                n += conn.execute(
                    "UPDATE queue_recipients SET state=?, next_attempt=0, lease_owner='',"
                    f" lease_expiry=0 WHERE state=? AND lease_owner=? AND qid IN ({marks})",
                    (_Q, _I, owner, *part),
                ).rowcount
                conn.execute(
                    "UPDATE queue_recipients SET lease_expiry=0"
                    f" WHERE {_OWED} AND lease_owner=? AND qid IN ({marks})",
                    (owner, *part),
                )
            return n

        return await self.store.write(run)

    async def flush(self) -> int:
        """Make every deferred recipient due now."""
        return await self.store.write(_flush)

    async def flush_domain(self, domain: str) -> int:
        """Make the queued and deferred recipients of one domain due now."""
        dom = address_domain(domain)
        return await self.store.write(
            lambda c: (
                c.execute(
                    "UPDATE queue_recipients SET next_attempt=0 WHERE state IN (?,?)"
                    " AND relay_domain(address)=?",
                    (_D, _Q, dom),
                ).rowcount
            )
        )

    async def delete(self, qid: QueueId) -> bool:
        return bool(await self.delete_many([qid]))

    async def delete_many(self, qids: Sequence[QueueId]) -> list[QueueId]:
        """Delete those messages (no DSN); return the ids that existed."""
        now = self.clock()
        return await self.store.write(lambda c: _delete(c, list(qids), now))

    async def delete_all(self) -> int:
        now = self.clock()

        def run(conn: sqlite3.Connection) -> int:
            ids = [r[0] for r in conn.execute("SELECT id FROM queue_messages").fetchall()]
            return len(_delete(conn, ids, now))

        return await self.store.write(run)

    async def hold(self, qids: Sequence[QueueId]) -> list[QueueId]:
        """Put messages on hold (postsuper -h): not tried until released. An attempt
        already running finishes; its deferred recipients then wait for the release."""
        return await self._set_held(qids, 1, "held")

    async def unhold(self, qids: Sequence[QueueId]) -> list[QueueId]:
        """Release held messages (postsuper -H); their due recipients go at once."""
        return await self._set_held(qids, 0, "released")

    async def requeue(self, qids: Sequence[QueueId]) -> list[QueueId]:
        """Release from hold and make every queued or deferred recipient due now: its
        destination is looked up again at the next attempt (postsuper -r)."""
        now = self.clock()

        def run(conn: sqlite3.Connection) -> list[QueueId]:
            found = []
            for q in qids:
                if conn.execute("UPDATE queue_messages SET held=0 WHERE id=?", (q,)).rowcount:
                    conn.execute(
                        "UPDATE queue_recipients SET next_attempt=0 WHERE qid=? AND state IN (?,?)",
                        (q, _Q, _D),
                    )
                    found.append(q)
            _log(conn, [(q, now, "", "requeued", "", "", "") for q in found])
            return found

        return await self.store.write(run)

    async def _set_held(self, qids: Sequence[QueueId], held: int, event: str) -> list[QueueId]:
        now = self.clock()

        def run(conn: sqlite3.Connection) -> list[QueueId]:
            found = [
                q
                for q in qids
                if conn.execute("UPDATE queue_messages SET held=? WHERE id=?", (held, q)).rowcount
            ]
            _log(conn, [(q, now, "", event, "", "", "") for q in found])
            return found

        return await self.store.write(run)

    async def prune_log(self, before: float) -> int:
        """Forget the history of messages no longer queued, older than ``before``."""
        return await self.store.write(
            lambda c: (
                c.execute(
                    "DELETE FROM queue_log WHERE at<?"
                    " AND qid NOT IN (SELECT id FROM queue_messages)",
                    (before,),
                ).rowcount
            )
        )

    # ------------------------------------------------------------ reads

    async def due(self, now: float, limit: int, exclude: set[QueueId]) -> list[QueueId]:
        def run(conn: sqlite3.Connection) -> list[QueueId]:
            rows = conn.execute(
                "SELECT DISTINCT r.qid FROM queue_recipients r JOIN queue_messages m"
                " ON m.id=r.qid WHERE r.state IN (?,?) AND r.next_attempt<=? AND m.corrupt=0"
                " AND m.held=0 ORDER BY r.next_attempt LIMIT ?",
                (_Q, _D, now, limit + len(exclude)),
            ).fetchall()
            return [r[0] for r in rows if r[0] not in exclude][:limit]

        return await self.store.read(run)

    async def unreported(self, limit: int, exclude: set[QueueId]) -> list[QueueId]:
        """Messages with a failed recipient whose DSN is owed and whose lease is free or
        expired (a crash or a store error came between the failure and its DSN)."""
        now = self.clock()

        def run(conn: sqlite3.Connection) -> list[QueueId]:
            rows = conn.execute(
                "SELECT DISTINCT r.qid FROM queue_recipients r JOIN queue_messages m"
                f" ON m.id=r.qid WHERE {_OWED_R} AND r.lease_expiry<=?"
                " AND m.corrupt=0 LIMIT ?",
                (now, limit + len(exclude)),
            ).fetchall()
            return [r[0] for r in rows if r[0] not in exclude][:limit]

        return await self.store.read(run)

    async def next_due(self) -> float | None:
        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(next_attempt) FROM queue_recipients WHERE state IN (?,?)",
                (_Q, _D),
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self.store.read(run)

    async def load(self, qid: QueueId) -> tuple[QueuedMessage, bytes] | None:
        return await self.store.read(lambda c: _load(c, qid, with_data=True))

    async def get(self, qid: QueueId) -> QueuedMessage | None:
        res = await self.store.read(lambda c: _load(c, qid, with_data=False))
        return None if res is None else res[0]

    def list_sync(self, where: ListFilter | None = None) -> list[QueuedMessage]:
        return self.store.read_sync(lambda c: _list(c, where or ListFilter()))

    async def history(self, qid: QueueId) -> list[LogEntry]:
        """Every line of a message's history still kept, oldest first."""

        def run(conn: sqlite3.Connection) -> list[LogEntry]:
            rows = conn.execute(
                "SELECT qid, at, address, event, reply, mx_host, tls FROM queue_log"
                " WHERE qid=? ORDER BY at, rowid",
                (qid,),
            ).fetchall()
            return [LogEntry(*r) for r in rows]

        return await self.store.read(run)

    async def list(self, where: ListFilter | None = None) -> list[QueuedMessage]:
        """The queue (or one page of it), in arrival order, in one query."""
        return await self.store.read(lambda c: _list(c, where or ListFilter()))


def queue_insert(
    qid: QueueId, msg: NewMessage, now: float, *, owner: str = "", until: float = 0.0
) -> Callable[[sqlite3.Connection], None]:
    """The write that queues a message, for callers that must queue it in one
    transaction with their own rows (list fan-out): its recipients queued for the
    loader, or (``owner``) in flight under owner's lease until ``until``, for a
    scheduler of that owner that is handed the message at once (``claimed``; the caller's
    transaction is running: ``until`` is computed in it)."""
    return _insert(qid, msg, now, owner, until - now, lambda: now)


def _insert(
    qid: QueueId,
    msg: NewMessage,
    now: float,
    owner: str,
    lease: float,
    clock: Callable[[], float],
) -> Callable[[sqlite3.Connection], None]:
    """The write that inserts a message; its recipients in flight under owner's lease
    when owner is given (``lease`` seconds from when the write runs: it may wait for the
    writer), else queued."""
    mid = msg.msgid()
    state = _I if owner else _Q
    recipients = msg.recipient_rows()
    received = received_line(msg)

    def run(conn: sqlite3.Connection) -> None:
        expiry = clock() + lease if owner else 0.0
        rows = [
            (qid, a, o, state, now, owner, expiry, notify, orcpt)
            for a, o, notify, orcpt in recipients
        ]
        conn.execute(
            "INSERT INTO queue_messages(id, mail_from, data, size, message_id, created, flags,"
            " client_ip, helo, env_from, ret, envid) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                qid,
                msg.mail_from,
                msg.data,
                len(msg.data),
                mid,
                now,
                msg.flags,
                msg.client_ip,
                msg.helo,
                msg.env_from,
                msg.ret,
                msg.envid,
            ),
        )
        _log(conn, [(qid, now, "", "received", received, "", "")])
        conn.executemany(
            "INSERT INTO queue_recipients(qid, address, orig, state, next_attempt,"
            " lease_owner, lease_expiry, notify, orcpt) VALUES(?,?,?,?,?,?,?,?,?)",
            rows,
        )

    return run


def received_line(msg: NewMessage) -> str:
    """The reply of a message's "received" history line: the envelope as given."""
    line = f"from=<{msg.env_from if msg.env_from is not None else msg.mail_from}>"
    if msg.client_ip:
        line += f" client=[{msg.client_ip}] helo={msg.helo or '-'}"
    return line + f" size={len(msg.data)}"


@dataclass(frozen=True, slots=True)
class SettlePlan:
    """What settling a message does (both spools apply it with their own SQL): mark
    ``quiet`` reported without a DSN, then delete the message when ``delete``, else lease
    ``mine`` (the owed DSNs this owner takes) and return them."""

    quiet: tuple[QueuedRecipient, ...]
    delete: bool
    mine: tuple[QueuedRecipient, ...]


def settle_plan(
    rcpts: Sequence[QueuedRecipient],
    owed: Sequence[QueuedRecipient],
    sender: Sequence[Any] | None,
    owner: str,
    now: float,
) -> SettlePlan:
    """``owed``: the recipients of ``rcpts`` whose DSN is owed; ``sender``: the message's
    (mail_from, flags), read only when some DSN is owed (None: not read, or gone)."""
    quiet: list[QueuedRecipient] = []
    if owed and sender is not None and (not sender[0] or sender[1] & FLAG_NO_DSN):
        # the null reverse-path or NO_DSN owes none (RFC 3461 NOTIFY=NEVER, RFC 5321
        # 6.1: never a DSN to <>): its owed DSNs are marked reported
        quiet, owed = list(owed), []
    elif owed:
        # RFC 3461 4.1: NOTIFY given without FAILURE (NEVER, or SUCCESS/DELAY only): no
        # failure DSN for that recipient
        quiet = [r for r in owed if r.state is RecipientState.FAILED and not wants_failure(r)]
        if quiet:
            owed = [r for r in owed if r not in quiet]
    if not owed and not any(r.state in PENDING_STATES for r in rcpts):
        return SettlePlan(tuple(quiet), True, ())
    mine = tuple(r for r in owed if r.lease_owner in ("", owner) or r.lease_expiry <= now)
    return SettlePlan(tuple(quiet), False, mine)


def _settle(
    conn: sqlite3.Connection, qid: str, owner: str, now: float, until: float
) -> tuple[bool, tuple[QueuedRecipient, ...]]:
    """Delete the message when nothing is pending and no DSN is owed; else take the lease
    of the recipients whose DSN is owed and free (or expired, or ours) and return them
    (``settle_plan`` decides)."""
    rcpts = _recipients(conn, qid)
    owed = [r for r in rcpts if r.dsn_owed]
    sender = None
    if owed:
        sender = conn.execute(
            "SELECT mail_from, flags FROM queue_messages WHERE id=?", (qid,)
        ).fetchone()
    plan = settle_plan(rcpts, owed, sender, owner, now)
    if plan.quiet:
        conn.executemany(
            "UPDATE queue_recipients SET dsn_done=1, lease_owner='', lease_expiry=0"
            " WHERE qid=? AND address=?",
            [(qid, r.address) for r in plan.quiet],
        )
    if plan.delete:
        conn.execute("DELETE FROM queue_messages WHERE id=?", (qid,))
        _log(conn, [(qid, now, "", "removed", "done", "", "")])
        return True, ()
    conn.executemany(
        "UPDATE queue_recipients SET lease_owner=?, lease_expiry=? WHERE qid=? AND address=?",
        [(owner, until, qid, r.address) for r in plan.mine],
    )
    return False, plan.mine


def _chunks(ids: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def _flush(conn: sqlite3.Connection) -> int:
    return conn.execute(
        "UPDATE queue_recipients SET next_attempt=0 WHERE state IN (?,?)",
        (_D, _Q),
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
        f"SELECT {RCPT_COLS} FROM queue_recipients WHERE qid=? ORDER BY rowid", (qid,)
    ).fetchall()
    return tuple(rcpt_of_row(r) for r in rows)


MSG_COLS = (
    "id, mail_from, size, message_id, created, flags, delay_warned, held, client_ip, helo,"
    " env_from, ret, envid"
)
N_MSG_COLS = 13
RCPT_COLS = (
    "address, state, attempts, next_attempt, last_reply, orig, dsn_done, lease_owner,"
    " lease_expiry, notify, orcpt, relayed_owed"
)
# a recipient whose DSN is owed: failed, or delivered with a "relayed" DSN to send
_OWED = "(state='failed' OR (state='delivered' AND relayed_owed=1)) AND dsn_done=0"
_OWED_R = "(r.state='failed' OR (r.state='delivered' AND r.relayed_owed=1)) AND r.dsn_done=0"


def wants_failure(r: QueuedRecipient) -> bool:
    """RFC 3461 4.1: a failure DSN unless NOTIFY was given without FAILURE."""
    return not r.notify or "FAILURE" in r.notify


def msg_of_row(row: Sequence[Any], recipients: tuple[QueuedRecipient, ...]) -> QueuedMessage:
    return QueuedMessage(
        id=str(row[0]),
        mail_from=str(row[1]),
        size=int(row[2]),
        message_id=str(row[3]),
        created=float(row[4]),
        flags=int(row[5]),
        delay_warned=bool(row[6]),
        held=bool(row[7]),
        client_ip=str(row[8]),
        helo=str(row[9]),
        env_from=None if row[10] is None else str(row[10]),
        ret=str(row[11]),
        envid=str(row[12]),
        recipients=recipients,
    )


_STATES = {s.value: s for s in RecipientState}  # a dict lookup, not an enum call per row


def rcpt_of_row(r: Sequence[Any]) -> QueuedRecipient:
    return QueuedRecipient(
        address=r[0],
        state=_STATES[r[1]],
        attempts=r[2],
        next_attempt=r[3],
        last_reply=r[4],
        orig=r[5],
        dsn_done=bool(r[6]),
        lease_owner=r[7],
        lease_expiry=r[8],
        notify=tuple(w for w in str(r[9]).split(",") if w),
        orcpt=str(r[10]),
        relayed_owed=bool(r[11]),
    )


def _msg(conn: sqlite3.Connection, row: tuple[Any, ...]) -> QueuedMessage:
    return msg_of_row(row, _recipients(conn, str(row[0])))


def _load(
    conn: sqlite3.Connection, qid: str, with_data: bool
) -> tuple[QueuedMessage, bytes] | None:
    row = conn.execute(f"SELECT {MSG_COLS}, data FROM queue_messages WHERE id=?", (qid,)).fetchone()
    if row is None:
        return None
    data = row[N_MSG_COLS] if with_data else b""
    if with_data and (not isinstance(data, bytes) or len(data) != row[2]):
        raise ValueError(f"queue message {qid} is corrupt (size mismatch)")
    return _msg(conn, row[:N_MSG_COLS]), data


def _list(conn: sqlite3.Connection, where: ListFilter) -> list[QueuedMessage]:
    """One query: a page of messages (those with a matching recipient) joined with their
    matching recipients, in arrival order."""
    rcond: list[str] = []
    rargs: list[Any] = []
    if where.domain:
        rcond.append("relay_domain(r.address)=?")
        rargs.append(address_domain(where.domain))
    mcond: list[str] = []
    margs: list[Any] = []
    if where.state == "held":
        mcond.append("m.held=1")
    elif where.state:
        rcond.append("r.state=?")
        rargs.append(where.state)
    if rcond:
        margs += rargs
        mcond.append(
            "EXISTS (SELECT 1 FROM queue_recipients r WHERE r.qid=m.id AND "
            + " AND ".join(rcond)
            + ")"
        )
    mwhere = f" WHERE {' AND '.join(mcond)}" if mcond else ""
    page = ""
    if where.limit or where.offset:
        page = " LIMIT ? OFFSET ?"
        margs += [where.limit or -1, where.offset]
    mcols = ", ".join(f"m.{c.strip()}" for c in MSG_COLS.split(","))
    rcols = ", ".join(f"r.{c.strip()}" for c in RCPT_COLS.split(","))
    sql = (
        f"SELECT {mcols}, {rcols} FROM"
        f" (SELECT {mcols} FROM queue_messages m{mwhere} ORDER BY m.created, m.id{page}) m"
        " LEFT JOIN queue_recipients r ON r.qid=m.id"
        + (f" AND {' AND '.join(rcond)}" if rcond else "")
        + " ORDER BY m.created, m.id, r.rowid"
    )
    out: list[QueuedMessage] = []
    head: Sequence[Any] | None = None
    rcpts: list[QueuedRecipient] = []
    for row in conn.execute(sql, (*margs, *rargs)):  # EXISTS, page, then the join
        if head is None or row[0] != head[0]:
            if head is not None:
                out.append(msg_of_row(head, tuple(rcpts)))
            head, rcpts = row[:N_MSG_COLS], []
        if row[N_MSG_COLS] is not None:
            rcpts.append(rcpt_of_row(row[N_MSG_COLS:]))
    if head is not None:
        out.append(msg_of_row(head, tuple(rcpts)))
    return out


def _log(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append lines to the message history (queue_log), in the caller's transaction."""
    if rows:
        conn.executemany(
            "INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)"
            " VALUES(?,?,?,?,?,?,?)",
            rows,
        )


def _delete(conn: sqlite3.Connection, ids: list[QueueId], now: float) -> list[QueueId]:
    found = []
    for part in _chunks(ids):
        marks = ",".join("?" * len(part))
        found += [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM queue_messages WHERE id IN ({marks})", tuple(part)
            ).fetchall()
        ]
        conn.execute(f"DELETE FROM queue_messages WHERE id IN ({marks})", tuple(part))
    _log(conn, [(q, now, "", "removed", "deleted by the operator", "", "") for q in found])
    return found
