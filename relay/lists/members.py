"""The lists' tables in the store, and every change to them.

Members (state ``active`` | ``disabled`` | ``pending``, bounce score, since) each have one
token, 128 random bits as 32 hex digits, stored and bound to (list, member): it is the
one-click unsubscribe URI's and the VERP address's. Subscription requests have their own
confirm tokens. A post is stored with the recipients it goes to, in the write that
precedes the 250; the fan-out marks each recipient done in the same transaction that
queues its copy, so it completes idempotently after a crash. Held posts and the archive
live here too. Every function takes a ``sqlite3.Connection``: callers run them in a
``Store.write`` / ``Store.read`` (group commit, fsync before return).
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
    store.migrate("lists", MIGRATIONS)


# ---------------------------------------------------------------- members


def get_member(conn: sqlite3.Connection, lst: str, address: str) -> Member | None:
    row = conn.execute(
        f"SELECT {_M_COLS} FROM list_members WHERE list=? AND address=?",
        (lst, normalise(address)),
    ).fetchone()
    return None if row is None else _member(row)


def member_by_token(conn: sqlite3.Connection, token: str) -> Member | None:
    row = conn.execute(
        f"SELECT {_M_COLS} FROM list_members WHERE token=?", (token.lower(),)
    ).fetchone()
    return None if row is None else _member(row)


def members(conn: sqlite3.Connection, lst: str) -> list[Member]:
    rows = conn.execute(
        f"SELECT {_M_COLS} FROM list_members WHERE list=? ORDER BY address", (lst,)
    ).fetchall()
    return [_member(r) for r in rows]


def add_member(
    conn: sqlite3.Connection, lst: str, address: str, now: float, state: State = "active"
) -> bool:
    """Add (or re-activate) a member; True when it was not active before."""
    addr = normalise(address)
    old = get_member(conn, lst, addr)
    if old is None:
        conn.execute(
            "INSERT INTO list_members(list, address, state, since, token) VALUES(?,?,?,?,?)",
            (lst, addr, state, now, new_token()),
        )
        return True
    if old.state == state:
        return False
    conn.execute(
        "UPDATE list_members SET state=?, since=?, score=0, disabled_at=0 WHERE list=? AND "
        "address=?",
        (state, now, lst, addr),
    )
    return True


def remove_member(conn: sqlite3.Connection, lst: str, address: str) -> bool:
    cur = conn.execute(
        "DELETE FROM list_members WHERE list=? AND address=?", (lst, normalise(address))
    )
    return cur.rowcount > 0


def remove_by_token(conn: sqlite3.Connection, token: str) -> Member | None:
    m = member_by_token(conn, token)
    if m is not None:
        conn.execute("DELETE FROM list_members WHERE token=?", (m.token,))
    return m


def set_score(
    conn: sqlite3.Connection, m: Member, score: float, day: str, disabled_at: float
) -> None:
    state = "disabled" if disabled_at else m.state
    conn.execute(
        "UPDATE list_members SET score=?, last_scored=?, disabled_at=?, state=? "
        "WHERE list=? AND address=?",
        (score, day, disabled_at, state, m.list, m.address),
    )


def expired_disabled(conn: sqlite3.Connection, before: float) -> list[Member]:
    rows = conn.execute(
        f"SELECT {_M_COLS} FROM list_members WHERE state='disabled' AND disabled_at<?",
        (before,),
    ).fetchall()
    return [_member(r) for r in rows]


# ---------------------------------------------------------------- confirmations


def confirm_allowed(
    conn: sqlite3.Connection, lst: str, address: str, now: float, interval: float
) -> bool:
    """At most one confirmation request per address per interval (and record this one)."""
    addr = normalise(address)
    row = conn.execute(
        "SELECT sent FROM list_confirm_sent WHERE list=? AND address=?", (lst, addr)
    ).fetchone()
    if row is not None and now - float(row[0]) < interval:
        return False
    conn.execute(
        "INSERT INTO list_confirm_sent(list, address, sent) VALUES(?,?,?) "
        "ON CONFLICT(list, address) DO UPDATE SET sent=excluded.sent",
        (lst, addr, now),
    )
    return True


def new_confirm(conn: sqlite3.Connection, lst: str, address: str, now: float) -> str:
    token = new_token()
    conn.execute(
        "INSERT INTO list_confirms(token, list, address, created) VALUES(?,?,?,?)",
        (token, lst, normalise(address), now),
    )
    if get_member(conn, lst, address) is None:
        add_member(conn, lst, address, now, "pending")
    return token


def confirm_lookup(conn: sqlite3.Connection, token: str, oldest: float) -> tuple[str, str] | None:
    row = conn.execute(
        "SELECT list, address FROM list_confirms WHERE token=? AND created>=?",
        (token.lower(), oldest),
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def take_confirm(conn: sqlite3.Connection, token: str, oldest: float, now: float) -> Member | None:
    """Use a confirm token: the address becomes an active member; the token is spent."""
    found = confirm_lookup(conn, token, oldest)
    if found is None:
        return None
    lst, address = found
    conn.execute("DELETE FROM list_confirms WHERE token=?", (token.lower(),))
    add_member(conn, lst, address, now, "active")
    return get_member(conn, lst, address)


# ---------------------------------------------------------------- posts and fan-out


def store_post(
    conn: sqlite3.Connection,
    post_id: str,
    lst: str,
    data: bytes,
    rcpts: Sequence[str],
    now: float,
    verdict: PostVerdict = ("", ""),
) -> None:
    conn.execute(
        "INSERT INTO list_posts(id, list, data, created, ar, arc_cv) VALUES(?,?,?,?,?,?)",
        (post_id, lst, data, now, *verdict),
    )
    conn.executemany(
        "INSERT OR IGNORE INTO list_fanout(post, address) VALUES(?,?)",
        [(post_id, a) for a in rcpts],
    )


def active_addresses(conn: sqlite3.Connection, lst: str) -> list[str]:
    rows = conn.execute(
        "SELECT address FROM list_members WHERE list=? AND state='active' ORDER BY address", (lst,)
    ).fetchall()
    return [str(r[0]) for r in rows]


def unfinished_posts(conn: sqlite3.Connection, before: float | None = None) -> list[str]:
    """Posts with recipients still to get their copy (stored before ``before`` if given)."""
    rows = conn.execute(
        "SELECT DISTINCT f.post FROM list_fanout f JOIN list_posts p ON p.id=f.post "
        "WHERE f.done=0 AND p.created<? ORDER BY f.post",
        (float("inf") if before is None else before,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def post_data(conn: sqlite3.Connection, post_id: str) -> tuple[str, bytes] | None:
    row = conn.execute("SELECT list, data FROM list_posts WHERE id=?", (post_id,)).fetchone()
    return None if row is None else (str(row[0]), bytes(row[1]))


def post_verdict(conn: sqlite3.Connection, post_id: str) -> PostVerdict:
    row = conn.execute("SELECT ar, arc_cv FROM list_posts WHERE id=?", (post_id,)).fetchone()
    return ("", "") if row is None else (str(row[0]), str(row[1]))


def fanout_todo(
    conn: sqlite3.Connection, post_id: str, limit: int, after: str = ""
) -> list[tuple[str, str]]:
    """(address, token) of recipients still to get their copy, in address order, those
    after ``after`` only (the next page); a recipient who left the list since the post
    is marked done without a copy."""
    rows = conn.execute(
        "SELECT f.address, m.token FROM list_fanout f JOIN list_posts p ON p.id=f.post "
        "LEFT JOIN list_members m ON m.list=p.list AND m.address=f.address "
        "WHERE f.post=? AND f.done=0 AND f.address>? ORDER BY f.address LIMIT ?",
        (post_id, after, limit),
    ).fetchall()
    return [(str(r[0]), str(r[1] or "")) for r in rows]


def claim_recipient(conn: sqlite3.Connection, post_id: str, address: str) -> bool:
    """Mark one recipient done; False when it already was (its copy is queued)."""
    cur = conn.execute(
        "UPDATE list_fanout SET done=1 WHERE post=? AND address=? AND done=0", (post_id, address)
    )
    return cur.rowcount > 0


def mark_done(conn: sqlite3.Connection, post_id: str, addresses: Sequence[str]) -> None:
    conn.executemany(
        "UPDATE list_fanout SET done=1 WHERE post=? AND address=?",
        [(post_id, a) for a in addresses],
    )
    left = conn.execute(
        "SELECT 1 FROM list_fanout WHERE post=? AND done=0 LIMIT 1", (post_id,)
    ).fetchone()
    if left is None:
        conn.execute("DELETE FROM list_posts WHERE id=?", (post_id,))


# ---------------------------------------------------------------- held posts


def hold(
    conn: sqlite3.Connection,
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
    conn.execute(
        "INSERT INTO list_held(id, list, mail_from, author, subject, reason, data, created, "
        "ar, arc_cv) VALUES(?,?,?,?,?,?,?,?,?,?)",
        (held_id, lst, mail_from, author, subject[:200], reason, data, now, *verdict),
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


def held_posts(conn: sqlite3.Connection, lst: str) -> list[Held]:
    rows = conn.execute(
        f"SELECT {_H_COLS} FROM list_held WHERE list=? ORDER BY created", (lst,)
    ).fetchall()
    return [_held(r) for r in rows]


def take_held(
    conn: sqlite3.Connection, lst: str, held_id: str
) -> tuple[Held, bytes, PostVerdict] | None:
    row = conn.execute(
        f"SELECT {_H_COLS}, data, ar, arc_cv FROM list_held WHERE list=? AND id=?",
        (lst, held_id),
    ).fetchone()
    if row is None:
        return None
    conn.execute("DELETE FROM list_held WHERE id=?", (held_id,))
    return _held(row[:7]), bytes(row[7]), (str(row[8]), str(row[9]))


def expired_held(conn: sqlite3.Connection, before: float) -> list[Held]:
    rows = conn.execute(f"SELECT {_H_COLS} FROM list_held WHERE created<?", (before,)).fetchall()
    return [_held(r) for r in rows]


# ---------------------------------------------------------------- archive


@dataclass(frozen=True, slots=True)
class Archived:
    id: str  # the archive id (the post's id; 'a' + seq for posts archived before ids)
    created: float
    data: bytes


def archive(
    conn: sqlite3.Connection,
    lst: str,
    mail_from: str,
    data: bytes,
    now: float,
    archive_id: str = "",
    message_id: str = "",
) -> None:
    cur = conn.execute(
        "INSERT INTO list_archive(list, mail_from, data, created, archive_id, message_id) "
        "VALUES(?,?,?,?,?,?)",
        (lst, mail_from, data, now, archive_id, message_id),
    )
    if not archive_id:
        conn.execute(
            "UPDATE list_archive SET archive_id = 'a' || seq WHERE seq=?", (cur.lastrowid,)
        )


def archive_page(
    conn: sqlite3.Connection, lst: str, limit: int, offset: int
) -> tuple[list[Archived], int]:
    """A page of the archive, newest first, and how many posts it holds."""
    rows = conn.execute(
        "SELECT archive_id, created, data FROM list_archive WHERE list=? "
        "ORDER BY seq DESC LIMIT ? OFFSET ?",
        (lst, limit, offset),
    ).fetchall()
    total = conn.execute("SELECT COUNT(*) FROM list_archive WHERE list=?", (lst,)).fetchone()
    return [Archived(str(r[0]), float(r[1]), bytes(r[2])) for r in rows], int(total[0])


def archived_post(conn: sqlite3.Connection, lst: str, ident: str) -> Archived | None:
    """One archived post by its archive id or its Message-ID (without the brackets)."""
    row = conn.execute(
        "SELECT archive_id, created, data FROM list_archive WHERE list=? AND archive_id=? "
        "UNION ALL SELECT archive_id, created, data FROM list_archive WHERE list=? AND "
        "message_id=? LIMIT 1",
        (lst, ident, lst, ident),
    ).fetchone()
    return None if row is None else Archived(str(row[0]), float(row[1]), bytes(row[2]))


def archived(conn: sqlite3.Connection, lst: str) -> list[tuple[str, float, bytes]]:
    rows = conn.execute(
        "SELECT mail_from, created, data FROM list_archive WHERE list=? ORDER BY seq", (lst,)
    ).fetchall()
    return [(str(r[0]), float(r[1]), bytes(r[2])) for r in rows]
