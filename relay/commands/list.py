"""`relay list members|show|held|add|remove|approve|reject|archive`: run the mailing lists
from the shell, on the configured store: SQLite (``storage.path``) or PostgreSQL
(``storage.url``).

Works on the store directly (SQLite WAL allows it while the relay runs; on PostgreSQL
every node sees the change at once). ``add`` needs no confirmation (the operator's word)
and may create the store (on PostgreSQL: applies the schema migrations, as ``relay db
migrate``); the other commands refuse a store without the lists' tables. ``approve``
queues the copies itself (a running relay's loader delivers them within its poll
interval, at once on PostgreSQL: NOTIFY; a relay that fans out the same post at once
cannot double a copy: each recipient is claimed in the transaction that queues its copy).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from relay.commands import open_existing_store
from relay.config import Config, ListConfig, load_config
from relay.errors import StartupError, StoreError
from relay.lists import members as db
from relay.lists.mbox import write_mbox
from relay.lists.tx import Tx, lists_db
from relay.store import Store

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help="mailing lists: members, moderation, archive")
    ls = p.add_subparsers(dest="list_command", required=True)

    def cmd(name: str, help_: str, func: Any, *, json_: bool = False) -> argparse.ArgumentParser:
        c = ls.add_parser(name, help=help_)
        c.add_argument("list", help="the list's address")
        c.add_argument("--config", required=True)
        if json_:
            c.add_argument("--json", action="store_true")
        c.set_defaults(func=func)
        return c

    cmd("members", "members with state, bounce score and since", run_members, json_=True)
    cmd("show", "the list's settings and counts", run_show, json_=True)
    cmd("held", "posts held for moderation", run_held, json_=True)
    cmd("add", "add members (no confirmation)", run_add).add_argument("addresses", nargs="+")
    cmd("remove", "remove members", run_remove).add_argument("addresses", nargs="+")
    ap = cmd("approve", "send a held post to the list", run_approve)
    ap.add_argument("id")
    rj = cmd("reject", "drop a held post, telling the author", run_reject)
    rj.add_argument("id")
    rj.add_argument("--reason", default="")
    ar = cmd("archive", "export the archive as mbox", run_archive)
    ar.add_argument("--out", required=True)


def _iso(t: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None


def _list(config: Config, address: str) -> ListConfig | None:
    cfg = config.lists.get(db.normalise(address).lower())
    if cfg is None:
        print(f"relay: no list {address!r} in {config.path}", file=sys.stderr)
    return cfg


@contextlib.asynccontextmanager
async def open_lists_store(config: Config, create: bool = False) -> AsyncIterator[Any]:
    """The configured store with the lists' tables (a ``Store`` or a ``PgStore``):
    ``create`` makes them (SQLite: the file too; PostgreSQL: every schema migration),
    else a store without them is refused (a wrong --config must not show empty lists)."""
    if not config.storage.postgresql:
        store = Store(config.storage.path).open() if create else open_existing_store(config)
        try:
            db.open_tables(store)
            yield store
        finally:
            await asyncio.to_thread(store.close)
        return
    from relay.pgschema import migrate_all
    from relay.pgstore import safe_url, store_for

    url = config.storage.url
    pg = await store_for(config.storage, pool_size=4).open()
    try:
        if create:
            await migrate_all(pg)
        elif not await pg.schema_version("lists"):
            raise StartupError(
                f"no lists in {safe_url(url)} (wrong --config? `relay db migrate` creates them)"
            )
        yield pg
    finally:
        await pg.close()


def _on_list(
    args: argparse.Namespace,
    work: Callable[[Config, ListConfig, Any], Awaitable[T]],
    *,
    create: bool = False,
) -> tuple[ListConfig, T] | None:
    """Open the config and store, find the list, run ``work(config, list, store)`` and
    close the store; None when the list is not configured (already said on stderr). A
    store error is one line (exit 2)."""
    config = load_config(args.config)
    cfg = _list(config, args.list)
    if cfg is None:
        return None

    async def main() -> T:
        async with open_lists_store(config, create) as store:
            return await work(config, cfg, store)

    try:
        return cfg, _run(main)
    except StoreError as exc:
        raise StartupError(f"list: {exc}") from exc


def _run(main: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(main())``, in a thread of its own when this one already runs an
    event loop (the command called from async code: a test, an embedding program)."""

    async def go() -> T:
        return await main()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def _read(
    args: argparse.Namespace, query: Callable[[Tx, str], Awaitable[T]]
) -> tuple[ListConfig, T] | None:
    """``_on_list`` for one read of the list's rows: ``query(transaction, list address)``."""

    async def work(_c: Config, cfg: ListConfig, store: Any) -> T:
        return await lists_db(store).read(lambda c: query(c, cfg.address))

    return _on_list(args, work)


def member_json(m: db.Member) -> dict[str, Any]:
    return {"address": m.address, "state": m.state, "bounce_score": m.score, "since": _iso(m.since)}


def run_members(args: argparse.Namespace) -> int:
    got = _read(args, db.members)
    if got is None:
        return 2
    _, rows = got
    if args.json:
        print(json.dumps([member_json(m) for m in rows], indent=2))
    else:
        for m in rows:
            print(f"{m.address}\t{m.state}\t{m.score:g}\t{_iso(m.since)}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    async def work(
        _c: Config, cfg: ListConfig, store: Any
    ) -> tuple[list[db.Member], list[db.Held], list[db.Fanout]]:
        ldb = lists_db(store)
        return (
            await ldb.read(lambda c: db.members(c, cfg.address)),
            await ldb.read(lambda c: db.held_posts(c, cfg.address)),
            await ldb.read(lambda c: db.fanouts(c, cfg.address)),
        )

    got = _on_list(args, work)
    if got is None:
        return 2
    cfg, (rows, held, running) = got
    counts = {s: sum(1 for m in rows if m.state == s) for s in ("active", "disabled", "pending")}
    out = {
        "address": cfg.address,
        "name": cfg.display_name,
        "subject_prefix": cfg.subject_prefix,
        "posting": cfg.posting,
        "dmarc_mitigation": cfg.dmarc_mitigation,
        "mitigate_always": cfg.mitigate_always,
        "reply_to": cfg.reply_to,
        "owners": list(cfg.owners),
        "archive": cfg.archive,
        "archive_public": cfg.archive_public,
        "max_message_size": cfg.max_message_size,
        "members": counts,
        "held": len(held),
        # posts whose copies are still being made, by which worker of which node
        "fanouts": [
            {
                "post": f.post,
                "left": f.left,
                "lease_owner": f.lease_owner,
                "lease_expiry": _iso(f.lease_expiry),
            }
            for f in running
        ],
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def run_held(args: argparse.Namespace) -> int:
    got = _read(args, db.held_posts)
    if got is None:
        return 2
    _, rows = got
    items = [
        {
            "id": h.id,
            "author": h.author,
            "mail_from": h.mail_from,
            "subject": h.subject,
            "reason": h.reason,
            "held_since": _iso(h.created),
        }
        for h in rows
    ]
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        for i in items:
            print(f"{i['id']}\t{i['held_since']}\t{i['author']}\t{i['subject']}\t{i['reason']}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    bad = [a for a in args.addresses if "@" not in a or a.startswith("@") or a.endswith("@")]
    if bad:
        print(f"relay: not an address: {bad[0]!r}", file=sys.stderr)
        return 2

    async def work(_c: Config, cfg: ListConfig, store: Any) -> list[bool]:
        now = time.time()

        async def add(c: Tx) -> list[bool]:
            return [await db.add_member(c, cfg.address, a, now) for a in args.addresses]

        return await lists_db(store).write(add)

    got = _on_list(args, work, create=True)
    if got is None:
        return 2
    _, added = got
    for a, new in zip(args.addresses, added, strict=True):
        print(f"{db.normalise(a)}\t{'added' if new else 'already a member'}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    async def work(_c: Config, cfg: ListConfig, store: Any) -> list[bool]:
        async def remove(c: Tx) -> list[bool]:
            return [await db.remove_member(c, cfg.address, a) for a in args.addresses]

        return await lists_db(store).write(remove)

    got = _on_list(args, work)
    if got is None:
        return 2
    _, gone = got
    for a, g in zip(args.addresses, gone, strict=True):
        print(f"{db.normalise(a)}\t{'removed' if g else 'not a member'}")
    return 0 if all(gone) else 1


def _service(config: Config, store: Any) -> Any:
    from relay.lists.service import ListService, build_sealer

    return ListService(config, store, sealer=build_sealer(config))


def run_approve(args: argparse.Namespace) -> int:
    async def go(config: Config, cfg: ListConfig, store: Any) -> int:
        svc = _service(config, store)
        if not await svc.approve(cfg.address, args.id):
            return -1
        await svc.wait_idle()
        return 0

    got = _on_list(args, go)
    if got is None:
        return 2
    cfg, res = got
    if res < 0:
        print(f"relay: no held post {args.id!r} on {cfg.address}", file=sys.stderr)
        return 1
    print(f"{args.id}\tapproved")
    return 0


def run_reject(args: argparse.Namespace) -> int:
    async def go(config: Config, cfg: ListConfig, store: Any) -> bool:
        return bool(await _service(config, store).reject(cfg.address, args.id, args.reason))

    got = _on_list(args, go)
    if got is None:
        return 2
    cfg, ok = got
    if not ok:
        print(f"relay: no held post {args.id!r} on {cfg.address}", file=sys.stderr)
        return 1
    print(f"{args.id}\trejected")
    return 0


def run_archive(args: argparse.Namespace) -> int:
    got = _read(args, db.archived)
    if got is None:
        return 2
    _, posts = got
    with open(args.out, "wb") as fh:
        n = write_mbox(fh, posts)
    print(f"{n} posts written to {args.out}")
    return 0
