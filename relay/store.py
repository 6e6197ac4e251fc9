"""The one storage layer under everything that persists (queue, MTA-STS cache, TLS-RPT ledger).

Owns the SQLite database (WAL, synchronous=FULL so every commit is fsync'd), per-component
schema migrations, and the group-commit writer: one thread takes every write waiting at
that moment, runs each in its own savepoint, and commits them with one fsync. ``write``
returns only after the commit is durable, so callers may acknowledge (SMTP 250) then.
Savepoints keep their undo pages in memory (``temp_store=MEMORY``): on disk, the first
change of each page in each savepoint was a write to a temporary file, which made a
message's outcome cost twice what its SQL does.
A failed write raises StoreError; the others in the same group are unaffected.
Reads run on a separate connection and thread, so they never wait for a commit.

Space is given back as the queue drains: the database uses SQLite's incremental
auto-vacuum (a store made before that is converted once, with VACUUM, when it is opened),
and the writer, when it finds itself idle with free pages over ``VACUUM_FREE_PAGES``,
returns them to the file system (``PRAGMA incremental_vacuum``) and checkpoints the WAL.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relay import logs, metrics
from relay.errors import StoreError

T = TypeVar("T")
log = logs.get("relay.store")

_STOP = object()


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | None
    done: threading.Event | None = None
    result: Any = None
    error: BaseException | None = None
    raw: bool = False  # run outside a transaction, between two commit groups


VACUUM_FREE_PAGES = 256  # free pages (1 MiB at 4 KiB) worth giving back when idle
VACUUM_STEP = 4096  # pages given back per idle step (16 MiB), so a write waits little
VACUUM_CHECK = 1.0  # seconds between idle checks of the free page count


def address_domain(address: str | None) -> str:
    """SQL function relay_domain(address): the domain of an address, lower case."""
    return (address or "").rpartition("@")[2].lower().rstrip(".")


# prepared statements a connection keeps: every statement of the queue, the lists and the
# caches fits, so a group commit that mixes them compiles none twice
CACHED_STATEMENTS = 512


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        str(path),
        timeout=30.0,
        isolation_level=None,
        check_same_thread=False,
        cached_statements=CACHED_STATEMENTS,
    )
    conn.create_function("relay_domain", 1, address_domain, deterministic=True)
    # before the first table (a new file) or before the journal mode (an old one, which
    # ensure_auto_vacuum converts): INCREMENTAL frees pages only on request
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA journal_size_limit=67108864")  # the WAL shrinks back after a drain
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class Store:
    """SQLite store with a group-commit writer thread. Use ``async with Store(path)``."""

    def __init__(self, path: str | os.PathLike[str], *, convert: bool = True) -> None:
        """``convert``: turn an older store to incremental auto-vacuum at open (a VACUUM;
        the relay does it, under its store lock; commands reading a live store do not)."""
        self.path = Path(path)
        self.convert = convert
        self._jobs: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-read")
        self._rconn: sqlite3.Connection | None = None
        self.commits = 0  # number of fsync'd commits (group commit makes this < writes)
        self.writes = 0
        self.fail_writes: Callable[[], bool] | None = None  # fault injection for tests
        self.vacuum_free_pages = VACUUM_FREE_PAGES
        self.pages_reclaimed = 0
        self._vacuum_checked = 0.0

    # -------------------------------------------------------------- lifecycle

    def open(self) -> Store:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._wconn = _connect(self.path)
            if self.convert:
                ensure_auto_vacuum(self._wconn)
            self._wconn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._writer = threading.Thread(target=self._run_writer, name="store-writer", daemon=True)
        self._writer.start()
        return self

    async def __aenter__(self) -> Store:
        return self.open()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        if self._writer is not None:
            self._jobs.put(_STOP)
            self._writer.join()
            self._writer = None
        self._reader.shutdown(wait=True)
        for c in (self._wconn, self._rconn):
            if c is not None:
                c.close()
        self._wconn = self._rconn = None

    def migrate(self, component: str, steps: Sequence[str]) -> None:
        """Apply the schema steps of component not applied yet (synchronously, at start)."""

        def run(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT version FROM schema_version WHERE component=?", (component,)
            ).fetchone()
            have = row[0] if row else 0
            for i, stmt in enumerate(steps[have:], start=have + 1):
                # executescript would COMMIT the group; run each DDL statement alone
                for part in stmt.split(";"):
                    if part.strip():
                        conn.execute(part)
                conn.execute(
                    "INSERT INTO schema_version(component, version) VALUES(?, ?) "
                    "ON CONFLICT(component) DO UPDATE SET version=excluded.version",
                    (component, i),
                )

        self.write_sync(run)

    # -------------------------------------------------------------- writes

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) inside a group commit; return its result once durable."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._submit(_Job(fn, loop, fut))
        return await fut

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Blocking write for start-up, CLI commands and threads."""
        job = _Job(fn, None, None, threading.Event())
        self._submit(job)
        assert job.done is not None
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def _submit(self, job: _Job) -> None:
        if self._writer is None:
            raise StoreError("store is not open")
        self._jobs.put(job)

    def reclaim(self, max_pages: int = 0) -> int:
        """Give free pages back to the file system now (0: all of them); return how many.
        Blocking; runs on the writer thread between commits."""
        return self.write_raw(lambda conn: _reclaim(conn, max_pages))

    def write_raw(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) on the writer connection outside any transaction (PRAGMAs that
        cannot run inside one), between two commit groups."""
        job = _Job(fn, None, None, threading.Event(), raw=True)
        self._submit(job)
        assert job.done is not None
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def _idle(self, conn: sqlite3.Connection) -> None:
        """Nothing to write: give back free pages, a step at a time, if there are many."""
        now = time.monotonic()
        if now - self._vacuum_checked < VACUUM_CHECK:
            return
        self._vacuum_checked = now
        try:
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free >= self.vacuum_free_pages:
                n = _reclaim(conn, VACUUM_STEP)
                self.pages_reclaimed += n
                log.debug("store_reclaimed", pages=n)
                self._vacuum_checked = 0.0  # more may follow at once if still idle
        except sqlite3.Error as exc:
            log.warning("store_reclaim_failed", error=str(exc))

    def _run_writer(self) -> None:
        conn = self._wconn
        assert conn is not None
        while True:
            try:
                first = self._jobs.get(timeout=VACUUM_CHECK)
            except queue.Empty:
                self._idle(conn)
                continue
            if first is _STOP:
                return
            if isinstance(first, _Job) and first.raw:
                self._run_raw(conn, first)
                continue
            batch: list[_Job] = [first]  # type: ignore[list-item]
            stop = False
            while True:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)  # type: ignore[arg-type]
            raw = [j for j in batch if j.raw]
            batch = [j for j in batch if not j.raw]
            if batch:
                self._commit_batch(conn, batch)
            for job in raw:
                self._run_raw(conn, job)
            if stop:
                return
            if self._jobs.empty():
                self._idle(conn)

    @staticmethod
    def _run_raw(conn: sqlite3.Connection, job: _Job) -> None:
        try:
            job.result = job.fn(conn)
        except Exception as exc:
            job.result = None
            job.error = exc if isinstance(exc, StoreError) else _wrap(exc)
        Store._finish_batch([job])

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        started = time.monotonic()
        try:
            if self.fail_writes is not None and self.fail_writes():
                raise sqlite3.OperationalError("disk I/O error (injected)")
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:  # one name: each job's savepoint is gone before the next
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.fn(conn)
                    conn.execute("RELEASE job")
                except Exception as exc:  # the job's own error: roll back only this job
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    job.error = exc if isinstance(exc, StoreError) else _wrap(exc)
            conn.execute("COMMIT")
            metrics.commit(time.monotonic() - started)
            self.commits += 1
            self.writes += len(batch)
        except Exception as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            log.error("store_commit_failed", error=str(exc), batch=len(batch))
            for job in batch:
                job.error = StoreError(f"store commit failed: {exc}")
        self._finish_batch(batch)

    @staticmethod
    def _finish_batch(batch: list[_Job]) -> None:
        """Wake the waiters: threads by their event, each event loop once for the group."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            if job.done is not None:
                job.done.set()
            else:
                assert job.loop is not None
                by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, jobs)
            except RuntimeError:  # loop closed
                pass

    # -------------------------------------------------------------- reads

    def _read_conn(self) -> sqlite3.Connection:
        if self._rconn is None:
            self._rconn = _connect(self.path)
        return self._rconn

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) on the read connection, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._read_job, fn)

    def read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._reader.submit(self._read_job, fn).result()

    def _read_job(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._read_conn()
        try:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc


def ensure_auto_vacuum(conn: sqlite3.Connection) -> None:
    """Convert a store made without incremental auto-vacuum (the mode of a database with
    tables changes only through VACUUM): once, at open, before any migration."""
    mode = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
    if mode == 2:
        return
    has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    if has_tables:
        log.info("store_converting", mode="incremental auto-vacuum", action="VACUUM")
        conn.execute("VACUUM")


def _reclaim(conn: sqlite3.Connection, max_pages: int) -> int:
    before = conn.execute("PRAGMA freelist_count").fetchone()[0]
    if not before:
        return 0
    step = f"({int(max_pages)})" if max_pages else ""
    # executescript steps the pragma to its end (execute() frees only one page)
    conn.executescript(f"PRAGMA incremental_vacuum{step}")
    after = conn.execute("PRAGMA freelist_count").fetchone()[0]
    # the file shrinks at the checkpoint; PASSIVE never waits for readers (a long read
    # elsewhere must not stall the writer, and with it every 250)
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return int(before - after)


def _resolve(jobs: list[_Job]) -> None:
    """On the loop: settle the futures of a commit group's jobs."""
    for job in jobs:
        fut = job.future
        assert fut is not None
        if fut.cancelled():
            continue
        if job.error is not None:
            fut.set_exception(job.error)
        else:
            fut.set_result(job.result)


def _wrap(exc: BaseException) -> StoreError:
    err = StoreError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
