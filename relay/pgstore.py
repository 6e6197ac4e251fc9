"""The PostgreSQL store (``[storage] url``): shared by several relay nodes.

The counterpart of relay/store.py for PostgreSQL, over asyncpg. Every session runs with
``synchronous_commit = on`` (a commit returns once it is durable on the server, so the
250 may follow). ``write(fn, group=True)`` is group commit, as the SQLite writer does, for
the writes that only insert (intake's messages): one writer task takes every such write
waiting at that moment and commits them at once — as one multi-row statement when they
are of one kind (intake's inserts: one round trip for the group), else in one transaction;
if one job fails on its own error, the group runs again with each job in its own savepoint
(that job's error rolls back only that job). Every other write (claims,
outcomes, sweeps: they lock existing rows) is its own short transaction, so two nodes never
hold each other's row locks in a cycle; one that still meets a deadlock or serialization
failure (rolled back by the server, nothing written) is retried, up to three times.
PostgreSQL itself shares one WAL flush between concurrent commits.

If a commit fails — the connection is lost, the server restarts or fails over — every
caller of the transaction gets StoreError (451 at intake), never a success for a write
that may not be durable; the connection is dropped and the next write takes a fresh one.
(A commit whose acknowledgement was lost may still have happened: the client retries, and
the message can be delivered twice — never lost.) Reads run on other pooled connections,
in a read-only transaction.

Schema migrations are versioned per component in ``relay_schema`` and applied in one
transaction under a transaction-scoped advisory lock, so when several nodes start at once
exactly one applies each step and the others wait, then see it done.

The password comes from the caller (``StorageConfig.password()``: RELAY_DB_PASSWORD or the
passfile) and is never logged; log lines name the database by its URL without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from relay import logs
from relay.errors import StoreError

if TYPE_CHECKING:
    from relay.config import StorageConfig

T = TypeVar("T")
log = logs.get("relay.pgstore")

Conn = Any  # asyncpg.Connection (asyncpg ships no type information)
WriteFn = Callable[[Conn], Awaitable[T]]

# pg_advisory_xact_lock key of schema migrations: int64 of b"relaySCH"
MIGRATION_LOCK = int.from_bytes(b"relaySCH", "big", signed=True)
_RETRY = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


# A group write that can be merged with others of its kind: (merger, item). A batch whose
# jobs all name the same merger runs as ``await merger(conn, items)``: ONE statement in
# autocommit (atomic: every item or none), instead of BEGIN, one statement a job, COMMIT.
Merger = Callable[[Conn, list[Any]], Awaitable[None]]
Merge = tuple[Merger, Any]


@dataclass
class _Job:
    fn: Callable[[Conn], Awaitable[Any]]
    future: asyncio.Future[Any]
    single: bool = False
    merge: Merge | None = None
    result: Any = None
    error: BaseException | None = field(default=None)


class PgStore:
    """asyncpg pool plus a group-commit writer task. Use ``async with PgStore(url)``."""

    def __init__(
        self,
        url: str,
        password: str | None = None,
        *,
        pool_size: int = 16,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        application_name: str = "relay",
        pgbouncer: bool = False,
        listen_url: str = "",
    ) -> None:
        """``application_name``: what pg_stat_activity shows for this store's
        connections (``relay:NODE_ID`` for a node; the server truncates it to 63 bytes).
        ``pgbouncer``: ``url`` is a pgbouncer in transaction pooling mode, where a
        client's consecutive transactions may run on different server connections: no
        prepared-statement cache (a statement prepared on one server connection does not
        exist on the next), no session settings (synchronous_commit must be on by the
        role's or database's default: checked at open), and LISTEN only over
        ``listen_url``, a direct connection (a LISTEN through the pooler would be left
        on whichever server connection ran it); without one, no LISTEN (polling)."""
        self.url = url
        self._application_name = application_name
        self.pgbouncer = pgbouncer
        self.listen_url = listen_url
        self._password = password
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._pool: Any = None
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0  # committed transactions (group commit makes this < writes)
        self.writes = 0
        self.fail_writes: Callable[[], bool] | None = None  # fault injection: fail a group
        # fault injection: run on the writer's connection just before COMMIT (before the
        # statement of a single-statement write, which commits itself)
        self.before_commit: Callable[[Conn], Awaitable[None]] | None = None

    # -------------------------------------------------------------- lifecycle

    async def open(self) -> PgStore:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                password=self._password,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings=self._server_settings(),
                reset=_keep_session,
                **({"statement_cache_size": 0} if self.pgbouncer else {}),
            )
            if self.pgbouncer:
                await self._check_durable_defaults()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            await self._drop_pool()
            raise StoreError(
                f"cannot open store {safe_url(self.url)}: {type(exc).__name__}: {exc}"
            ) from exc
        except StoreError:
            await self._drop_pool()
            raise
        self._writer = asyncio.create_task(self._run_writer(), name="pgstore-writer")
        return self

    def _server_settings(self) -> dict[str, str]:
        """Settings sent at connect time. Directly: synchronous_commit on for every
        session, whatever the database's default. Through pgbouncer only what it passes
        on (it refuses other startup parameters): the default is checked instead."""
        settings = {"application_name": self._application_name}
        if not self.pgbouncer:
            settings["synchronous_commit"] = "on"
        return settings

    async def _check_durable_defaults(self) -> None:
        """Behind pgbouncer no session setting survives a transaction, so the 250's
        promise rests on the server's default for this role and database."""
        value = await self._pool.fetchval("SELECT current_setting('synchronous_commit')")
        if value != "on":
            raise StoreError(
                f"store {safe_url(self.url)}: synchronous_commit is {value!r} for this role"
                " and database, and through pgbouncer the relay cannot set it per session"
                " (a 250 must follow a durable commit): ALTER ROLE ... SET"
                " synchronous_commit = on, or connect directly"
            )

    async def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.close()

    async def __aenter__(self) -> PgStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            await self._jobs.put(None)
            await self._writer
            self._writer = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def migrate(self, component: str, steps: Sequence[str]) -> int:
        """Apply the steps of component not applied yet, in one transaction under the
        migration advisory lock (one node applies them; the others wait, then skip).
        Returns the number of steps applied."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS relay_schema"
                    " (component text PRIMARY KEY, version integer NOT NULL)"
                )
                have = await conn.fetchval(
                    "SELECT version FROM relay_schema WHERE component=$1", component
                )
                have = int(have or 0)
                for stmt in steps[have:]:
                    await conn.execute(stmt)
                if len(steps) > have:
                    await conn.execute(
                        "INSERT INTO relay_schema(component, version) VALUES($1, $2)"
                        " ON CONFLICT (component) DO UPDATE SET version=excluded.version",
                        component,
                        len(steps),
                    )
                return max(0, len(steps) - have)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _wrap(exc) from exc

    async def schema_version(self, component: str) -> int:
        async def run(conn: Conn) -> int:
            if await conn.fetchval("SELECT to_regclass('relay_schema')") is None:
                return 0
            v = await conn.fetchval(
                "SELECT version FROM relay_schema WHERE component=$1", component
            )
            return int(v or 0)

        return await self.read(run)

    # -------------------------------------------------------------- writes

    async def write(
        self,
        fn: Callable[[Conn], Awaitable[T]],
        *,
        group: bool = False,
        single: bool = False,
        merge: Merge | None = None,
    ) -> T:
        """Run ``await fn(conn)`` in a transaction; return its result once committed.

        ``group``: for writes that only insert new rows (a message at intake): joined with
        every other such write waiting at that moment into one transaction (group commit).
        Writes that lock existing rows (claims, outcomes, sweeps) run alone, in a short
        transaction of their own: two nodes' groups locking rows of the same messages in
        different orders would deadlock. ``single``: fn runs exactly one statement, which
        commits by itself (no BEGIN/COMMIT round trips: claims, renewals, sweeps).
        ``merge`` (group writes): ``(merger, item)``, so that a group of such writes runs
        as one statement of all their items (``fn`` is this write alone, the fallback when
        that statement fails on an item's own error)."""
        if self._pool is None:
            raise StoreError("store is not open")
        if not group:
            return await self._transaction(fn, single)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Job(fn, fut, single, merge))
        return await fut

    async def _transaction(self, fn: Callable[[Conn], Awaitable[T]], single: bool) -> T:
        for attempt in (1, 2, 3):
            conn: Conn = None
            try:
                if self.fail_writes is not None and self.fail_writes():
                    raise OSError("connection lost (injected)")
                conn = await self._pool.acquire()
                tr = None if single else conn.transaction()
                if tr is not None:
                    await tr.start()
                elif self.before_commit is not None:  # the statement commits itself
                    await self.before_commit(conn)
                try:
                    result = await fn(conn)
                except _RETRY as exc:  # rolled back by the server: nothing was written
                    if tr is not None:
                        await tr.rollback()
                    if attempt < 3:
                        continue
                    raise _wrap(exc) from exc
                except (asyncpg.PostgresError, ValueError) as exc:  # the write's own error
                    if tr is not None:
                        await tr.rollback()
                    raise _wrap(exc) from exc
                if tr is not None:
                    if self.before_commit is not None:
                        await self.before_commit(conn)
                    await tr.commit()
                self.commits += 1
                self.writes += 1
                return result
            except StoreError:
                raise
            except Exception as exc:  # BEGIN or COMMIT failed: nothing is known durable
                log.error("store_commit_failed", error=f"{type(exc).__name__}: {exc}", batch=1)
                if conn is not None:
                    _terminate(conn)
                raise StoreError(f"store commit failed: {type(exc).__name__}: {exc}") from exc
            finally:
                if conn is not None:
                    await self._release(conn)
        raise AssertionError("unreachable")

    async def _release(self, conn: Conn) -> None:
        try:
            await self._pool.release(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # a dead connection: the pool opens another one

    async def _run_writer(self) -> None:
        while True:
            first = await self._jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while not self._jobs.empty():
                nxt = self._jobs.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            await self._commit_batch(batch)
            for job in batch:
                if job.future.cancelled():
                    continue
                if job.error is not None:
                    job.future.set_exception(job.error)
                else:
                    job.future.set_result(job.result)
            if stop:
                return

    async def _commit_batch(self, batch: list[_Job]) -> None:
        """One transaction for the batch. First without savepoints (one round trip per
        job); if a job fails on its own error, that attempt is rolled back (nothing of it
        is written) and the batch runs again with each job in its own savepoint. A batch
        of one single-statement job runs alone, in autocommit."""
        conn: Conn = None
        try:
            if self.fail_writes is not None and self.fail_writes():
                raise OSError("connection lost (injected)")
            conn = await self._pool.acquire()
            if len(batch) == 1 and batch[0].single:
                if self.before_commit is not None:  # the statement commits itself
                    await self.before_commit(conn)
                await self._run_job(conn, batch[0], savepoint=False, own=True)
            elif not await self._try_batch(conn, batch):
                tr = conn.transaction()
                await tr.start()
                for job in batch:
                    await self._run_job(conn, job, savepoint=len(batch) > 1)
                if self.before_commit is not None:
                    await self.before_commit(conn)
                await tr.commit()
            self.commits += 1
            self.writes += len(batch)
        except Exception as exc:  # BEGIN, a savepoint or COMMIT failed: nothing is known durable
            log.error("store_commit_failed", error=f"{type(exc).__name__}: {exc}", batch=len(batch))
            for job in batch:
                job.result = None
                job.error = StoreError(f"store commit failed: {type(exc).__name__}: {exc}")
            if conn is not None:
                _terminate(conn)  # never reuse a connection in an unknown state
        finally:
            if conn is not None:
                await self._release(conn)

    async def _try_batch(self, conn: Conn, batch: list[_Job]) -> bool:
        """The batch in one transaction, no savepoints (as one merged statement when its
        jobs allow): True once committed; False when a job failed on its own error (rolled
        back; the results are cleared)."""
        if len(batch) == 1:
            return False  # the savepoint-free path below is the same for one job
        first = batch[0].merge
        if first is not None and all(j.merge is not None and j.merge[0] is first[0] for j in batch):
            if self.before_commit is not None:  # the statement commits itself
                await self.before_commit(conn)
            try:  # one statement, autocommit: all of the batch or none of it
                await first[0](conn, [j.merge[1] for j in batch if j.merge is not None])
            except (asyncpg.PostgresError, ValueError):
                return False  # rolled back by the server; each job again, in a savepoint
            for job in batch:
                job.result = None
            return True
        tr = conn.transaction()
        await tr.start()
        try:
            for job in batch:
                job.result = await job.fn(conn)
        except (asyncpg.PostgresError, ValueError):
            await tr.rollback()
            for job in batch:
                job.result = None
            return False
        if self.before_commit is not None:
            await self.before_commit(conn)
        await tr.commit()
        return True

    @staticmethod
    async def _run_job(conn: Conn, job: _Job, *, savepoint: bool, own: bool = False) -> None:
        for attempt in (1, 2):
            if own:  # alone, in autocommit: its own error is its own (nothing written)
                try:
                    job.result = await job.fn(conn)
                except _RETRY as exc:
                    if attempt == 2:
                        job.error = _wrap(exc)
                    continue
                except (asyncpg.PostgresError, ValueError) as exc:
                    job.error = exc if isinstance(exc, StoreError) else _wrap(exc)
                return
            if not savepoint:  # the job is the whole transaction: its error fails the group
                job.result = await job.fn(conn)
                return
            sp = conn.transaction()
            await sp.start()
            try:
                job.result = await job.fn(conn)
            except _RETRY as exc:
                await sp.rollback()
                if attempt == 2:
                    job.error = _wrap(exc)
                continue
            except (asyncpg.PostgresError, ValueError) as exc:  # this job's own error
                await sp.rollback()
                job.error = exc if isinstance(exc, StoreError) else _wrap(exc)
                return
            await sp.commit()
            return

    # -------------------------------------------------------------- notifications

    async def listen(
        self, channel: str, callback: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]]:
        """LISTEN on channel on a connection of its own; ``callback(payload)`` runs on the
        event loop for each NOTIFY (sent by any node, delivered only once its transaction
        commits). Returns the coroutine function that stops listening.

        A lost LISTEN connection (the backend terminated, the server restarted, the
        network cut: asyncpg's termination listener, or a failed liveness check every
        ``LISTEN_CHECK`` seconds) is re-established with back-off (0.1 s doubling up to
        5 s), and ``callback("")`` runs once it is back: NOTIFYs sent meanwhile are lost,
        so the caller looks for work it may have missed. Until then the caller's polling
        is the bounded fallback. With ``listen_url`` the LISTEN has a direct connection of
        its own (not one of the pool's); behind pgbouncer without it there is no LISTEN
        and the caller's polling is all (each node finds other nodes' mail within its
        poll interval)."""
        if self.pgbouncer and not self.listen_url:
            log.info("listen_off", channel=channel, reason="pgbouncer without listen_url")

            async def nothing() -> None:
                return None

            return nothing
        listener = _Listener(self, channel, callback)
        await listener.start()
        return listener.stop

    # -------------------------------------------------------------- reads

    async def read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``await fn(conn)`` on a pooled connection, in one read-only transaction
        (repeatable read: a message and its recipients are read at one instant)."""
        if self._pool is None:
            raise StoreError("store is not open")
        try:
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                return await fn(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _wrap(exc) from exc


LISTEN_CHECK = 30.0  # seconds between liveness checks of an idle LISTEN connection
LISTEN_BACKOFF = (0.1, 5.0)  # first and largest delay between reconnect attempts


class _Listener:
    """One LISTEN of a PgStore, kept alive: its connection, re-established when lost."""

    def __init__(self, store: PgStore, channel: str, callback: Callable[[str], None]) -> None:
        self.store = store
        self.channel = channel
        self.callback = callback
        self.conn: Conn = None
        self.lost = asyncio.Event()
        self.stopped = False
        self.task: asyncio.Task[None] | None = None
        self.reconnects = 0

    def _on_notify(self, _conn: Conn, _pid: int, _channel: str, payload: str) -> None:
        self.callback(payload)

    def _on_terminated(self, conn: Conn) -> None:
        if conn is self.conn:
            self.lost.set()

    async def _attach(self) -> None:
        pool = self.store._pool
        if pool is None:
            raise StoreError("store is not open")
        conn = await self._connect(pool)
        try:
            conn.add_termination_listener(self._on_terminated)
            await conn.add_listener(self.channel, self._on_notify)
        except BaseException:
            _terminate(conn)
            await self._give_back(conn)
            raise
        self.conn = conn
        self.lost.clear()

    async def _connect(self, pool: Any) -> Conn:
        """A connection of the pool, or (``listen_url``) a direct one of its own."""
        st = self.store
        if not st.listen_url:
            return await pool.acquire()
        return await asyncpg.connect(
            st.listen_url,
            password=st._password,
            timeout=st._connect_timeout,
            command_timeout=st._command_timeout,
            server_settings={"application_name": st._application_name},
        )

    async def _give_back(self, conn: Conn) -> None:
        if not self.store.listen_url:
            await self.store._release(conn)
            return
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await conn.close(timeout=5)

    async def start(self) -> None:
        try:
            await self._attach()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _wrap(exc) from exc
        self.task = asyncio.create_task(self._watch(), name=f"pgstore-listen-{self.channel}")

    async def _alive(self) -> bool:
        try:
            await asyncio.wait_for(self.conn.execute("SELECT 1"), LISTEN_CHECK / 3)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True

    async def _watch(self) -> None:
        while not self.stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.lost.wait(), LISTEN_CHECK)
            if self.stopped:
                return
            if not self.lost.is_set() and await self._alive():
                continue
            log.warning("listen_lost", channel=self.channel, store=safe_url(self.store.url))
            await self._detach(lost=True)
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay, cap = LISTEN_BACKOFF
        tries = 0
        while not self.stopped:
            tries += 1
            try:
                await self._attach()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if tries == 1:
                    log.warning("listen_reconnect_failed", channel=self.channel, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)
                continue
            self.reconnects += 1
            log.info("listen_restored", channel=self.channel, attempts=tries)
            self.callback("")  # NOTIFYs sent while it was down are lost: look again
            return

    async def _detach(self, *, lost: bool = False) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            conn.remove_termination_listener(self._on_terminated)
        if lost:  # never reuse a connection in an unknown state
            _terminate(conn)
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, KeyError):
            if not conn.is_closed():
                await conn.remove_listener(self.channel, self._on_notify)
        await self._give_back(conn)

    async def stop(self) -> None:
        self.stopped = True
        self.lost.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self._detach()


def store_for(
    st: StorageConfig, *, pool_size: int | None = None, application_name: str = "relay"
) -> PgStore:
    """The PgStore of a ``[storage]`` section (url, password, pgbouncer, listen_url)."""
    return PgStore(
        st.url,
        st.password(),
        pool_size=st.pool_size if pool_size is None else pool_size,
        application_name=application_name,
        pgbouncer=st.pgbouncer,
        listen_url=st.listen_url,
    )


def safe_url(url: str) -> str:
    """The URL for a log line or an error: any password in it replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _terminate(conn: Conn) -> None:
    try:
        conn.terminate()
    except asyncpg.InterfaceError:  # already closed and detached by the pool
        pass


def _wrap(exc: BaseException) -> StoreError:
    err = StoreError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def rowcount(status: str) -> int:
    """The row count of an asyncpg command status ("UPDATE 3", "DELETE 0", "INSERT 0 1")."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, IndexError):
        return 0


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection, beyond asyncpg's own (an open
    transaction rolled back, listeners removed): nothing. asyncpg's default sends
    ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every release, one
    round trip and ~0.01 ms of server time per write; the relay leaves no session state on
    a pooled connection (advisory locks are transaction-scoped, settings ``SET LOCAL``,
    cursors inside transactions, LISTEN on a connection of its own)."""
    del conn
