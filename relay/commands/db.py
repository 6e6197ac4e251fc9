"""``relay db migrate --config P``: apply the PostgreSQL store's schema migrations alone
(``[storage] url``), each component's steps in one transaction under an advisory lock, so
it is safe while other nodes start or run. Prints one line per component. The SQLite store
(``[storage] path``) migrates itself when opened: nothing to do.

``relay db copy --from sqlite:PATH --to postgresql://...``: move a SQLite store to
PostgreSQL (relay.dbcopy): the source's store lock held for the copy (refused while a
relay runs on it), the target migrated, then every table copied in one transaction
(refused while a node of the target has a heartbeat within ``--lease``, or when the target
already holds data, unless ``--force``). Prints one line per table.

``relay db copy --from postgresql://... --to sqlite:PATH``: the other way, from several
nodes back to one (relay.dbcopy_back): a new SQLite store built beside PATH from one
snapshot of the database and renamed onto it (refused while a node has a heartbeat
within ``--lease``, when the database's schema is not this relay's, and when PATH exists
unless ``--force``)."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from relay.config import StorageConfig, load_config, pg_url_problem
from relay.errors import StartupError, StoreError
from relay.pgschema import Migrated, migrate_all
from relay.pgstore import PgStore, safe_url, store_for

if TYPE_CHECKING:
    from relay.dbcopy import Outcome


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("db", help="the shared PostgreSQL store")
    ds = p.add_subparsers(dest="db_command", required=True)
    mig = ds.add_parser("migrate", help="apply the schema migrations of storage.url")
    mig.add_argument("--config", required=True)
    mig.set_defaults(func=run_migrate)
    cp = ds.add_parser(
        "copy", help="copy a SQLite store into a PostgreSQL store, or a PostgreSQL store back"
    )
    cp.add_argument(
        "--from", dest="source", required=True, metavar="sqlite:PATH | postgresql://USER@HOST/DB"
    )
    cp.add_argument(
        "--to", dest="target", required=True, metavar="postgresql://USER@HOST/DB | sqlite:PATH"
    )
    cp.add_argument("--passfile", help="the database password's file (else RELAY_DB_PASSWORD)")
    cp.add_argument(
        "--lease",
        type=float,
        default=StorageConfig.lease,
        help="a node with a heartbeat this recent is running (storage.lease, default 60)",
    )
    cp.add_argument("--force", action="store_true", help="replace what the target holds")
    cp.set_defaults(func=run_copy)


def run_migrate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    st = config.storage
    if not st.postgresql:
        print(f"storage.path {st.path}: the SQLite store migrates itself at start", file=sys.stderr)
        return 0
    try:
        done = asyncio.run(_migrate(st))
    except StoreError as exc:
        raise StartupError(f"db migrate: {exc}") from exc
    for m in done:
        print(f"{m.component}: schema version {m.version} ({m.applied} step(s) applied)")
    return 0


async def _migrate(st: StorageConfig) -> list[Migrated]:
    async with store_for(st, pool_size=1) as store:
        return await migrate_all(store)


def _sqlite_versions() -> dict[str, int]:
    """The SQLite components whose schema the copy reads: each at this relay's version."""
    from relay.dbcopy import sqlite_schemas

    return {comp: len(steps) for comp, steps in sqlite_schemas().items()}


def run_copy(args: argparse.Namespace) -> int:
    if args.source.startswith(("postgresql:", "postgres:")):
        return run_copy_back(args)
    from relay import dbcopy
    from relay.pgschema import COMPONENTS
    from relay.storelock import StoreLock, StoreLocked

    path = dbcopy.parse_source(args.source)
    problem = pg_url_problem(args.target)
    if problem is not None:
        raise StartupError(f"db copy: --to {problem}")
    if args.lease <= 0:
        raise StartupError("db copy: --lease must be > 0")
    st = StorageConfig(url=args.target, passfile=Path(args.passfile) if args.passfile else None)
    password = st.password()
    try:
        lock = StoreLock(path).acquire()
    except StoreLocked as exc:
        raise StartupError(f"db copy: {exc}: stop it first") from None
    try:
        src = dbcopy.open_source(path)
        try:
            have = dict(src.execute("SELECT component, version FROM schema_version").fetchall())
        except sqlite3.Error as exc:
            raise StartupError(f"db copy: {path} is not a relay store: {exc}") from None
        for comp, version in _sqlite_versions().items():
            if comp in have and have[comp] != version:
                raise StartupError(
                    f"db copy: {path} has the {comp} schema version {have[comp]}, this relay"
                    f" {version}: run `relay serve` on it once (it upgrades the store), then copy"
                )
        components = [c for c in dbcopy.COPIES if c in COMPONENTS]
        try:
            out = asyncio.run(_copy(src, args.target, password, components, args))
        finally:
            src.close()
    finally:
        lock.release()
    for c in out.replaced:
        print(f"{c.table}: {c.rows} rows replaced (--force)")
    for c in out.copied:
        print(f"{c.table}: {c.rows} rows")
    for comp, rows in out.skipped:
        if rows:
            print(
                f"relay: warning: db_copy_skipped component={comp} rows={rows}"
                " reason=not_on_postgresql_yet",
                file=sys.stderr,
            )
    messages = next((c.rows for c in out.copied if c.table == "queue_messages"), 0)
    print(f"copied {args.source} to {safe_url(args.target)}: {messages} messages")
    return 0


def run_copy_back(args: argparse.Namespace) -> int:
    """PostgreSQL (``--from``) to a new SQLite store (``--to sqlite:PATH``)."""
    from relay import dbcopy_back
    from relay.storelock import StoreLock, StoreLocked

    problem = pg_url_problem(args.source)
    if problem is not None:
        raise StartupError(f"db copy: --from {problem}")
    target = dbcopy_back.parse_target(args.target)
    if args.lease <= 0:
        raise StartupError("db copy: --lease must be > 0")
    st = StorageConfig(url=args.source, passfile=Path(args.passfile) if args.passfile else None)
    try:
        lock = StoreLock(target).acquire()  # no relay starts on PATH during the copy
    except StoreLocked as exc:
        raise StartupError(f"db copy: {exc}: stop it first") from None
    except OSError as exc:
        raise StartupError(f"db copy: cannot lock {target}: {exc}") from None
    try:
        out = asyncio.run(_copy_back(st, target, args))
    finally:
        lock.release()
    for c in out.copied:
        print(f"{c.table}: {c.rows} rows")
    messages = next((c.rows for c in out.copied if c.table == "queue_messages"), 0)
    print(f"copied {safe_url(args.source)} to sqlite:{target}: {messages} messages")
    return 0


async def _copy_back(st: StorageConfig, target: Path, args: argparse.Namespace) -> Outcome:
    from relay import dbcopy_back
    from relay.pgschema import COMPONENTS

    try:
        async with store_for(st, pool_size=1) as store:
            components = []
            for comp, steps in COMPONENTS.items():
                have = await store.schema_version(comp)
                if have and have != len(steps):
                    raise StartupError(
                        f"db copy: {safe_url(st.url)} has the {comp} schema version {have},"
                        f" this relay {len(steps)}: run `relay db migrate` on it first"
                    )
                if have:
                    components.append(comp)
            if "queue" not in components:
                raise StartupError(f"db copy: {safe_url(st.url)} holds no relay queue")
            return await dbcopy_back.copy_to_sqlite(
                store, target, components, lease=args.lease, force=args.force
            )
    except StoreError as exc:
        raise StartupError(f"db copy: {exc}") from exc


async def _copy(
    src: sqlite3.Connection,
    url: str,
    password: str | None,
    components: list[str],
    args: argparse.Namespace,
) -> Outcome:
    from relay import dbcopy

    try:
        async with PgStore(url, password, pool_size=1) as store:
            await migrate_all(store)
            return await dbcopy.copy_store(
                src, store, components, lease=args.lease, force=args.force
            )
    except StoreError as exc:
        raise StartupError(f"db copy: {exc}") from exc
