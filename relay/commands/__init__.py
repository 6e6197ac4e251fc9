"""Subcommands of the relay CLI; each module has register(subparsers) and run handlers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from relay.config import Config
from relay.errors import StartupError, StoreError
from relay.store import Store


def open_existing_store(config: Config) -> Store:
    """The store of a command that reads one: refused when it does not exist (a wrong
    --config must not create and show an empty store)."""
    from relay.unported import refuse_unported

    refuse_unported(config, "this command", ["the tables it reads"])
    path = config.storage.path
    if not path.is_file():
        raise StartupError(
            f"store {path} does not exist (wrong --config? `relay serve` creates it)"
        )
    return Store(path, convert=False).open()  # the relay converts, under its lock


@contextlib.asynccontextmanager
async def open_store(config: Config, component: str) -> AsyncIterator[Any]:
    """The store of a command reading ``component``'s tables: the SQLite ``Store``
    (refused when the file does not exist) or, with ``[storage] url``, a ``PgStore``
    (refused in one line when the database cannot be reached or has no such tables:
    wrong --config, or `relay db migrate` not run)."""
    if not config.storage.postgresql:
        store = open_existing_store(config)
        try:
            yield store
        finally:
            store.close()
        return
    from relay.pgstore import safe_url, store_for

    url = config.storage.url
    try:
        pg = await store_for(config.storage, pool_size=4).open()
    except StoreError as exc:
        raise StartupError(str(exc)) from exc
    try:
        if not await pg.schema_version(component):
            raise StartupError(
                f"no {component} tables in {safe_url(url)}"
                " (wrong --config? `relay db migrate` creates them)"
            )
        yield pg
    finally:
        await pg.close()
