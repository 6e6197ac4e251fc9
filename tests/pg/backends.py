"""The queue's two stores behind one test interface, so a queue test runs over SQLite and
over the throwaway PostgreSQL cluster alike (``queue_backend`` fixture, parametrised);
the lists' tests take the same fixture (``lists_store``, ``spool_of``)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.pgstore import PgStore
from relay.queue.base import QueueSpool
from relay.queue.pgspool import PgSpool
from relay.queue.spool import Spool
from relay.store import Store

OWED = "SELECT count(*) FROM queue_recipients WHERE state='failed' AND NOT dsn_done"


class QueueBackend:
    """One database; ``spool()`` gives another lease owner on it, over its own store
    (connection) like another process or node; the first store is ``primary``."""

    def __init__(self, name: str, tmp: Path, url: str = "") -> None:
        self.name = name
        self.tmp = tmp
        self.url = url
        self.stores: list[Any] = []

    async def new_store(self) -> Any:
        if self.name == "sqlite":
            store: Any = Store(self.tmp / "q.sqlite3").open()
        else:
            store = await PgStore(self.url, _password()).open()
        self.stores.append(store)
        return store

    @property
    def primary(self) -> Any:
        return self.stores[0]

    async def spool(self, clock: Callable[[], float], **kw: Any) -> QueueSpool:
        store = await self.new_store()
        if self.name == "sqlite":
            return Spool(store, clock, **kw)
        return await PgSpool.open(store, clock, **kw)

    async def lists_store(self) -> Any:
        """A store of its own with the lists' and the queue's tables (PostgreSQL: every
        component's migrations, as ``relay serve`` applies them at start; SQLite: the
        list service makes them)."""
        store = await self.new_store()
        if self.name == "postgresql":
            from relay.pgschema import migrate_all

            await migrate_all(store)
        return store

    def spool_of(self, store: Any, clock: Callable[[], float] | None = None) -> QueueSpool:
        """The queue over an open store of this backend (no migration)."""
        import time

        if self.name == "sqlite":
            return Spool(store, clock or time.time)
        return PgSpool(store, clock or time.time)

    async def owed(self) -> int:
        """Failed recipients whose DSN is still owed, read outside the relay's code."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.tmp / "q.sqlite3")
            try:
                return int(conn.execute(OWED).fetchone()[0])
            finally:
                conn.close()
        return int(await self.primary.read(lambda c: c.fetchval(OWED)))

    async def close(self) -> None:
        for s in reversed(self.stores):
            if isinstance(s, PgStore):
                await s.close()
            else:
                s.close()


def _password() -> str:
    import os

    return os.environ["RELAY_DB_PASSWORD"]


@pytest.fixture(params=["sqlite", "postgresql"])
async def queue_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[QueueBackend]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""
    backend = QueueBackend(request.param, tmp_path, url)
    try:
        yield backend
    finally:
        await backend.close()


class StoreBackend:
    """One database of either store for the components other than the queue (the TLS-RPT
    ledger, the MTA-STS cache): ``open()`` is another connection to it — a restart, or
    another node — migrated as ``relay serve`` migrates it."""

    def __init__(self, name: str, tmp: Path, url: str = "") -> None:
        self.name = name
        self.path = tmp / "relay.sqlite3"
        self.url = url

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Any]:
        if self.name == "sqlite":
            store = Store(self.path).open()
            try:
                yield store
            finally:
                store.close()
            return
        from relay import pgschema

        pg = await PgStore(self.url, _password()).open()
        try:
            await pgschema.migrate_all(pg)
            yield pg
        finally:
            await pg.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreBackend:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""
    return StoreBackend(request.param, tmp_path, url)
