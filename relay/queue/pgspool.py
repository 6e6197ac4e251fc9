"""The queue on PostgreSQL (``[storage] url``): the semantics of relay/queue/spool.py
(docs/queue.md) for several relay nodes on one database. docs/postgresql.md is the design.

Same tables and states as the SQLite spool (``queue_messages`` with the message bytes in a
``bytea``, so every node reads every message; ``queue_recipients`` with the lease columns),
with what several writers need:

- a claim is ``SELECT ... FOR UPDATE SKIP LOCKED`` into a lease (owner ``node_id:pid:random``,
  expiry): two nodes claiming the same message at once split its recipients and never wait
  for each other; the condition (queued or deferred, due) is re-checked on the locked row;
- the sweeper locks with SKIP LOCKED too (a row a live transaction holds is not expired
  under it, nor waited for);
- every write about one message's recipients after the claim (outcome, settle, DSN) first
  locks the message row (``FOR NO KEY UPDATE``), so two owners settling the same message
  are serialised: the last one sees every recipient done and deletes it;
- every transaction is short (no transaction spans a delivery attempt: a lease does).

There is no ``recover_sync``: on a shared store the other owners' leases may be live (other
nodes), so a dead owner's rows come back by lease expiry only.
"""

from __future__ import annotations

import functools
import inspect
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.model import QueueId, RecipientState
from relay.pgstore import Conn, PgStore, rowcount
from relay.queue.spool import (
    DEFAULT_LEASE,
    MSG_COLS,
    N_MSG_COLS,
    RCPT_COLS,
    ListFilter,
    LogEntry,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    RecipientUpdate,
    msg_of_row,
    new_qid,
    rcpt_of_row,
    received_line,
    settle_plan,
)
from relay.store import address_domain

MIGRATIONS = [
    """
    CREATE TABLE queue_messages (
        id text PRIMARY KEY,
        mail_from text NOT NULL,
        data bytea NOT NULL,
        size integer NOT NULL,
        message_id text NOT NULL DEFAULT '',
        created double precision NOT NULL,
        flags integer NOT NULL DEFAULT 0,
        delay_warned boolean NOT NULL DEFAULT false,
        corrupt boolean NOT NULL DEFAULT false
    );
    CREATE INDEX queue_messages_created ON queue_messages(created);
    CREATE TABLE queue_recipients (
        qid text NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
        address text NOT NULL,
        pos integer NOT NULL,
        orig text NOT NULL DEFAULT '',
        state text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt double precision NOT NULL DEFAULT 0,
        last_reply text NOT NULL DEFAULT '',
        updated double precision NOT NULL DEFAULT 0,
        dsn_done boolean NOT NULL DEFAULT false,
        lease_owner text NOT NULL DEFAULT '',
        lease_expiry double precision NOT NULL DEFAULT 0,
        PRIMARY KEY (qid, address)
    );
    CREATE INDEX queue_recipients_due ON queue_recipients(next_attempt)
        WHERE state IN ('queued', 'deferred');
    CREATE INDEX queue_recipients_lease ON queue_recipients(lease_expiry)
        WHERE state = 'inflight';
    CREATE INDEX queue_recipients_owed ON queue_recipients(lease_expiry)
        WHERE state = 'failed' AND NOT dsn_done;
    """,
    # 2: the SQLite spool's versions 3 and 4: hold, the stored envelope, the message
    # history, the RFC 3461 DSN parameters and the "relayed" DSN owed for a delivered one
    """
    ALTER TABLE queue_messages
        ADD COLUMN held boolean NOT NULL DEFAULT false,
        ADD COLUMN client_ip text NOT NULL DEFAULT '',
        ADD COLUMN helo text NOT NULL DEFAULT '',
        ADD COLUMN env_from text,
        ADD COLUMN ret text NOT NULL DEFAULT '',
        ADD COLUMN envid text NOT NULL DEFAULT '';
    DROP INDEX queue_messages_created;
    CREATE INDEX queue_messages_created ON queue_messages(created, id);
    ALTER TABLE queue_recipients
        ADD COLUMN notify text NOT NULL DEFAULT '',
        ADD COLUMN orcpt text NOT NULL DEFAULT '',
        ADD COLUMN relayed_owed boolean NOT NULL DEFAULT false;
    DROP INDEX queue_recipients_owed;
    CREATE INDEX queue_recipients_owed ON queue_recipients(lease_expiry)
        WHERE (state = 'failed' OR (state = 'delivered' AND relayed_owed)) AND NOT dsn_done;
    CREATE TABLE queue_log (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        qid text NOT NULL,
        at double precision NOT NULL,
        address text NOT NULL DEFAULT '',
        event text NOT NULL,
        reply text NOT NULL DEFAULT '',
        mx_host text NOT NULL DEFAULT '',
        tls text NOT NULL DEFAULT ''
    );
    CREATE INDEX queue_log_qid ON queue_log(qid, at, id);
    CREATE INDEX queue_log_at ON queue_log(at);
    """,
    # 3: the nodes (one row per lease owner: node_id:pid:random), written by the sweeper
    """
    CREATE TABLE relay_nodes (
        owner text PRIMARY KEY,
        node_id text NOT NULL,
        started double precision NOT NULL,
        heartbeat double precision NOT NULL
    );
    CREATE INDEX relay_nodes_heartbeat ON relay_nodes(heartbeat);
    """,
    # 4: an attempt's outcome as one server-side function, called in autocommit (a
    # function call is one statement: atomic on its own, one round trip, durable at its
    # commit). It locks the message row (serialising the settles of one message across
    # nodes), applies the outcome to the rows this owner holds (or nobody holds), writes
    # their history lines and, with settle, reads every recipient (a statement after the
    # lock: a volatile function takes a fresh snapshot per statement, so it sees every
    # other owner's committed rows) and deletes the message when nothing is pending and
    # no DSN is owed. Returns the recipients (gone=true on each: deleted); no rows: the
    # message was gone already. Where a DSN is owed the caller settles in a transaction
    # of its own (relay/queue/spool.py settle_plan decides).
    """
    CREATE FUNCTION relay_record(p_qid text, p_addr text[], p_state text[], p_na float8[],
        p_reply text[], p_lo text[], p_le float8[], p_ro bool[], p_mx text[], p_tls text[],
        p_now float8, p_owner text, p_settle bool)
    RETURNS TABLE(gone bool, address text, state text, attempts integer,
        next_attempt float8, last_reply text, orig text, dsn_done bool, lease_owner text,
        lease_expiry float8, notify text, orcpt text, relayed_owed bool)
    LANGUAGE plpgsql AS $fn$
    #variable_conflict use_column
    BEGIN
        PERFORM 1 FROM queue_messages m WHERE m.id=p_qid FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF cardinality(p_addr) > 0 THEN
            WITH done AS (
                UPDATE queue_recipients r SET state=u.st, attempts=r.attempts+1,
                    next_attempt=u.na, last_reply=u.reply, updated=p_now,
                    lease_owner=u.lo, lease_expiry=u.le, relayed_owed=u.ro
                FROM unnest(p_addr, p_state, p_na, p_reply, p_lo, p_le, p_ro, p_mx, p_tls)
                    WITH ORDINALITY AS u(address, st, na, reply, lo, le, ro, mx, tls, n)
                WHERE r.qid=p_qid AND r.address=u.address AND (r.lease_owner=p_owner
                    OR (r.lease_owner='' AND r.state IN ('queued', 'deferred', 'inflight')))
                RETURNING u.n, u.address, u.st, u.reply, u.mx, u.tls)
            INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)
                SELECT p_qid, p_now, d.address, d.st, d.reply, d.mx, d.tls
                FROM done d ORDER BY d.n;
        END IF;
        IF NOT p_settle THEN
            RETURN;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM queue_recipients r WHERE r.qid=p_qid
                AND (r.state IN ('queued', 'deferred', 'inflight')
                OR ((r.state='failed' OR (r.state='delivered' AND r.relayed_owed))
                    AND NOT r.dsn_done))) THEN
            DELETE FROM queue_messages m WHERE m.id=p_qid;
            INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)
                VALUES (p_qid, p_now, '', 'removed', 'done', '', '');
            RETURN QUERY SELECT true, NULL::text, NULL::text, NULL::integer, NULL::float8,
                NULL::text, NULL::text, NULL::bool, NULL::text, NULL::float8, NULL::text,
                NULL::text, NULL::bool;
            RETURN;
        END IF;
        RETURN QUERY SELECT false, r.address, r.state, r.attempts, r.next_attempt,
            r.last_reply, r.orig, r.dsn_done, r.lease_owner, r.lease_expiry, r.notify,
            r.orcpt, r.relayed_owed
            FROM queue_recipients r WHERE r.qid=p_qid ORDER BY r.pos;
    END
    $fn$;
    """,
    # 5: the common outcome (every recipient of the attempt delivered, none owing a
    # "relayed" DSN, every one held by this owner, nothing else of the message pending or
    # owed) without updating rows about to be deleted: one read of the message's
    # recipients decides, then the delete and the history lines in one insert. Any other
    # outcome takes migration 4's path unchanged. The message bytes are compressed with
    # lz4 where the server has it (PostgreSQL 14+ built with lz4, as Debian's is), else
    # pglz as before: bench/storebench.py measured the server's CPU per message 0.39 ->
    # 0.34 ms with lz4; stored uncompressed (STORAGE EXTERNAL) it rose (three times the WAL).
    """
    DO $do$ BEGIN
        EXECUTE 'ALTER TABLE queue_messages ALTER COLUMN data SET COMPRESSION lz4';
    EXCEPTION WHEN OTHERS THEN
        NULL;  -- no lz4 on this server: pglz, the default
    END $do$;
    CREATE OR REPLACE FUNCTION relay_record(p_qid text, p_addr text[], p_state text[],
        p_na float8[], p_reply text[], p_lo text[], p_le float8[], p_ro bool[],
        p_mx text[], p_tls text[], p_now float8, p_owner text, p_settle bool)
    RETURNS TABLE(gone bool, address text, state text, attempts integer,
        next_attempt float8, last_reply text, orig text, dsn_done bool, lease_owner text,
        lease_expiry float8, notify text, orcpt text, relayed_owed bool)
    LANGUAGE plpgsql AS $fn$
    #variable_conflict use_column
    DECLARE
        v_mine integer;
        v_others integer;
    BEGIN
        PERFORM 1 FROM queue_messages m WHERE m.id=p_qid FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF p_settle AND cardinality(p_addr) > 0 AND 'delivered' = ALL(p_state)
                AND true <> ALL(p_ro) THEN
            SELECT count(*) FILTER (WHERE r.address = ANY(p_addr) AND (r.lease_owner=p_owner
                    OR (r.lease_owner='' AND r.state IN ('queued', 'deferred', 'inflight')))),
                count(*) FILTER (WHERE r.address <> ALL(p_addr)
                    AND (r.state IN ('queued', 'deferred', 'inflight')
                    OR ((r.state='failed' OR (r.state='delivered' AND r.relayed_owed))
                        AND NOT r.dsn_done)))
                INTO v_mine, v_others
                FROM queue_recipients r WHERE r.qid=p_qid;
            IF v_mine = cardinality(p_addr) AND v_others = 0 THEN
                DELETE FROM queue_messages m WHERE m.id=p_qid;
                INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)
                    SELECT p_qid, p_now, u.address, u.st, u.reply, u.mx, u.tls
                    FROM (SELECT * FROM unnest(p_addr, p_state, p_reply, p_mx, p_tls)
                        WITH ORDINALITY AS t(address, st, reply, mx, tls, n)
                        UNION ALL SELECT '', 'removed', 'done', '', '',
                            cardinality(p_addr) + 1) u ORDER BY u.n;
                RETURN QUERY SELECT true, NULL::text, NULL::text, NULL::integer,
                    NULL::float8, NULL::text, NULL::text, NULL::bool, NULL::text,
                    NULL::float8, NULL::text, NULL::text, NULL::bool;
                RETURN;
            END IF;
        END IF;
        IF cardinality(p_addr) > 0 THEN
            WITH done AS (
                UPDATE queue_recipients r SET state=u.st, attempts=r.attempts+1,
                    next_attempt=u.na, last_reply=u.reply, updated=p_now,
                    lease_owner=u.lo, lease_expiry=u.le, relayed_owed=u.ro
                FROM unnest(p_addr, p_state, p_na, p_reply, p_lo, p_le, p_ro, p_mx, p_tls)
                    WITH ORDINALITY AS u(address, st, na, reply, lo, le, ro, mx, tls, n)
                WHERE r.qid=p_qid AND r.address=u.address AND (r.lease_owner=p_owner
                    OR (r.lease_owner='' AND r.state IN ('queued', 'deferred', 'inflight')))
                RETURNING u.n, u.address, u.st, u.reply, u.mx, u.tls)
            INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)
                SELECT p_qid, p_now, d.address, d.st, d.reply, d.mx, d.tls
                FROM done d ORDER BY d.n;
        END IF;
        IF NOT p_settle THEN
            RETURN;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM queue_recipients r WHERE r.qid=p_qid
                AND (r.state IN ('queued', 'deferred', 'inflight')
                OR ((r.state='failed' OR (r.state='delivered' AND r.relayed_owed))
                    AND NOT r.dsn_done))) THEN
            DELETE FROM queue_messages m WHERE m.id=p_qid;
            INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)
                VALUES (p_qid, p_now, '', 'removed', 'done', '', '');
            RETURN QUERY SELECT true, NULL::text, NULL::text, NULL::integer, NULL::float8,
                NULL::text, NULL::text, NULL::bool, NULL::text, NULL::float8, NULL::text,
                NULL::text, NULL::bool;
            RETURN;
        END IF;
        RETURN QUERY SELECT false, r.address, r.state, r.attempts, r.next_attempt,
            r.last_reply, r.orig, r.dsn_done, r.lease_owner, r.lease_expiry, r.notify,
            r.orcpt, r.relayed_owed
            FROM queue_recipients r WHERE r.qid=p_qid ORDER BY r.pos;
    END
    $fn$;
    """,
]

# a lease owner's relay_nodes row is forgotten this long after its last heartbeat
NODE_RETENTION = 86400.0

_Q, _I, _D, _F = (
    RecipientState.QUEUED.value,
    RecipientState.INFLIGHT.value,
    RecipientState.DEFERRED.value,
    RecipientState.FAILED.value,
)


# NOTIFY channel: mail became due now (queued unclaimed, leases expired or given back);
# every node's scheduler LISTENs and wakes (polling stays the bounded fallback)
CHANNEL = "relay_queue"


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One lease owner (a relay process) of the shared store, as `relay nodes` shows it."""

    owner: str
    node_id: str
    started: float
    heartbeat: float
    inflight: int


def node_owner(node_id: str | None = None) -> str:
    """A lease owner id on a shared store: node_id:pid:random (node_id: [server] node_id)."""
    return f"{node_id or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class PgSpool:
    """Queue tables over a PgStore, seen by one lease owner. ``await PgSpool.open(...)``."""

    def __init__(
        self,
        store: PgStore,
        clock: Callable[[], float] = time.time,
        *,
        owner: str | None = None,
        node_id: str | None = None,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.store = store
        self.clock = clock
        self.owner = owner or node_owner(node_id)
        self.lease = lease
        # the group commit's merger (one object: PgStore merges jobs naming the same one);
        # a claimed row's lease runs from when its statement is sent, not from when the
        # write was asked for: the group may wait for the writer or a pooled connection
        self._merge_insert = functools.partial(_insert_rows_now, clock)

    @classmethod
    async def open(
        cls,
        store: PgStore,
        clock: Callable[[], float] = time.time,
        *,
        owner: str | None = None,
        node_id: str | None = None,
        lease: float = DEFAULT_LEASE,
    ) -> PgSpool:
        """The spool, once the queue's schema is migrated (under the advisory lock)."""
        await store.migrate("queue", MIGRATIONS)
        return cls(store, clock, owner=owner, node_id=node_id, lease=lease)

    async def listen(self, wake: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        """Call ``wake()`` whenever any node makes mail due now (NOTIFY on CHANNEL, sent
        in the committing transaction); returns the coroutine function that stops."""
        return await self.store.listen(CHANNEL, lambda _payload: wake())

    # ------------------------------------------------------------ writes

    async def enqueue(
        self,
        msg: NewMessage,
        qid: QueueId | None = None,
        *,
        claimed: bool = False,
        also: Callable[[Any], object] | None = None,
    ) -> QueueId:
        """Write the message and its recipients durably (synchronous_commit=on, group
        commit); return the queue id. ``claimed``: in flight under this owner's lease.
        ``also``: ``async also(conn)``, the caller's write in the same transaction (the
        lists' part of a message with list and other recipients: both committed, or
        neither); such a write locks list rows, so it runs in a transaction of its own,
        not in a group."""
        now = self.clock()
        qid = qid or new_qid(now)
        row = _row(qid, msg, now, self.owner if claimed else "", self.lease)
        insert = _insert_of(row, self.clock)
        if also is None:
            await self.store.write(insert, group=True, merge=(self._merge_insert, row))
            return qid

        async def both(conn: Conn) -> None:
            result = also(conn)
            if not inspect.isawaitable(result):
                raise TypeError("PgSpool.enqueue: also must be an async callable")
            await result
            await insert(conn)

        await self.store.write(both)
        return qid

    async def claim(self, qid: QueueId, addresses: Sequence[str]) -> tuple[str, ...]:
        """Lease those recipients still queued or deferred and due, skipping rows another
        transaction holds (SKIP LOCKED); return the addresses claimed, in the given order."""
        owner, wanted = self.owner, list(addresses)

        async def run(conn: Conn) -> tuple[str, ...]:
            now = self.clock()  # the lease runs from the statement, not from the call
            until = now + self.lease
            rows = await conn.fetch(
                "UPDATE queue_recipients r SET state=$4, updated=$3, lease_owner=$5,"
                " lease_expiry=$6 FROM (SELECT qid, address FROM queue_recipients"
                " WHERE qid=$1 AND address=ANY($2::text[]) AND state IN ($7, $8)"
                " AND next_attempt<=$3 AND NOT EXISTS (SELECT 1 FROM queue_messages"
                " WHERE id=$1 AND held) FOR UPDATE SKIP LOCKED) c"
                " WHERE r.qid=c.qid AND r.address=c.address RETURNING r.address",
                qid,
                wanted,
                now,
                _I,
                owner,
                until,
                _Q,
                _D,
            )
            got = {r[0] for r in rows}
            return tuple(a for a in dict.fromkeys(wanted) if a in got)

        return await self.store.write(run, single=True)

    async def claim_due(self, qid: QueueId) -> tuple[str, ...]:
        """Lease every recipient of the message still queued or deferred and due (not
        held, not corrupt), skipping rows another transaction holds: the loader's claim,
        before the message is read (``Spool.claim_due``)."""
        owner = self.owner

        async def run(conn: Conn) -> tuple[str, ...]:
            now = self.clock()  # the lease runs from the statement, not from the call
            rows = await conn.fetch(
                "UPDATE queue_recipients r SET state=$3, updated=$2, lease_owner=$4,"
                " lease_expiry=$5 FROM (SELECT qid, address FROM queue_recipients"
                " WHERE qid=$1 AND state IN ($6, $7) AND next_attempt<=$2"
                " AND NOT EXISTS (SELECT 1 FROM queue_messages WHERE id=$1"
                " AND (held OR corrupt)) FOR UPDATE SKIP LOCKED) c"
                " WHERE r.qid=c.qid AND r.address=c.address RETURNING r.address",
                qid,
                now,
                _I,
                owner,
                now + self.lease,
                _Q,
                _D,
            )
            return tuple(r[0] for r in rows)

        return await self.store.write(run, single=True)

    async def mark_inflight(self, qid: QueueId, addresses: Sequence[str]) -> tuple[str, ...]:
        return await self.claim(qid, addresses)

    async def renew(self, qids: Iterable[QueueId]) -> int:
        ids = list(qids)
        if not ids:
            return 0
        owner = self.owner

        async def run(conn: Conn) -> int:
            return rowcount(
                await conn.execute(
                    "UPDATE queue_recipients SET lease_expiry=$1 WHERE lease_owner=$2"
                    " AND qid=ANY($3::text[])",
                    self.clock() + self.lease,
                    owner,
                    ids,
                )
            )

        return await self.store.write(run, single=True)

    async def record(
        self, qid: QueueId, updates: Sequence[RecipientUpdate], *, settle: bool = True
    ) -> tuple[bool, tuple[QueuedRecipient, ...]]:
        """The outcome of an attempt, as Spool.record: only over rows this owner holds (or
        nobody holds); a failed row keeps the lease until its DSN; with ``settle``, the
        message is deleted when done, else the DSNs owed are claimed."""
        now = self.clock()
        owner = self.owner
        held = [u.state is RecipientState.FAILED or u.relayed for u in updates]

        async def run(conn: Conn) -> list[Any]:
            until = self.clock() + self.lease  # from the statement, as in claim
            cols = (
                [u.address for u in updates],
                [u.state.value for u in updates],
                [u.next_attempt for u in updates],
                [u.reply[:1000] for u in updates],
                [owner if h else "" for h in held],
                [until if h else 0.0 for h in held],
                [u.relayed and u.state is RecipientState.DELIVERED for u in updates],
                [u.mx_host for u in updates],
                [u.tls for u in updates],
            )
            # one statement, committed by itself: lock, outcome, history and, with settle,
            # the delete of a finished message (migration 4, relay_record)
            return list(
                await conn.fetch(
                    "SELECT * FROM relay_record($1, $2::text[], $3::text[], $4::float8[],"
                    " $5::text[], $6::text[], $7::float8[], $8::bool[], $9::text[],"
                    " $10::text[], $11, $12, $13)",
                    qid,
                    *cols,
                    now,
                    owner,
                    settle,
                )
            )

        rows = await self.store.write(run, single=True)
        if not settle:
            return False, ()
        if not rows or rows[0][0]:  # deleted now, or gone already
            return True, ()
        rcpts = tuple(rcpt_of_row(tuple(r)[1:]) for r in rows)
        if not any(r.dsn_owed for r in rcpts):
            return False, ()  # others pending (another owner's, or retried later)
        # a DSN is owed: settle_plan decides under the lock, in a transaction of its own
        # (a crash in between leaves the failed rows under this owner's lease: they come
        # back by lease expiry, as any owed DSN whose owner died)
        return await self._settle_now(qid)

    async def _settle_now(self, qid: QueueId) -> tuple[bool, tuple[QueuedRecipient, ...]]:
        owner = self.owner

        async def run(conn: Conn) -> tuple[bool, tuple[QueuedRecipient, ...]]:
            await _lock_message(conn, qid)
            now = self.clock()  # after the lock wait: the lease runs from here
            return await _settle(conn, qid, owner, now, now + self.lease)

        return await self.store.write(run)

    async def settle(self, qid: QueueId) -> tuple[bool, tuple[QueuedRecipient, ...]]:
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
        """As Spool.enqueue_report: the DSN and the marks of what it reports in one
        transaction, only while this owner holds those rows; None when it no longer does."""
        now = self.clock()
        owner = self.owner
        insert = _insert_of(
            _row(qid, report, now, owner if claimed else "", self.lease), self.clock
        )
        addrs = list(dict.fromkeys(failed))

        event = "delay_dsn_queued" if delay_warning else "dsn_queued"

        async def run(conn: Conn) -> bool | None:
            warned = await _lock_message(conn, about)
            if delay_warning and (warned is None or warned):
                return None
            if addrs:
                mine = await conn.fetchval(
                    "SELECT count(*) FROM queue_recipients WHERE qid=$1"
                    f" AND address=ANY($2::text[]) AND {_OWED} AND lease_owner=$3",
                    about,
                    addrs,
                    owner,
                )
                if mine != len(addrs):
                    return None
            if delay_warning:
                await conn.execute("UPDATE queue_messages SET delay_warned=true WHERE id=$1", about)
            if addrs:
                await conn.execute(
                    "UPDATE queue_recipients SET dsn_done=true, lease_owner='', lease_expiry=0"
                    " WHERE qid=$1 AND address=ANY($2::text[])",
                    about,
                    addrs,
                )
            await _log(conn, [(about, now, a, event, qid, "", "") for a in addrs or ("",)])
            await insert(conn)
            if not addrs:
                return False
            return (await _settle(conn, about, owner, now, self.clock() + self.lease))[0]

        return await self.store.write(run)

    async def set_delay_warned(self, qid: QueueId) -> None:
        await self.store.write(
            lambda c: c.execute("UPDATE queue_messages SET delay_warned=true WHERE id=$1", qid),
            single=True,
        )

    async def mark_corrupt(self, qid: QueueId) -> None:
        await self.store.write(
            lambda c: c.execute("UPDATE queue_messages SET corrupt=true WHERE id=$1", qid),
            single=True,
        )

    async def expire_leases(self, keep: Iterable[QueueId] = ()) -> int:
        """The sweeper (any node's): every in-flight recipient whose lease expired is queued
        again, due now; rows a live transaction holds are skipped (SKIP LOCKED), this
        owner's running attempts (``keep``) are left alone. Returns how many."""
        now, owner, kept = self.clock(), self.owner, list(set(keep))

        async def run(conn: Conn) -> int:
            n = rowcount(
                await conn.execute(
                    "UPDATE queue_recipients r SET state=$1, next_attempt=0, lease_owner='',"
                    " lease_expiry=0 FROM (SELECT qid, address FROM queue_recipients"
                    " WHERE state=$2 AND lease_expiry<=$3"
                    " AND NOT (lease_owner=$4 AND qid=ANY($5::text[]))"
                    " FOR UPDATE SKIP LOCKED) x WHERE r.qid=x.qid AND r.address=x.address",
                    _Q,
                    _I,
                    now,
                    owner,
                    kept,
                )
            )
            if n:  # due now for any node (the UPDATE has committed)
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return n

        return await self.store.write(run, single=True)

    async def heartbeat(self) -> None:
        """Each sweeper round: this owner's row in relay_nodes says it is alive now (and
        rows silent for NODE_RETENTION are forgotten), for `relay nodes`."""
        now, owner = self.clock(), self.owner
        node = owner.split(":", 1)[0]
        await self.store.write(
            lambda c: c.execute(
                "WITH gone AS (DELETE FROM relay_nodes WHERE heartbeat < $4)"
                " INSERT INTO relay_nodes(owner, node_id, started, heartbeat)"
                " VALUES($1, $2, $3, $3) ON CONFLICT (owner) DO UPDATE SET heartbeat=$3",
                owner,
                node,
                now,
                now - NODE_RETENTION,
            ),
            single=True,
        )

    async def nodes(self) -> list[NodeRow]:
        """Every lease owner heard from (newest heartbeat first), with the recipients it
        holds in flight now."""

        async def run(conn: Conn) -> list[NodeRow]:
            rows = await conn.fetch(
                "SELECT n.owner, n.node_id, n.started, n.heartbeat,"
                " (SELECT count(*) FROM queue_recipients r WHERE r.lease_owner=n.owner"
                " AND r.state=$1) FROM relay_nodes n ORDER BY n.heartbeat DESC, n.owner",
                _I,
            )
            return [NodeRow(r[0], r[1], float(r[2]), float(r[3]), int(r[4])) for r in rows]

        return await self.store.read(run)

    async def release(self, qids: Iterable[QueueId]) -> int:
        ids = list(qids)
        if not ids:
            return 0
        owner = self.owner

        async def run(conn: Conn) -> int:
            n = rowcount(
                await conn.execute(
                    "UPDATE queue_recipients SET state=$1, next_attempt=0, lease_owner='',"
                    " lease_expiry=0 WHERE state=$2 AND lease_owner=$3 AND qid=ANY($4::text[])",
                    _Q,
                    _I,
                    owner,
                    ids,
                )
            )
            await conn.execute(
                "UPDATE queue_recipients SET lease_expiry=0"
                f" WHERE {_OWED} AND lease_owner=$1 AND qid=ANY($2::text[])",
                owner,
                ids,
            )
            if n:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return n

        return await self.store.write(run)

    async def flush(self) -> int:
        return await self.store.write(
            lambda c: _count(
                c.execute(
                    "UPDATE queue_recipients SET next_attempt=0 WHERE state IN ($1, $2)", _D, _Q
                )
            ),
            single=True,
        )

    async def flush_domain(self, domain: str) -> int:
        """Make the queued and deferred recipients of one domain due now."""
        dom = address_domain(domain)
        return await self.store.write(
            lambda c: _count(
                c.execute(
                    "UPDATE queue_recipients SET next_attempt=0 WHERE state IN ($1, $2)"
                    f" AND {_DOMAIN_OF}=$3",
                    _D,
                    _Q,
                    dom,
                )
            ),
            single=True,
        )

    async def delete(self, qid: QueueId) -> bool:
        return bool(await self.delete_many([qid]))

    async def delete_many(self, qids: Sequence[QueueId]) -> list[QueueId]:
        """Delete those messages (no DSN); return the ids that existed."""
        now, ids = self.clock(), list(qids)
        return await self.store.write(lambda c: _delete(c, ids, now))

    async def delete_all(self) -> int:
        now = self.clock()

        async def run(conn: Conn) -> int:
            ids = [r[0] for r in await conn.fetch("SELECT id FROM queue_messages")]
            return len(await _delete(conn, ids, now))

        return await self.store.write(run)

    async def hold(self, qids: Sequence[QueueId]) -> list[QueueId]:
        """Put messages on hold (postsuper -h): not claimed by any node until released;
        an attempt already running finishes."""
        return await self._set_held(qids, True, "held")

    async def unhold(self, qids: Sequence[QueueId]) -> list[QueueId]:
        """Release held messages (postsuper -H); their due recipients go at once."""
        return await self._set_held(qids, False, "released")

    async def requeue(self, qids: Sequence[QueueId]) -> list[QueueId]:
        """Release from hold and make every queued or deferred recipient due now."""
        now, ids = self.clock(), list(qids)

        async def run(conn: Conn) -> list[QueueId]:
            rows = await conn.fetch(
                "UPDATE queue_messages SET held=false WHERE id=ANY($1::text[]) RETURNING id", ids
            )
            found = [q for q in ids if q in {r[0] for r in rows}]
            await conn.execute(
                "UPDATE queue_recipients SET next_attempt=0 WHERE qid=ANY($1::text[])"
                " AND state IN ($2, $3)",
                found,
                _Q,
                _D,
            )
            await _log(conn, [(q, now, "", "requeued", "", "", "") for q in found])
            if found:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return found

        return await self.store.write(run)

    async def _set_held(self, qids: Sequence[QueueId], held: bool, event: str) -> list[QueueId]:
        now, ids = self.clock(), list(qids)

        async def run(conn: Conn) -> list[QueueId]:
            rows = await conn.fetch(
                "UPDATE queue_messages SET held=$1 WHERE id=ANY($2::text[]) RETURNING id",
                held,
                ids,
            )
            found = [q for q in ids if q in {r[0] for r in rows}]
            await _log(conn, [(q, now, "", event, "", "", "") for q in found])
            if found and not held:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return found

        return await self.store.write(run)

    # ------------------------------------------------------------ reads

    async def due(self, now: float, limit: int, exclude: set[QueueId]) -> list[QueueId]:
        async def run(conn: Conn) -> list[QueueId]:
            rows = await conn.fetch(
                "SELECT r.qid FROM queue_recipients r JOIN queue_messages m ON m.id=r.qid"
                " WHERE r.state IN ($1, $2) AND r.next_attempt<=$3 AND NOT m.corrupt"
                " AND NOT m.held"
                " AND r.qid<>ALL($4::text[]) GROUP BY r.qid ORDER BY min(r.next_attempt)"
                " LIMIT $5",
                _Q,
                _D,
                now,
                list(exclude),
                limit,
            )
            return [r[0] for r in rows]

        return await self.store.read(run)

    async def unreported(self, limit: int, exclude: set[QueueId]) -> list[QueueId]:
        now = self.clock()

        async def run(conn: Conn) -> list[QueueId]:
            rows = await conn.fetch(
                "SELECT DISTINCT r.qid FROM queue_recipients r JOIN queue_messages m"
                f" ON m.id=r.qid WHERE {_OWED_R} AND r.lease_expiry<=$1"
                " AND NOT m.corrupt AND r.qid<>ALL($2::text[]) LIMIT $3",
                now,
                list(exclude),
                limit,
            )
            return [r[0] for r in rows]

        return await self.store.read(run)

    async def next_due(self) -> float | None:
        async def run(conn: Conn) -> float | None:
            v = await conn.fetchval(
                "SELECT min(next_attempt) FROM queue_recipients WHERE state IN ($1, $2)", _Q, _D
            )
            return None if v is None else float(v)

        return await self.store.read(run)

    async def load(self, qid: QueueId) -> tuple[QueuedMessage, bytes] | None:
        return await self.store.read(lambda c: _load(c, qid, with_data=True))

    async def get(self, qid: QueueId) -> QueuedMessage | None:
        res = await self.store.read(lambda c: _load(c, qid, with_data=False))
        return None if res is None else res[0]

    async def prune_log(self, before: float) -> int:
        """Forget the history of messages no longer queued, older than ``before``."""
        return await self.store.write(
            lambda c: _count(
                c.execute(
                    "DELETE FROM queue_log l WHERE at<$1"
                    " AND NOT EXISTS (SELECT 1 FROM queue_messages m WHERE m.id=l.qid)",
                    before,
                )
            ),
            single=True,
        )

    async def history(self, qid: QueueId) -> list[LogEntry]:
        """Every line of a message's history still kept, oldest first."""

        async def run(conn: Conn) -> list[LogEntry]:
            rows = await conn.fetch(
                "SELECT qid, at, address, event, reply, mx_host, tls FROM queue_log"
                " WHERE qid=$1 ORDER BY at, id",
                qid,
            )
            return [LogEntry(*tuple(r)) for r in rows]

        return await self.store.read(run)

    async def list(self, where: ListFilter | None = None) -> list[QueuedMessage]:
        """The queue (or one page of it), in arrival order."""
        return await self.store.read(lambda c: _list(c, where or ListFilter()))


async def _count(status: Awaitable[str]) -> int:
    return rowcount(await status)


# a recipient whose DSN is owed: failed, or delivered with a "relayed" DSN to send
_OWED = "(state='failed' OR (state='delivered' AND relayed_owed)) AND NOT dsn_done"
_OWED_R = "(r.state='failed' OR (r.state='delivered' AND r.relayed_owed)) AND NOT r.dsn_done"
# relay.store.address_domain in SQL: after the last "@", lower case, no trailing dot
_DOMAIN_OF = "rtrim(lower(substring(address from '[^@]*$')), '.')"


def queue_insert(
    qid: QueueId, msg: NewMessage, now: float, *, owner: str = "", until: float = 0.0
) -> Callable[[Conn], Awaitable[None]]:
    """The write that queues a message, for callers that queue it in one transaction with
    their own rows (list fan-out): recipients queued (every node woken at commit), or
    (``owner``) in flight under owner's lease until ``until``, for that owner's scheduler
    that is handed the message at once (the caller's transaction is running: ``until``
    is computed in it)."""
    return _insert_of(_row(qid, msg, now, owner, until - now), lambda: now)


@dataclass(frozen=True)
class _Row:
    """One message to insert: its columns, its recipients' columns, the history line."""

    msg: tuple[Any, ...]  # id, mail_from, data, size, message_id, created, flags,
    # client_ip, helo, env_from, ret, envid
    rcpts: tuple[tuple[Any, ...], ...]  # address, pos, orig, notify, orcpt
    owner: str  # in flight under this owner's lease; "" queued for anyone
    lease: float  # seconds the lease runs from the statement that inserts the row
    received: str

    @property
    def state(self) -> str:
        return _I if self.owner else _Q


def _insert_of(row: _Row, clock: Callable[[], float]) -> Callable[[Conn], Awaitable[None]]:
    async def run(conn: Conn) -> None:
        await _insert_rows(conn, [row], clock())

    return run


def _row(qid: QueueId, msg: NewMessage, now: float, owner: str, lease: float) -> _Row:
    return _Row(
        msg=(
            qid,
            msg.mail_from,
            msg.data,
            len(msg.data),
            msg.msgid(),
            now,
            msg.flags,
            msg.client_ip,
            msg.helo,
            msg.env_from,
            msg.ret,
            msg.envid,
        ),
        rcpts=tuple((a, pos, o, n, c) for pos, (a, o, n, c) in enumerate(msg.recipient_rows())),
        owner=owner,
        lease=lease if owner else 0.0,
        received=received_line(msg),
    )


# unnest()'s column types of queue_messages, in _Row.msg order
_MSG_TYPES = (
    "text", "text", "bytea", "int", "text", "float8", "int", "text", "text", "text", "text",
    "text",
)  # fmt: skip
_N_MSG = len(_MSG_TYPES)
# and of queue_recipients: qid, address, pos, orig, notify, orcpt, state, owner, expiry
_RCPT_TYPES = ("text", "text", "int", "text", "text", "text", "text", "text", "float8")
_N_RCPT = len(_RCPT_TYPES)


def _params(first: int, types: Sequence[str]) -> str:
    return ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))


_INSERT_SQL = (
    # one statement (one round trip) for any number of messages: the messages, their
    # recipients, their history lines and, for mail any node may take, the wake-up (sent
    # by the server at commit). In autocommit it is one transaction: all or none.
    "WITH m AS (INSERT INTO queue_messages(id, mail_from, data, size, message_id, created,"
    f" flags, client_ip, helo, env_from, ret, envid) SELECT * FROM unnest({_params(1, _MSG_TYPES)})"
    " RETURNING id, created),"
    " r AS (INSERT INTO queue_recipients(qid, address, pos, orig, state, next_attempt,"
    " lease_owner, lease_expiry, notify, orcpt) SELECT m.id, t.a, t.p, t.o, t.s,"
    f" m.created, t.w, t.e, t.n, t.c FROM unnest({_params(_N_MSG + 1, _RCPT_TYPES)})"
    " AS t(q, a, p, o, n, c, s, w, e) JOIN m ON m.id = t.q),"
    " l AS (INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)"
    " SELECT m.id, m.created, '', 'received', u.rc, '', '' FROM m JOIN unnest($1::text[],"
    f" ${_N_MSG + _N_RCPT + 1}::text[]) AS u(i, rc) ON u.i = m.id)"
    f" SELECT pg_notify(${_N_MSG + _N_RCPT + 3}, m.id) FROM m JOIN unnest($1::text[],"
    f" ${_N_MSG + _N_RCPT + 2}::bool[]) AS k(i, wake) ON k.i = m.id WHERE k.wake"
)


async def _insert_rows_now(clock: Callable[[], float], conn: Conn, rows: list[_Row]) -> None:
    """The group commit's merger (``PgStore.write(merge=...)``): ``rows`` queued, the
    leases of claimed ones running from now."""
    await _insert_rows(conn, rows, clock())


async def _insert_rows(conn: Conn, rows: list[_Row], at: float) -> None:
    """Queue ``rows`` in one statement; a claimed row's lease expires ``at`` + its lease."""
    msg_cols = [list(c) for c in zip(*(r.msg for r in rows), strict=True)]
    rc: list[list[Any]] = [[] for _ in range(_N_RCPT)]
    for r in rows:
        expiry = at + r.lease if r.owner else 0.0
        for a, pos, o, n, c in r.rcpts:
            for col, v in zip(
                rc, (r.msg[0], a, pos, o, n, c, r.state, r.owner, expiry), strict=True
            ):
                col.append(v)
    await conn.execute(
        _INSERT_SQL,
        *msg_cols,
        *rc,
        [r.received for r in rows],
        [not r.owner for r in rows],
        CHANNEL,
    )


async def _log(conn: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append lines to the message history (queue_log), in the caller's transaction."""
    if rows:
        cols = list(zip(*rows, strict=True))
        await conn.execute(
            "INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)"
            " SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[],"
            " $5::text[], $6::text[], $7::text[])",
            *(list(c) for c in cols),
        )


async def _delete(conn: Conn, ids: list[QueueId], now: float) -> list[QueueId]:
    rows = await conn.fetch("DELETE FROM queue_messages WHERE id=ANY($1::text[]) RETURNING id", ids)
    gone = {r[0] for r in rows}
    found = [q for q in dict.fromkeys(ids) if q in gone]
    await _log(conn, [(q, now, "", "removed", "deleted by the operator", "", "") for q in found])
    return found


async def _lock_message(conn: Conn, qid: str) -> bool | None:
    """Lock the message row (serialises the settles of one message across nodes); return
    its delay_warned mark, None when it is gone."""
    row = await conn.fetchrow(
        "SELECT delay_warned FROM queue_messages WHERE id=$1 FOR NO KEY UPDATE", qid
    )
    return None if row is None else bool(row[0])


async def _settle(
    conn: Conn,
    qid: str,
    owner: str,
    now: float,
    until: float,
    rcpts: tuple[QueuedRecipient, ...] | None = None,
) -> tuple[bool, tuple[QueuedRecipient, ...]]:
    """As spool._settle (the message row is locked by the caller; ``settle_plan``
    decides): delete the message when nothing is pending and no DSN is owed, else lease
    the owed whose lease is free and return them. ``rcpts``: the recipients as read
    under the lock already (record's statement), else read here."""
    if rcpts is None:
        rcpts = await _recipients(conn, qid)
    owed = [r for r in rcpts if r.dsn_owed]
    sender = None
    if owed:
        sender = await conn.fetchrow("SELECT mail_from, flags FROM queue_messages WHERE id=$1", qid)
    plan = settle_plan(rcpts, owed, sender, owner, now)
    if plan.quiet:
        await conn.execute(
            "UPDATE queue_recipients SET dsn_done=true, lease_owner='', lease_expiry=0"
            " WHERE qid=$1 AND address=ANY($2::text[])",
            qid,
            [r.address for r in plan.quiet],
        )
    if plan.delete:  # one statement: the delete and its history line
        await conn.execute(
            "WITH d AS (DELETE FROM queue_messages WHERE id=$1 RETURNING id)"
            " INSERT INTO queue_log(qid, at, address, event, reply, mx_host, tls)"
            " SELECT id, $2, '', 'removed', 'done', '', '' FROM d",
            qid,
            now,
        )
        return True, ()
    if plan.mine:
        await conn.execute(
            "UPDATE queue_recipients SET lease_owner=$1, lease_expiry=$2"
            " WHERE qid=$3 AND address=ANY($4::text[])",
            owner,
            until,
            qid,
            [r.address for r in plan.mine],
        )
    return False, plan.mine


async def _recipients(conn: Conn, qid: str) -> tuple[QueuedRecipient, ...]:
    rows = await conn.fetch(
        f"SELECT {RCPT_COLS} FROM queue_recipients WHERE qid=$1 ORDER BY pos", qid
    )
    return tuple(rcpt_of_row(r) for r in rows)


async def _load(conn: Conn, qid: str, with_data: bool) -> tuple[QueuedMessage, bytes] | None:
    cols = f"{MSG_COLS}, data" if with_data else MSG_COLS
    row = await conn.fetchrow(f"SELECT {cols} FROM queue_messages WHERE id=$1", qid)
    if row is None:
        return None
    data = bytes(row[N_MSG_COLS]) if with_data else b""
    if with_data and len(data) != row[2]:
        raise ValueError(f"queue message {qid} is corrupt (size mismatch)")
    return msg_of_row(row, await _recipients(conn, qid)), data


async def _list(conn: Conn, where: ListFilter) -> list[QueuedMessage]:
    """One query: a page of messages (those with a matching recipient) joined with their
    matching recipients, in arrival order (as the SQLite spool's)."""
    rcond: list[str] = []
    args: list[Any] = []
    if where.domain:
        args.append(address_domain(where.domain))
        rcond.append(f"{_DOMAIN_OF.replace('address', 'r.address')}=${len(args)}")
    mcond: list[str] = []
    if where.state == "held":
        mcond.append("m.held")
    elif where.state:
        args.append(where.state)
        rcond.append(f"r.state=${len(args)}")
    rwhere = " AND ".join(rcond)
    if rcond:
        mcond.append(f"EXISTS (SELECT 1 FROM queue_recipients r WHERE r.qid=m.id AND {rwhere})")
    mwhere = f" WHERE {' AND '.join(mcond)}" if mcond else ""
    page = ""
    if where.limit:
        page += f" LIMIT {int(where.limit)}"
    if where.offset:
        page += f" OFFSET {int(where.offset)}"
    mcols = ", ".join(f"m.{c.strip()}" for c in MSG_COLS.split(","))
    rcols = ", ".join(f"r.{c.strip()}" for c in RCPT_COLS.split(","))
    sql = (
        f"SELECT {mcols}, {rcols} FROM"
        f" (SELECT {mcols} FROM queue_messages m{mwhere} ORDER BY m.created, m.id{page}) m"
        " LEFT JOIN queue_recipients r ON r.qid=m.id"
        + (f" AND {rwhere}" if rcond else "")
        + " ORDER BY m.created, m.id, r.pos"
    )
    out: list[QueuedMessage] = []
    head: Sequence[Any] | None = None
    rcpts: list[QueuedRecipient] = []
    for row in await conn.fetch(sql, *args):
        if head is None or row[0] != head[0]:
            if head is not None:
                out.append(msg_of_row(head, tuple(rcpts)))
            head, rcpts = tuple(row)[:N_MSG_COLS], []
        if row[N_MSG_COLS] is not None:
            rcpts.append(rcpt_of_row(tuple(row)[N_MSG_COLS:]))
    if head is not None:
        out.append(msg_of_row(head, tuple(rcpts)))
    return out
