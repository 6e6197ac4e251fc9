"""The lists' tables in the store, and every change to them.

Members (state ``active`` | ``disabled`` | ``pending``, bounce score, since) each have one
token, 128 random bits as 32 hex digits, stored and bound to (list, member): it is the
one-click unsubscribe URI's and the VERP address's. Subscription requests have their own
confirm tokens. A post is stored with the recipients it goes to, in the write that
precedes the 250; the fan-out marks each recipient done in the same transaction that
queues its copy, so it completes idempotently after a crash. Held posts and the archive
live here too. Every function is a coroutine over a ``relay.lists.tx.Tx``, a transaction
of the SQLite or the PostgreSQL store (the same SQL on both; ``?`` placeholders): callers
run them in a ``ListsDb.write`` / ``read`` (durable before return). The changes that
decide between concurrent callers are single statements (``DELETE ... RETURNING``, an
upsert with a condition), so two PostgreSQL nodes doing the same thing at once find one
winner, as SQLite's single writer does; the writes about one post take its row lock first
(``lock_post``). ``PG_MIGRATIONS`` is the PostgreSQL schema: the tables and columns of the
SQLite one (``relay db copy`` copies them column by column).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from relay.lists.tx import Tx
from relay.store import Store

MIGRATIONS = [
    """
    CREATE TABLE list_members (
        list TEXT NOT NULL,
        address TEXT NOT NULL,
        state TEXT NOT NULL,
        score REAL NOT NULL DEFAULT 0,
        since REAL NOT NULL,
        last_scored TEXT NOT NULL DEFAULT '',
        disabled_at REAL NOT NULL DEFAULT 0,
        token TEXT NOT NULL UNIQUE,
        PRIMARY KEY (list, address)
    );
    CREATE TABLE list_confirms (
        token TEXT PRIMARY KEY,
        list TEXT NOT NULL,
        address TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE list_confirm_sent (
        list TEXT NOT NULL,
        address TEXT NOT NULL,
        sent REAL NOT NULL,
        PRIMARY KEY (list, address)
    );
    CREATE TABLE list_posts (
        id TEXT PRIMARY KEY,
        list TEXT NOT NULL,
        data BLOB NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE list_fanout (
        post TEXT NOT NULL REFERENCES list_posts(id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (post, address)
    );
    CREATE INDEX list_fanout_todo ON list_fanout(post, done);
    CREATE TABLE list_held (
        id TEXT PRIMARY KEY,
        list TEXT NOT NULL,
        mail_from TEXT NOT NULL,
        author TEXT NOT NULL,
        subject TEXT NOT NULL,
        reason TEXT NOT NULL,
        data BLOB NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE list_archive (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        list TEXT NOT NULL,
        mail_from TEXT NOT NULL,
        data BLOB NOT NULL,
        created REAL NOT NULL
    );
    """,
    # the verdict at intake (our A-R value, the ARC chain's cv), which the copies' one
    # ARC set repeats: intake no longer seals what goes to the lists
    """
    ALTER TABLE list_posts ADD COLUMN ar TEXT NOT NULL DEFAULT '';
    ALTER TABLE list_posts ADD COLUMN arc_cv TEXT NOT NULL DEFAULT '';
    ALTER TABLE list_held ADD COLUMN ar TEXT NOT NULL DEFAULT '';
    ALTER TABLE list_held ADD COLUMN arc_cv TEXT NOT NULL DEFAULT ''
    """,
    # the web archive: each post's id (its Archived-At URI's last segment) and
    # Message-ID, both looked up from the URL
    """
    ALTER TABLE list_archive ADD COLUMN archive_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE list_archive ADD COLUMN message_id TEXT NOT NULL DEFAULT '';
    UPDATE list_archive SET archive_id = 'a' || seq WHERE archive_id = '';
    CREATE INDEX list_archive_id ON list_archive(list, archive_id);
    CREATE INDEX list_archive_mid ON list_archive(list, message_id)
    """,
    # the fan-out's lease: the owner (a worker of a node) making a post's copies, until
    # when; another owner takes an unfinished post over only once the lease has expired
    """
    ALTER TABLE list_posts ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE list_posts ADD COLUMN lease_expiry REAL NOT NULL DEFAULT 0
    """,
]

# PostgreSQL (relay.pgschema): the SQLite schema after its steps above, the same tables
# and columns (``done`` stays an integer, ``seq`` an identity that ``relay db copy`` sets)
PG_MIGRATIONS = [
    """
    CREATE TABLE list_members (
        list text NOT NULL,
        address text NOT NULL,
        state text NOT NULL,
        score float8 NOT NULL DEFAULT 0,
        since float8 NOT NULL,
        last_scored text NOT NULL DEFAULT '',
        disabled_at float8 NOT NULL DEFAULT 0,
        token text NOT NULL UNIQUE,
        PRIMARY KEY (list, address)
    );
    CREATE TABLE list_confirms (
        token text PRIMARY KEY,
        list text NOT NULL,
        address text NOT NULL,
        created float8 NOT NULL
    );
    CREATE TABLE list_confirm_sent (
        list text NOT NULL,
        address text NOT NULL,
        sent float8 NOT NULL,
        PRIMARY KEY (list, address)
    );
    CREATE TABLE list_posts (
        id text PRIMARY KEY,
        list text NOT NULL,
        data bytea NOT NULL,
        created float8 NOT NULL,
        ar text NOT NULL DEFAULT '',
        arc_cv text NOT NULL DEFAULT ''
    );
    CREATE TABLE list_fanout (
        post text NOT NULL REFERENCES list_posts(id) ON DELETE CASCADE,
        address text NOT NULL,
        done integer NOT NULL DEFAULT 0,
        PRIMARY KEY (post, address)
    );
    CREATE INDEX list_fanout_todo ON list_fanout(post) WHERE done = 0;
    CREATE TABLE list_held (
        id text PRIMARY KEY,
        list text NOT NULL,
        mail_from text NOT NULL,
        author text NOT NULL,
        subject text NOT NULL,
        reason text NOT NULL,
        data bytea NOT NULL,
        created float8 NOT NULL,
        ar text NOT NULL DEFAULT '',
        arc_cv text NOT NULL DEFAULT ''
    );
    CREATE TABLE list_archive (
        seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        list text NOT NULL,
        mail_from text NOT NULL,
        data bytea NOT NULL,
        created float8 NOT NULL,
        archive_id text NOT NULL DEFAULT '',
        message_id text NOT NULL DEFAULT ''
    );
    CREATE INDEX list_archive_id ON list_archive(list, archive_id);
    CREATE INDEX list_archive_mid ON list_archive(list, message_id)
    """,
    """
    ALTER TABLE list_posts ADD COLUMN lease_owner text NOT NULL DEFAULT '',
        ADD COLUMN lease_expiry float8 NOT NULL DEFAULT 0
    """,
]

# (our Authentication-Results value, the ARC chain's cv: none|pass|fail) of a post as
# intake judged it; ("", "") for a post stored before these were kept
PostVerdict = tuple[str, str]

State = Literal["active", "disabled", "pending"]


def new_token() -> str:
    """128 random bits, lower-case hex (safe in a local part and a URL path)."""
    return secrets.token_hex(16)


def normalise(address: str) -> str:
    """Member key: the local part as given, the domain lower-cased."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    return f"{local}@{domain.lower().rstrip('.')}"


@dataclass(frozen=True, slots=True)
class Member:
    list: str
    address: str
    state: State
    score: float
    since: float
    token: str
    last_scored: str = ""
    disabled_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Held:
    id: str
    list: str
    mail_from: str
    author: str
    subject: str
    reason: str
    created: float


_M_COLS = "list, address, state, score, since, token, last_scored, disabled_at"


def _member(row: Sequence[object]) -> Member:
    return Member(
        str(row[0]),
        str(row[1]),
        str(row[2]),  # type: ignore[arg-type]
        float(row[3]),  # type: ignore[arg-type]
        float(row[4]),  # type: ignore[arg-type]
        str(row[5]),
        str(row[6]),
        float(row[7]),  # type: ignore[arg-type]
    )


def open_tables(store: Store) -> None:
    """The SQLite tables (PostgreSQL's are made by relay.pgschema at start)."""
    store.migrate("lists", MIGRATIONS)


# ---------------------------------------------------------------- members


async def get_member(c: Tx, lst: str, address: str) -> Member | None:
    row = await c.fetchone(
        f"SELECT {_M_COLS} FROM list_members WHERE list=? AND address=?", lst, normalise(address)
    )
    return None if row is None else _member(row)


async def member_by_token(c: Tx, token: str) -> Member | None:
    row = await c.fetchone(f"SELECT {_M_COLS} FROM list_members WHERE token=?", token.lower())
    return None if row is None else _member(row)


async def members(c: Tx, lst: str) -> list[Member]:
    rows = await c.fetchall(
        f"SELECT {_M_COLS} FROM list_members WHERE list=? ORDER BY address", lst
    )
    return [_member(r) for r in rows]


async def add_member(c: Tx, lst: str, address: str, now: float, state: State = "active") -> bool:
    """Add (or re-activate) a member; True when it was not active before."""
    addr = normalise(address)
    if await c.execute(
        "INSERT INTO list_members(list, address, state, since, token) VALUES(?,?,?,?,?) "
        "ON CONFLICT(list, address) DO NOTHING",
        lst,
        addr,
        state,
        now,
        new_token(),
    ):
        return True
    # already there (or another node added it just now): a change only from another state
    return bool(
        await c.execute(
            "UPDATE list_members SET state=?, since=?, score=0, disabled_at=0 WHERE list=? AND "
            "address=? AND state<>?",
            state,
            now,
            lst,
            addr,
            state,
        )
    )


async def remove_member(c: Tx, lst: str, address: str) -> bool:
    n = await c.execute(
        "DELETE FROM list_members WHERE list=? AND address=?", lst, normalise(address)
    )
    return n > 0


async def remove_by_token(c: Tx, token: str) -> Member | None:
    row = await c.fetchone(
        f"DELETE FROM list_members WHERE token=? RETURNING {_M_COLS}", token.lower()
    )
    return None if row is None else _member(row)


async def set_score(c: Tx, m: Member, score: float, day: str, disabled_at: float) -> None:
    state = "disabled" if disabled_at else m.state
    await c.execute(
        "UPDATE list_members SET score=?, last_scored=?, disabled_at=?, state=? "
        "WHERE list=? AND address=?",
        float(score),
        day,
        float(disabled_at),
        state,
        m.list,
        m.address,
    )


async def expired_disabled(c: Tx, before: float) -> list[Member]:
    rows = await c.fetchall(
        f"SELECT {_M_COLS} FROM list_members WHERE state='disabled' AND disabled_at<?",
        float(before),
    )
    return [_member(r) for r in rows]


# ---------------------------------------------------------------- confirmations


async def confirm_allowed(c: Tx, lst: str, address: str, now: float, interval: float) -> bool:
    """At most one confirmation request per address per interval (and record this one):
    one upsert, so two nodes asked at once send one."""
    row = await c.fetchone(
        "INSERT INTO list_confirm_sent(list, address, sent) VALUES(?,?,?) "
        "ON CONFLICT(list, address) DO UPDATE SET sent=excluded.sent "
        "WHERE excluded.sent - list_confirm_sent.sent >= ? RETURNING sent",
        lst,
        normalise(address),
        float(now),
        float(interval),
    )
    return row is not None


async def new_confirm(c: Tx, lst: str, address: str, now: float) -> str:
    token = new_token()
    await c.execute(
        "INSERT INTO list_confirms(token, list, address, created) VALUES(?,?,?,?)",
        token,
        lst,
        normalise(address),
        float(now),
    )
    if await get_member(c, lst, address) is None:
        await add_member(c, lst, address, now, "pending")
    return token


async def confirm_lookup(c: Tx, token: str, oldest: float) -> tuple[str, str] | None:
    row = await c.fetchone(
        "SELECT list, address FROM list_confirms WHERE token=? AND created>=?",
        token.lower(),
        float(oldest),
    )
    return None if row is None else (str(row[0]), str(row[1]))


async def take_confirm(c: Tx, token: str, oldest: float, now: float) -> Member | None:
    """Use a confirm token: the address becomes an active member; the token is spent
    (by exactly one caller)."""
    row = await c.fetchone(
        "DELETE FROM list_confirms WHERE token=? AND created>=? RETURNING list, address",
        token.lower(),
        float(oldest),
    )
    if row is None:
        return None
    lst, address = str(row[0]), str(row[1])
    await add_member(c, lst, address, now, "active")
    return await get_member(c, lst, address)


# ---------------------------------------------------------------- posts and fan-out


async def lock_post(c: Tx, post_id: str) -> None:
    """On PostgreSQL, the post's row lock (once per transaction): the writes about one
    post's fan-out (claims, marks, the delete when done) of two nodes run one after the
    other, so the last one sees every recipient done. SQLite has one writer already."""
    if c.dialect == "postgresql" and post_id not in c.locked:
        await c.execute("SELECT 1 FROM list_posts WHERE id=? FOR UPDATE", post_id)
        c.locked.add(post_id)


async def store_post(
    c: Tx,
    post_id: str,
    lst: str,
    data: bytes,
    rcpts: Sequence[str],
    now: float,
    verdict: PostVerdict = ("", ""),
    lease: tuple[str, float] = ("", 0.0),
) -> None:
    """The post and its recipients; ``lease`` (owner, expiry): the fan-out's, taken by
    the owner that will start it once this write is committed."""
    await c.execute(
        "INSERT INTO list_posts(id, list, data, created, ar, arc_cv, lease_owner,"
        " lease_expiry) VALUES(?,?,?,?,?,?,?,?)",
        post_id,
        lst,
        data,
        float(now),
        *verdict,
        lease[0],
        float(lease[1]),
    )
    await c.executemany(
        "INSERT INTO list_fanout(post, address) VALUES(?,?) ON CONFLICT DO NOTHING",
        [(post_id, a) for a in rcpts],
    )


async def active_addresses(c: Tx, lst: str) -> list[str]:
    rows = await c.fetchall(
        "SELECT address FROM list_members WHERE list=? AND state='active' ORDER BY address", lst
    )
    return [str(r[0]) for r in rows]


async def unfinished_posts(c: Tx, now: float | None = None, owner: str = "") -> list[str]:
    """Posts with recipients still to get their copy (with ``now``: only those whose
    fan-out lease has expired by then, was never taken, or is ``owner``'s)."""
    rows = await c.fetchall(
        "SELECT p.id FROM list_posts p WHERE (p.lease_expiry<? OR p.lease_owner=?)"
        " AND EXISTS (SELECT 1 FROM list_fanout f WHERE f.post=p.id AND f.done=0)"
        " ORDER BY p.id",
        float("inf") if now is None else float(now),
        owner,  # "" matches only posts never leased, which the expiry matches too
    )
    return [str(r[0]) for r in rows]


@dataclass(frozen=True, slots=True)
class Fanout:
    """A post whose copies are still being made: recipients left, the fan-out's lease."""

    post: str
    left: int
    lease_owner: str
    lease_expiry: float


async def fanouts(c: Tx, lst: str) -> list[Fanout]:
    """The list's unfinished posts, oldest first."""
    rows = await c.fetchall(
        "SELECT p.id, (SELECT count(*) FROM list_fanout f WHERE f.post=p.id AND f.done=0),"
        " p.lease_owner, p.lease_expiry FROM list_posts p WHERE p.list=? ORDER BY p.created, p.id",
        lst,
    )
    return [Fanout(str(r[0]), int(r[1]), str(r[2]), float(r[3])) for r in rows if int(r[1])]


async def take_fanout(c: Tx, post_id: str, owner: str, now: float, until: float) -> bool:
    """The fan-out's lease of a post for ``owner`` until ``until``: True when it was
    free, expired or already ``owner``'s (one statement: of two owners at once, one
    wins), False while another owner's lease runs or the post is gone."""
    n = await c.execute(
        "UPDATE list_posts SET lease_owner=?, lease_expiry=? WHERE id=?"
        " AND (lease_owner=? OR lease_expiry<?)",
        owner,
        float(until),
        post_id,
        owner,
        float(now),
    )
    return n > 0


async def renew_fanout(c: Tx, post_id: str, owner: str, until: float) -> bool:
    """Push ``owner``'s fan-out lease to ``until``; False when another owner took the
    post over meanwhile (or it is finished and gone)."""
    n = await c.execute(
        "UPDATE list_posts SET lease_expiry=? WHERE id=? AND lease_owner=?",
        float(until),
        post_id,
        owner,
    )
    return n > 0


def release_fanouts(store: Store) -> int:
    """At the start of a relay on a SQLite store (which one relay holds): the fan-out
    leases of the processes before it are stale; every unfinished post is free to take
    at once. Returns how many were released."""
    open_tables(store)
    return store.write_sync(
        lambda conn: (
            conn.execute(
                "UPDATE list_posts SET lease_owner='', lease_expiry=0 WHERE lease_owner!=''"
            ).rowcount
        )
    )


async def post_data(c: Tx, post_id: str) -> tuple[str, bytes] | None:
    row = await c.fetchone("SELECT list, data FROM list_posts WHERE id=?", post_id)
    return None if row is None else (str(row[0]), bytes(row[1]))


async def post_verdict(c: Tx, post_id: str) -> PostVerdict:
    row = await c.fetchone("SELECT ar, arc_cv FROM list_posts WHERE id=?", post_id)
    return ("", "") if row is None else (str(row[0]), str(row[1]))


async def fanout_todo(c: Tx, post_id: str, limit: int, after: str = "") -> list[tuple[str, str]]:
    """(address, token) of recipients still to get their copy, in address order, those
    after ``after`` only (the next page); a recipient who left the list since the post
    is marked done without a copy."""
    rows = await c.fetchall(
        "SELECT f.address, m.token FROM list_fanout f JOIN list_posts p ON p.id=f.post "
        "LEFT JOIN list_members m ON m.list=p.list AND m.address=f.address "
        "WHERE f.post=? AND f.done=0 AND f.address>? ORDER BY f.address LIMIT ?",
        post_id,
        after,
        limit,
    )
    return [(str(r[0]), str(r[1] or "")) for r in rows]


async def claim_recipient(c: Tx, post_id: str, address: str) -> bool:
    """Mark one recipient done; False when it already was (its copy is queued)."""
    await lock_post(c, post_id)
    n = await c.execute(
        "UPDATE list_fanout SET done=1 WHERE post=? AND address=? AND done=0", post_id, address
    )
    return n > 0


async def mark_done(c: Tx, post_id: str, addresses: Sequence[str]) -> None:
    await lock_post(c, post_id)
    await c.executemany(
        "UPDATE list_fanout SET done=1 WHERE post=? AND address=?",
        [(post_id, a) for a in addresses],
    )
    left = await c.fetchone("SELECT 1 FROM list_fanout WHERE post=? AND done=0 LIMIT 1", post_id)
    if left is None:
        await c.execute("DELETE FROM list_posts WHERE id=?", post_id)


# ---------------------------------------------------------------- held posts


async def hold(
    c: Tx,
    held_id: str,
    lst: str,
    mail_from: str,
    author: str,
    subject: str,
    reason: str,
    data: bytes,
    now: float,
    verdict: PostVerdict = ("", ""),
) -> None:
    await c.execute(
        "INSERT INTO list_held(id, list, mail_from, author, subject, reason, data, created, "
        "ar, arc_cv) VALUES(?,?,?,?,?,?,?,?,?,?)",
        held_id,
        lst,
        mail_from,
        author,
        subject[:200],
        reason,
        data,
        float(now),
        *verdict,
    )


_H_COLS = "id, list, mail_from, author, subject, reason, created"


def _held(r: Sequence[object]) -> Held:
    return Held(
        str(r[0]),
        str(r[1]),
        str(r[2]),
        str(r[3]),
        str(r[4]),
        str(r[5]),
        float(r[6]),  # type: ignore[arg-type]
    )


async def held_posts(c: Tx, lst: str) -> list[Held]:
    rows = await c.fetchall(f"SELECT {_H_COLS} FROM list_held WHERE list=? ORDER BY created", lst)
    return [_held(r) for r in rows]


async def take_held(c: Tx, lst: str, held_id: str) -> tuple[Held, bytes, PostVerdict] | None:
    """Take a held post out (approve, reject, expiry): exactly one caller gets it."""
    row = await c.fetchone(
        f"DELETE FROM list_held WHERE list=? AND id=? RETURNING {_H_COLS}, data, ar, arc_cv",
        lst,
        held_id,
    )
    if row is None:
        return None
    return _held(row[:7]), bytes(row[7]), (str(row[8]), str(row[9]))


async def expired_held(c: Tx, before: float) -> list[Held]:
    rows = await c.fetchall(f"SELECT {_H_COLS} FROM list_held WHERE created<?", float(before))
    return [_held(r) for r in rows]


# ---------------------------------------------------------------- archive


@dataclass(frozen=True, slots=True)
class Archived:
    id: str  # the archive id (the post's id; 'a' + seq for posts archived before ids)
    created: float
    data: bytes


async def archive(
    c: Tx,
    lst: str,
    mail_from: str,
    data: bytes,
    now: float,
    archive_id: str = "",
    message_id: str = "",
) -> None:
    row = await c.fetchone(
        "INSERT INTO list_archive(list, mail_from, data, created, archive_id, message_id) "
        "VALUES(?,?,?,?,?,?) RETURNING seq",
        lst,
        mail_from,
        data,
        float(now),
        archive_id,
        message_id,
    )
    if not archive_id and row is not None:
        await c.execute("UPDATE list_archive SET archive_id = 'a' || seq WHERE seq=?", row[0])


async def archive_page(c: Tx, lst: str, limit: int, offset: int) -> tuple[list[Archived], int]:
    """A page of the archive, newest first, and how many posts it holds."""
    rows = await c.fetchall(
        "SELECT archive_id, created, data FROM list_archive WHERE list=? "
        "ORDER BY seq DESC LIMIT ? OFFSET ?",
        lst,
        limit,
        offset,
    )
    total = await c.fetchone("SELECT COUNT(*) FROM list_archive WHERE list=?", lst)
    assert total is not None
    return [Archived(str(r[0]), float(r[1]), bytes(r[2])) for r in rows], int(total[0])


async def archived_post(c: Tx, lst: str, ident: str) -> Archived | None:
    """One archived post by its archive id or its Message-ID (without the brackets)."""
    row = await c.fetchone(
        "SELECT archive_id, created, data FROM list_archive WHERE list=? AND archive_id=? "
        "UNION ALL SELECT archive_id, created, data FROM list_archive WHERE list=? AND "
        "message_id=? LIMIT 1",
        lst,
        ident,
        lst,
        ident,
    )
    return None if row is None else Archived(str(row[0]), float(row[1]), bytes(row[2]))


async def archived(c: Tx, lst: str) -> list[tuple[str, float, bytes]]:
    rows = await c.fetchall(
        "SELECT mail_from, created, data FROM list_archive WHERE list=? ORDER BY seq", lst
    )
    return [(str(r[0]), float(r[1]), bytes(r[2])) for r in rows]
