"""The lists' transaction over either store, so relay.lists.members holds the one copy
of the lists' SQL and the service one copy of its logic.

``Tx`` is a transaction of the SQLite store (``Store``: the callbacks run synchronously
on the group-commit writer's or the reader's connection) or of the PostgreSQL store
(``PgStore``: asyncpg, ``?`` placeholders rewritten to ``$n``). Its methods are
coroutines on both; on SQLite they never suspend, so ``run_sync`` drives one to its end
inside the SQLite writer's callback. ``Tx.queue`` inserts a message into the queue in the
same transaction (the fan-out's copies and the notices), with the store's own insert.

``ListsDb`` is the lists' view of a store: ``read(fn)`` and ``write(fn)`` take
``async fn(tx)``; ``native(fn)`` turns one into the callback the queue's
``enqueue(..., also=)`` of that store runs in its own transaction (a message to a list and
to others is one durable unit on both stores). No asyncpg import here."""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from relay.model import QueueId

if TYPE_CHECKING:
    from relay.pgstore import PgStore
    from relay.queue.spool import NewMessage
    from relay.store import Store

T = TypeVar("T")
Row = Sequence[Any]
Dialect = Literal["sqlite", "postgresql"]


class Tx(Protocol):
    dialect: Dialect
    locked: set[str]  # keys this transaction already locked (PostgreSQL row locks)

    async def fetchone(self, sql: str, *args: object) -> Row | None: ...

    async def fetchall(self, sql: str, *args: object) -> list[Row]: ...

    async def execute(self, sql: str, *args: object) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    async def queue(
        self, qid: QueueId, msg: NewMessage, now: float, *, owner: str = "", until: float = 0.0
    ) -> None:
        """Queue msg in this transaction: its recipients queued for the loader, or
        (``owner``) in flight under owner's lease until ``until`` (the fan-out hands such
        a copy to its own scheduler at once)."""
        ...


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (one over a ``SqliteTx``)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a SQLite lists transaction suspended")


class SqliteTx:
    dialect: Dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.locked: set[str] = set()

    async def fetchone(self, sql: str, *args: object) -> Row | None:
        row = self.conn.execute(sql, args).fetchone()
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, *args: object) -> list[Row]:
        return [tuple(r) for r in self.conn.execute(sql, args).fetchall()]

    async def execute(self, sql: str, *args: object) -> int:
        return self.conn.execute(sql, args).rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.conn.executemany(sql, rows)

    async def queue(
        self, qid: QueueId, msg: NewMessage, now: float, *, owner: str = "", until: float = 0.0
    ) -> None:
        from relay.queue.spool import queue_insert

        queue_insert(qid, msg, now, owner=owner, until=until)(self.conn)


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """``?`` placeholders as ``$1``, ``$2``, ... (the lists' SQL has no ``?`` in a literal)."""
    n = 0

    def number(_m: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return re.sub(r"\?", number, sql)


class PgTx:
    dialect: Dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # asyncpg.Connection, in a transaction
        self.locked: set[str] = set()

    async def fetchone(self, sql: str, *args: object) -> Row | None:
        row = await self.conn.fetchrow(pg_sql(sql), *args)
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, *args: object) -> list[Row]:
        return [tuple(r) for r in await self.conn.fetch(pg_sql(sql), *args)]

    async def execute(self, sql: str, *args: object) -> int:
        from relay.pgstore import rowcount

        return rowcount(await self.conn.execute(pg_sql(sql), *args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        if rows:
            await self.conn.executemany(pg_sql(sql), rows)

    async def queue(
        self, qid: QueueId, msg: NewMessage, now: float, *, owner: str = "", until: float = 0.0
    ) -> None:
        from relay.queue.pgspool import queue_insert

        await queue_insert(qid, msg, now, owner=owner, until=until)(self.conn)


TxFn = Callable[[Tx], Awaitable[T]]


class ListsDb(Protocol):
    dialect: Dialect

    async def read(self, fn: Callable[[Tx], Awaitable[T]]) -> T: ...

    async def write(self, fn: Callable[[Tx], Awaitable[T]]) -> T: ...

    def native(self, fn: Callable[[Tx], Awaitable[object]]) -> Callable[[Any], object]:
        """fn as the store's own transaction callback (the queue's ``also=``)."""
        ...


class SqliteListsDb:
    dialect: Dialect = "sqlite"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def read(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        return await self.store.read(lambda c: run_sync(_coro(fn(SqliteTx(c)))))

    async def write(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        return await self.store.write(lambda c: run_sync(_coro(fn(SqliteTx(c)))))

    def native(self, fn: Callable[[Tx], Awaitable[object]]) -> Callable[[Any], object]:
        return lambda c: run_sync(_coro(fn(SqliteTx(c))))


class PgListsDb:
    """Reads in a read-only transaction; every write its own transaction (they lock
    member, post and fan-out rows: never grouped with another node's), retried by the
    store after a deadlock, so a write's fn may run more than once."""

    dialect: Dialect = "postgresql"

    def __init__(self, store: PgStore) -> None:
        self.store = store

    async def read(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        return await self.store.read(lambda c: fn(PgTx(c)))

    async def write(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        return await self.store.write(lambda c: fn(PgTx(c)))

    def native(self, fn: Callable[[Tx], Awaitable[object]]) -> Callable[[Any], object]:
        return lambda c: fn(PgTx(c))


def _coro(aw: Awaitable[T]) -> Coroutine[Any, Any, T]:
    if not isinstance(aw, Coroutine):
        raise TypeError("a lists transaction function must be a coroutine function")
    return aw


def lists_db(store: Any) -> ListsDb:
    """The lists' view of a ``Store`` or ``PgStore`` (a ``ListsDb`` is returned as is)."""
    if isinstance(store, SqliteListsDb | PgListsDb):
        return store
    from relay.store import Store

    if isinstance(store, Store):
        return SqliteListsDb(store)
    return PgListsDb(store)
