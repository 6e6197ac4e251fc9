"""`relay queue list|show|flush|delete|hold|release|requeue|log`: the queue from the shell.

Works on the store directly, through the queue interface both stores implement
(relay.queue.base.QueueSpool): the SQLite file (WAL allows it while the relay runs) or the
shared PostgreSQL database (``storage.url``: every node sees the change at once). A
running relay picks up a flush within its poll interval (on PostgreSQL at once: NOTIFY).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from relay.config import Config, load_config
from relay.errors import StartupError, StoreError
from relay.model import RecipientState
from relay.queue.base import QueueSpool
from relay.queue.spool import ListFilter, QueuedMessage, Spool

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("queue", help="inspect and steer the queue")
    qs = p.add_subparsers(dest="queue_command", required=True)
    lst = qs.add_parser("list", help="list queued messages (one query, paged)")
    lst.add_argument("--config", required=True)
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--limit", type=int, default=0, help="at most N messages (0: all)")
    lst.add_argument("--offset", type=int, default=0, help="skip the first N messages")
    lst.add_argument("--domain", default="", help="only recipients of this domain")
    lst.add_argument(
        "--state",
        default="",
        choices=("", "held", *(s.value for s in RecipientState)),
        help="only recipients in this state (held: the messages on hold)",
    )
    lst.set_defaults(func=run_list)
    show = qs.add_parser("show", help="show one message with its recipients")
    show.add_argument("id")
    show.add_argument("--config", required=True)
    show.add_argument("--json", action="store_true")
    show.add_argument("--body", action="store_true", help="print the queued message bytes")
    show.add_argument(
        "--raw", action="store_true", help="print only the stored message bytes (an .eml)"
    )
    show.set_defaults(func=run_show)
    fl = qs.add_parser("flush", help="make every deferred recipient due now")
    fl.add_argument("--config", required=True)
    fl.add_argument("--domain", default="", help="only the recipients of this domain")
    fl.set_defaults(func=run_flush)
    de = qs.add_parser("delete", help="delete messages (no DSN)")
    de.add_argument("ids", nargs="*", metavar="ID")
    de.add_argument("--config", required=True)
    de.add_argument("--all", action="store_true", help="delete every queued message")
    de.add_argument("--yes", action="store_true", help="confirm --all")
    de.set_defaults(func=run_delete)
    for name, func, text in (
        ("hold", run_hold, "put messages on hold (not tried until released)"),
        ("release", run_release, "release held messages"),
        ("requeue", run_requeue, "release and try again now, destinations looked up anew"),
    ):
        cmd = qs.add_parser(name, help=text)
        cmd.add_argument("ids", nargs="+", metavar="ID")
        cmd.add_argument("--config", required=True)
        cmd.set_defaults(func=func)
    lg = qs.add_parser("log", help="a message's history: every attempt, its reply and TLS")
    lg.add_argument("id")
    lg.add_argument("--config", required=True)
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=run_log)


@contextlib.asynccontextmanager
async def open_queue(config: Config, reclaim: bool = False) -> AsyncIterator[QueueSpool]:
    """The queue of the configured store: SQLite (refused when the file does not exist)
    or PostgreSQL (refused when its queue schema is not there: wrong database?)."""
    from relay.commands import open_store

    async with open_store(config, "queue") as store:
        if not config.storage.postgresql:
            yield Spool(store)
            if reclaim:  # the space deleted messages held goes back to the file system now
                await asyncio.to_thread(store.reclaim)
            return
        from relay.queue.pgspool import PgSpool

        yield PgSpool(store, node_id=config.server.node_id)


def run_on_queue(path: str, fn: Callable[[QueueSpool], Awaitable[T]], reclaim: bool = False) -> T:
    """``fn(spool)`` on the queue of the config at ``path``; a store error is one line."""
    config = load_config(path)

    async def main() -> T:
        async with open_queue(config, reclaim) as spool:
            return await fn(spool)

    try:
        return asyncio.run(main())
    except StoreError as exc:
        raise StartupError(f"queue: {exc}") from exc


def _iso(t: float) -> str | None:
    if not t:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def as_json(m: QueuedMessage, detail: bool = False) -> dict[str, Any]:
    """The list's keys (kept as they were, the lease and DSN state added per recipient);
    ``detail`` (queue show) adds the hold flag and the stored envelope."""
    extra: dict[str, Any] = {}
    if detail:
        extra = {"held": m.held, "client_ip": m.client_ip, "helo": m.helo, "env_from": m.env_from}
    return {
        "id": m.id,
        "mail_from": m.mail_from,
        "size": m.size,
        "message_id": m.message_id,
        "created": _iso(m.created),
        **extra,
        "recipients": [
            {
                "address": r.address,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt": _iso(r.next_attempt),
                "last_reply": r.last_reply,
                "lease_owner": r.lease_owner,
                "lease_expiry": _iso(r.lease_expiry),
                "dsn_owed": r.dsn_owed,
            }
            for r in m.recipients
        ],
    }


def run_list(args: argparse.Namespace) -> int:
    if args.limit < 0 or args.offset < 0:
        print("relay: --limit and --offset must be >= 0", file=sys.stderr)
        return 2
    where = ListFilter(domain=args.domain, state=args.state, limit=args.limit, offset=args.offset)
    msgs = run_on_queue(args.config, lambda spool: spool.list(where))
    if args.json:
        # indented on a terminal; compact for a script (json's C encoder: 61,000 messages
        # in under a second instead of six)
        indent = 2 if sys.stdout.isatty() else None
        print(json.dumps([as_json(m) for m in msgs], indent=indent))
        return 0
    if not msgs:
        print("queue is empty" if where == ListFilter() else "no message matches")
    for m in msgs:
        held = "  HELD" if m.held else ""
        print(f"{m.id}  {m.size:>8}  {_iso(m.created)}  <{m.mail_from}>{held}")
        for r in m.recipients:
            nxt = f" next {_iso(r.next_attempt)}" if r.next_attempt else ""
            owner = f" owner={r.lease_owner}" if r.lease_owner else ""
            print(f"    {r.address}  {r.state.value}  attempts={r.attempts}{nxt}{owner}")
            if r.last_reply:
                print(f"        {r.last_reply}")
    more = ""
    if args.limit and len(msgs) == args.limit:
        more = f" (more may follow: --offset {args.offset + len(msgs)})"
    print(f"-- {len(msgs)} message(s){more}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    loaded = run_on_queue(args.config, lambda spool: spool.load(args.id))
    if loaded is None:
        print(f"relay: no message {args.id} in the queue", file=sys.stderr)
        return 1
    msg, data = loaded
    if args.raw:  # exactly the stored bytes: `relay queue show ID --raw > m.eml`
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    if args.json:
        print(json.dumps(as_json(msg, detail=True), indent=2))
    else:
        for k, v in as_json(msg, detail=True).items():
            if k != "recipients":
                print(f"{k}: {v}")
        for r in as_json(msg)["recipients"]:
            print(
                f"recipient: {r['address']} {r['state']} attempts={r['attempts']} "
                f"next={r['next_attempt']} last={r['last_reply']!r}"
            )
    if args.body:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    return 0


def run_flush(args: argparse.Namespace) -> int:
    n = run_on_queue(
        args.config, lambda spool: spool.flush_domain(args.domain) if args.domain else spool.flush()
    )
    where = f" for {args.domain}" if args.domain else ""
    print(f"{n} recipient(s) due now{where}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    if args.all and args.ids:
        print("relay: give message ids or --all, not both", file=sys.stderr)
        return 2
    if args.all and not args.yes:
        print("relay: --all deletes every queued message without a DSN; add --yes", file=sys.stderr)
        return 2
    if not args.all and not args.ids:
        print("relay: which messages? give their ids (or --all --yes)", file=sys.stderr)
        return 2
    found: list[str] = []
    if args.all:
        n = run_on_queue(args.config, lambda spool: spool.delete_all(), reclaim=True)
    else:
        found = run_on_queue(args.config, lambda spool: spool.delete_many(args.ids), reclaim=True)
        n = len(found)
    for qid in found:
        print(f"deleted {qid}")
    if args.all:
        print(f"deleted {n} message(s)")
    return _missing(args.ids, found)


def _missing(asked: list[str], found: list[str]) -> int:
    """Warn about ids not in the queue; exit 1 if any."""
    missing = [q for q in asked if q not in set(found)]
    for qid in missing:
        print(f"relay: no message {qid} in the queue", file=sys.stderr)
    return 1 if missing else 0


def _steer(args: argparse.Namespace, verb: str, done: str) -> int:
    found: list[str] = run_on_queue(args.config, lambda spool: getattr(spool, verb)(args.ids))
    for qid in found:
        print(f"{done} {qid}")
    return _missing(args.ids, found)


def run_hold(args: argparse.Namespace) -> int:
    return _steer(args, "hold", "held")


def run_release(args: argparse.Namespace) -> int:
    return _steer(args, "unhold", "released")


def run_requeue(args: argparse.Namespace) -> int:
    return _steer(args, "requeue", "requeued")


def run_log(args: argparse.Namespace) -> int:
    entries = run_on_queue(args.config, lambda spool: spool.history(args.id))
    if not entries:
        print(
            f"relay: no history of {args.id} (never queued, or past its retention)", file=sys.stderr
        )
        return 1
    if args.json:
        rows = [
            {
                "at": _iso(e.at),
                "event": e.event,
                "recipient": e.address,
                "reply": e.reply,
                "mx_host": e.mx_host,
                "tls": e.tls,
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for e in entries:
        who = f" {e.address}" if e.address else ""
        via = f" via {e.mx_host}" if e.mx_host else ""
        tls = f" tls={e.tls}" if e.tls else ""
        reply = f": {e.reply}" if e.reply else ""
        print(f"{_iso(e.at)} {args.id} {e.event}{who}{via}{tls}{reply}")
    return 0
