"""``relay db migrate --config P``: apply the PostgreSQL store's schema migrations alone
(``[storage] url``), each component's steps in one transaction under an advisory lock, so
it is safe while other nodes start or run. Prints one line per component. The SQLite store
(``[storage] path``) migrates itself when opened: nothing to do."""

from __future__ import annotations

import argparse
import asyncio
import sys

from relay.config import load_config
from relay.errors import StartupError, StoreError
from relay.pgschema import Migrated, migrate_all
from relay.pgstore import PgStore


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("db", help="the shared PostgreSQL store")
    ds = p.add_subparsers(dest="db_command", required=True)
    mig = ds.add_parser("migrate", help="apply the schema migrations of storage.url")
    mig.add_argument("--config", required=True)
    mig.set_defaults(func=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    st = config.storage
    if not st.postgresql:
        print(f"storage.path {st.path}: the SQLite store migrates itself at start", file=sys.stderr)
        return 0
    try:
        done = asyncio.run(_migrate(st.url, st.password()))
    except StoreError as exc:
        raise StartupError(f"db migrate: {exc}") from exc
    for m in done:
        print(f"{m.component}: schema version {m.version} ({m.applied} step(s) applied)")
    return 0


async def _migrate(url: str, password: str | None) -> list[Migrated]:
    async with PgStore(url, password, pool_size=1) as store:
        return await migrate_all(store)
