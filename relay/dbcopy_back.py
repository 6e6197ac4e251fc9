"""``relay db copy --from postgresql://... --to sqlite:PATH``: a PostgreSQL store copied
back into a new SQLite store (from several nodes to one), without loss.

The SQLite file is built under a temporary name beside PATH — every component's SQLite
schema at this relay's version, then the tables of ``relay.dbcopy.COPIES`` read from ONE
repeatable-read snapshot of the database (a cursor per table, 500 rows at a time) and
written by the SQLite store's writer — then closed, fsynced and renamed onto PATH: a
failure at any step leaves PATH as it was. Columns are copied by name (those both sides
have); rows in the order that keeps their meaning (a message's recipients by ``pos``,
the history by ``id``, the archive by ``seq``); a recipient in flight is queued again,
due now, without a lease, as ``relay db copy`` the other way and a SQLite relay's start
do. Refused while a node of the source has a heartbeat within ``lease``, and when PATH
exists unless ``force`` (then it is replaced, under its store lock, its WAL checkpointed
into it first so the old file is whole until the rename).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from relay.dbcopy import (
    COPIES,
    Copied,
    CopyFailed,
    Outcome,
    Refused,
    refuse_if_alive,
    sqlite_schemas,
    target_columns,
)
from relay.errors import StartupError, StoreError
from relay.pgstore import Conn, PgStore
from relay.store import Store

BATCH = 500
_ORDER = {"queue_recipients": "qid, pos", "queue_log": "id", "list_archive": "seq"}
# a recipient in flight at the copy: queued again, due now, no lease
_REQUEUE = {"state": "queued", "next_attempt": 0.0, "lease_owner": "", "lease_expiry": 0.0}


def parse_target(value: str) -> Path:
    scheme, sep, path = value.partition(":")
    if scheme != "sqlite" or not sep or not path:
        raise StartupError(f"db copy: --to must be sqlite:PATH, not {value!r}")
    return Path(path)


def check_target(target: Path, force: bool) -> None:
    """PATH must be new (or replaced with ``force``) in an existing directory."""
    if target.exists() and not force:
        raise StartupError(
            f"db copy: {target} exists: copy to a new path, or add --force to replace it"
        )
    if not target.parent.is_dir():
        raise StartupError(f"db copy: no directory {target.parent}")


async def copy_to_sqlite(
    source: PgStore,
    target: Path,
    components: list[str],
    *,
    lease: float,
    force: bool = False,
    now: float | None = None,
) -> Outcome:
    """Build ``target`` from the source's tables of ``components``; see the module."""
    now = time.time() if now is None else now
    await asyncio.to_thread(check_target, target, force)
    tmp = target.with_name(f".{target.name}.copy-{os.getpid()}")
    _remove(tmp)
    store = Store(tmp).open()
    try:
        schemas = sqlite_schemas()
        for comp in components:
            store.migrate(comp, schemas[comp])

        async def run(conn: Conn) -> list[Copied]:
            await refuse_if_alive(conn, source.url, now, lease)
            return [
                await _copy_table(conn, store, t.name) for comp in components for t in COPIES[comp]
            ]

        try:
            copied = await source.read(run)
        except (Refused, CopyFailed) as exc:  # raised inside the read: nothing was written
            raise StartupError(f"db copy: {exc}") from None
        except StoreError as exc:
            raise StartupError(f"db copy: {exc} (nothing was copied)") from exc
    except BaseException:
        store.close()
        _remove(tmp)
        raise
    store.close()
    _fsync(tmp)
    _settle(target)
    os.replace(tmp, target)
    _fsync(target.parent)
    return Outcome(tuple(copied), (), ())


async def _copy_table(conn: Conn, store: Store, table: str) -> Copied:
    pg_cols = [c.name for c in await target_columns(conn, table)]
    sq_cols = await store.read(
        lambda c: [r[1] for r in c.execute(f'PRAGMA table_info("{table}")').fetchall()]
    )
    if not sq_cols:
        raise CopyFailed(f"no table {table} in this relay's SQLite schema")
    cols = [c for c in pg_cols if c in sq_cols]
    requeue = (
        [(cols.index(k), v) for k, v in _REQUEUE.items() if k in cols]
        if table == "queue_recipients"
        else []
    )
    state = cols.index("state") if requeue else -1
    total = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    select = f"SELECT {', '.join(cols)} FROM {table} ORDER BY {_ORDER.get(table, '1')}"
    insert = f'INSERT INTO "{table}"({", ".join(cols)}) VALUES({", ".join("?" * len(cols))})'
    n = 0
    batch: list[tuple[Any, ...]] = []
    async for record in conn.cursor(select, prefetch=BATCH):
        row = list(record)
        if requeue and row[state] == "inflight":
            for i, v in requeue:
                row[i] = v
        batch.append(tuple(row))
        if len(batch) >= BATCH:
            n += _write(store, table, insert, batch, n, total)
            batch = []
    if batch:
        n += _write(store, table, insert, batch, n, total)
    if n != total:
        raise CopyFailed(f"{table}: {n} rows copied of {total}")
    return Copied(table, n)


def _write(
    store: Store, table: str, insert: str, rows: list[tuple[Any, ...]], done: int, total: int
) -> int:
    try:
        store.write_sync(lambda c: c.executemany(insert, rows))
    except Exception as exc:  # noqa: BLE001 - any refusal of SQLite's, named with the table
        raise CopyFailed(f"{table} rows {done + 1}-{done + len(rows)} of {total}: {exc}") from exc
    return len(rows)


def _settle(target: Path) -> None:
    """A store about to be replaced (``force``): its WAL checkpointed into the file and
    gone, so nothing of it is applied to the new file, and the old file is whole until
    the rename."""
    if not target.exists():
        return
    try:
        conn = sqlite3.connect(target)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()  # the last connection: SQLite removes the (empty) WAL
    except sqlite3.Error as exc:
        raise StartupError(f"db copy: cannot settle {target} before replacing it: {exc}") from exc
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{target}{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    for p in (str(path), f"{path}-wal", f"{path}-shm", f"{path}.lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
