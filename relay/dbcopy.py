"""``relay db copy``: a SQLite store's tables copied into a PostgreSQL store, in one
PostgreSQL transaction (a failure leaves the target as it was), without loss.

The PostgreSQL tables have the SQLite names and columns (docs/postgresql.md), so a table
is copied column by column: the target's columns (``information_schema``, in order) are
selected by name from the SQLite table and converted to the target's type (0/1 to
boolean, text or blob to bytea, numbers to float8 or integer); a column that is an
``ALWAYS`` identity (``queue_log.id``) is left to PostgreSQL, rows read in ``rowid`` order
so the new ids keep it; a ``BY DEFAULT`` identity (``list_archive.seq``) is copied and its
sequence moved past the largest. ``Table.exprs`` replaces a column's SQLite expression:
the queue's recipients get their ``pos`` (the ``rowid`` order) and lose their leases —
a recipient in flight is queued again, due now, as the SQLite relay's own start does
(``Spool.recover_sync``): no relay runs on either side during a copy.

``COPIES`` is the per-component hook: a component is copied when relay.pgschema has its
PostgreSQL schema; the others (MTA-STS cache, TLS-RPT ledger until they are ported) are
reported as skipped with their row counts. Adding one is one entry of its tables.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.errors import StartupError, StoreError
from relay.pgstore import Conn, PgStore, rowcount, safe_url


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    exprs: dict[str, str] = field(default_factory=dict)  # column -> SQLite expression
    order: str = "rowid"


_INFLIGHT = "state='inflight'"
COPIES: dict[str, tuple[Table, ...]] = {
    "queue": (
        Table("queue_messages"),
        Table(
            "queue_recipients",
            {
                "pos": "ROW_NUMBER() OVER (PARTITION BY qid ORDER BY rowid) - 1",
                "state": f"CASE WHEN {_INFLIGHT} THEN 'queued' ELSE state END",
                "next_attempt": f"CASE WHEN {_INFLIGHT} THEN 0 ELSE next_attempt END",
                "lease_owner": "''",
                "lease_expiry": "0",
            },
        ),
        Table("queue_log"),
    ),
    "arc_replay": (Table("arc_replay_seal"), Table("arc_replay_sealer")),
    "lists": (
        Table("list_members"),
        Table("list_confirms"),
        Table("list_confirm_sent"),
        Table("list_posts"),
        Table("list_fanout"),
        Table("list_held"),
        Table("list_archive", order="seq"),
    ),
    "mtasts": (Table("mtasts_policy"), Table("mtasts_failure"), Table("mtasts_meta")),
    "tlsrpt": (Table("tlsrpt_counts"), Table("tlsrpt_reports"), Table("tlsrpt_deliveries")),
}


@dataclass(frozen=True, slots=True)
class Copied:
    table: str
    rows: int


@dataclass(frozen=True, slots=True)
class Outcome:
    copied: tuple[Copied, ...]
    skipped: tuple[tuple[str, int], ...]  # (component, rows) with no PostgreSQL schema yet
    replaced: tuple[Copied, ...]  # the target's rows deleted first (--force)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    nullable: bool
    identity: str  # '' | 'ALWAYS' | 'BY DEFAULT'


def parse_source(value: str) -> Path:
    """``sqlite:PATH`` (the SQLite store file)."""
    scheme, sep, path = value.partition(":")
    if scheme != "sqlite" or not sep or not path:
        raise StartupError(f"db copy: --from must be sqlite:PATH, not {value!r}")
    p = Path(path)
    if not p.is_file():
        raise StartupError(f"db copy: store {p} does not exist")
    return p


def open_source(path: Path) -> sqlite3.Connection:
    """The SQLite store, read-only, in one read transaction (one instant of it)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise StartupError(f"db copy: cannot read store {path}: {exc}") from exc
    return conn


def _has_table(src: sqlite3.Connection, name: str) -> bool:
    return (
        src.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone()
        is not None
    )


def _count(src: sqlite3.Connection, name: str) -> int:
    return int(src.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0])


async def target_columns(conn: Conn, table: str) -> list[Column]:
    rows = await conn.fetch(
        "SELECT column_name, data_type, is_nullable, coalesce(identity_generation, '')"
        " FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = $1 ORDER BY ordinal_position",
        table,
    )
    if not rows:
        raise CopyFailed(f"no table {table} in the target (schema not migrated?)")
    return [Column(r[0], r[1], r[2] == "YES", r[3]) for r in rows]


def _converter(col: Column) -> Any:
    t = col.type
    if t == "boolean":
        conv: Any = bool
    elif t == "bytea":
        conv = lambda v: v.encode() if isinstance(v, str) else bytes(v)  # noqa: E731
    elif t in ("double precision", "real"):
        conv = float
    elif t in ("integer", "bigint", "smallint"):
        conv = int
    else:
        conv = str
    if col.nullable:
        return lambda v: None if v is None else conv(v)
    return conv


def _rows(
    src: sqlite3.Connection, table: Table, cols: list[Column], total: int
) -> Iterator[tuple[Any, ...]]:
    select = ", ".join(table.exprs.get(c.name, f'"{c.name}"') for c in cols)
    convs = [_converter(c) for c in cols]
    cur = src.execute(f'SELECT {select} FROM "{table.name}" ORDER BY {table.order}')
    n = 0
    while batch := cur.fetchmany(500):
        for row in batch:
            n += 1
            try:
                yield tuple(f(v) for f, v in zip(convs, row, strict=True))
            except (TypeError, ValueError) as exc:
                raise CopyFailed(f"{table.name} row {n} of {total}: {exc}") from exc


async def _copy_table(conn: Conn, src: sqlite3.Connection, table: Table) -> Copied:
    cols = [c for c in await target_columns(conn, table.name) if c.identity != "ALWAYS"]
    total = _count(src, table.name)
    try:
        status = await conn.copy_records_to_table(
            table.name,
            records=_rows(src, table, cols, total),
            columns=[c.name for c in cols],
        )
    except sqlite3.Error as exc:  # a column the target has and the source lacks
        raise CopyFailed(f"{table.name}: the source store does not match: {exc}") from exc
    copied = rowcount(status)
    if copied != total:
        raise CopyFailed(f"{table.name}: {copied} rows copied of {total}")
    for c in cols:
        if c.identity == "BY DEFAULT":
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table.name}', '{c.name}'),"
                f" coalesce((SELECT max({c.name}) FROM {table.name}), 0) + 1, false)"
            )
    return Copied(table.name, copied)


async def copy_store(
    src: sqlite3.Connection,
    target: PgStore,
    components: list[str],
    *,
    lease: float,
    force: bool = False,
    now: float | None = None,
) -> Outcome:
    """Copy the tables of ``components`` (those with a PostgreSQL schema; migrated by
    the caller) in one transaction. Refuses (StartupError, nothing written) while a node
    has a heartbeat within ``lease`` seconds, and when a target table holds rows unless
    ``force`` (then they are deleted first, in the same transaction)."""
    now = time.time() if now is None else now
    present = [t for comp in components for t in COPIES[comp] if _has_table(src, t.name)]
    skipped = tuple(
        (comp, sum(_count(src, t.name) for t in tables if _has_table(src, t.name)))
        for comp, tables in COPIES.items()
        if comp not in components
    )
    names = [t.name for comp in components for t in COPIES[comp]]

    async def run(conn: Conn) -> Outcome:
        await conn.execute("SET LOCAL lock_timeout = '10s'")
        # nodes starting meanwhile wait for the copy, then find its rows
        await conn.execute(f"LOCK TABLE {', '.join(names)}, relay_nodes IN EXCLUSIVE MODE")
        await refuse_if_alive(conn, target.url, now, lease)
        held = []
        for name in names:
            n = int(await conn.fetchval(f"SELECT count(*) FROM {name}"))
            if n:
                held.append(Copied(name, n))
        if held and not force:
            what = ", ".join(f"{h.table}: {h.rows} rows" for h in held)
            raise Refused(
                f"{safe_url(target.url)} already holds data ({what}): copy into an empty"
                " database, or add --force to replace it"
            )
        if held:
            await conn.execute(f"TRUNCATE {', '.join(h.table for h in held)} RESTART IDENTITY")
        copied = [await _copy_table(conn, src, t) for t in present]
        return Outcome(tuple(copied), skipped, tuple(held))

    try:
        return await target.write(run)
    except StoreError as exc:
        if isinstance(exc.__cause__, Refused | CopyFailed):
            raise StartupError(f"db copy: {exc.__cause__}") from None
        raise StartupError(f"db copy: {exc} (nothing was copied)") from exc


async def refuse_if_alive(conn: Conn, url: str, now: float, lease: float) -> None:
    """Refused while a node of the database at ``url`` has a heartbeat within ``lease``
    seconds of ``now`` (a copy either way needs every node stopped)."""
    alive = await conn.fetch(
        "SELECT node_id, owner FROM relay_nodes WHERE heartbeat > $1 ORDER BY heartbeat DESC",
        now - lease,
    )
    if alive:
        who = ", ".join(f"{r[0]} ({r[1]})" for r in alive)
        raise Refused(
            f"a relay runs on {safe_url(url)}: {who} (a heartbeat within"
            f" {lease:g} s; stop every node first)"
        )


def sqlite_schemas() -> dict[str, Sequence[str]]:
    """Each component's SQLite schema steps (what its store applies when it opens)."""
    from relay.auth import replay
    from relay.lists import members
    from relay.mtasts import cache
    from relay.queue import spool
    from relay.tlsrpt import ledger

    return {
        "queue": spool.MIGRATIONS,
        "arc_replay": replay.MIGRATIONS,
        "lists": members.MIGRATIONS,
        "mtasts": cache.MIGRATIONS,
        "tlsrpt": ledger.MIGRATIONS,
    }


class Refused(ValueError):
    """A refusal inside the copy's transaction (a ValueError is a write's own error to
    the store: rolled back, nothing written)."""


class CopyFailed(ValueError):
    """A row or table that cannot be copied (rolled back the same way)."""

    def __str__(self) -> str:
        return f"{super().__str__()} (nothing was copied)"
