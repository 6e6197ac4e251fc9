"""`relay queue list|show|flush|delete`: inspect and steer the queue from the shell.

Works on the store directly (SQLite WAL allows it while the relay runs); a running relay
picks up a flush within its poll interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from relay.commands import open_existing_store
from relay.config import load_config
from relay.queue.spool import QueuedMessage, Spool
from relay.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("queue", help="inspect and steer the queue")
    qs = p.add_subparsers(dest="queue_command", required=True)
    lst = qs.add_parser("list", help="list queued messages")
    lst.add_argument("--config", required=True)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=run_list)
    show = qs.add_parser("show", help="show one message with its recipients")
    show.add_argument("id")
    show.add_argument("--config", required=True)
    show.add_argument("--json", action="store_true")
    show.add_argument("--body", action="store_true", help="print the queued message bytes")
    show.set_defaults(func=run_show)
    fl = qs.add_parser("flush", help="make every deferred recipient due now")
    fl.add_argument("--config", required=True)
    fl.set_defaults(func=run_flush)
    de = qs.add_parser("delete", help="delete a message (no DSN)")
    de.add_argument("id")
    de.add_argument("--config", required=True)
    de.set_defaults(func=run_delete)


def _open(path: str) -> tuple[Store, Spool]:
    config = load_config(path)
    store = open_existing_store(config)
    return store, Spool(store)


def _iso(t: float) -> str | None:
    if not t:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def as_json(m: QueuedMessage) -> dict[str, Any]:
    return {
        "id": m.id,
        "mail_from": m.mail_from,
        "size": m.size,
        "message_id": m.message_id,
        "created": _iso(m.created),
        "recipients": [
            {
                "address": r.address,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt": _iso(r.next_attempt),
                "last_reply": r.last_reply,
            }
            for r in m.recipients
        ],
    }


def run_list(args: argparse.Namespace) -> int:
    store, spool = _open(args.config)
    try:
        msgs = asyncio.run(spool.list())
    finally:
        store.close()
    if args.json:
        print(json.dumps([as_json(m) for m in msgs], indent=2))
        return 0
    if not msgs:
        print("queue is empty")
    for m in msgs:
        print(f"{m.id}  {m.size:>8}  {_iso(m.created)}  <{m.mail_from}>")
        for r in m.recipients:
            nxt = f" next {_iso(r.next_attempt)}" if r.next_attempt else ""
            print(f"    {r.address}  {r.state.value}  attempts={r.attempts}{nxt}")
            if r.last_reply:
                print(f"        {r.last_reply}")
    print(f"-- {len(msgs)} message(s)")
    return 0


def run_show(args: argparse.Namespace) -> int:
    store, spool = _open(args.config)
    try:
        loaded = asyncio.run(spool.load(args.id))
    finally:
        store.close()
    if loaded is None:
        print(f"relay: no message {args.id} in the queue", file=sys.stderr)
        return 1
    msg, data = loaded
    if args.json:
        print(json.dumps(as_json(msg), indent=2))
    else:
        for k, v in as_json(msg).items():
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
    store, spool = _open(args.config)
    try:
        n = asyncio.run(spool.flush())
    finally:
        store.close()
    print(f"{n} recipient(s) due now")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    store, spool = _open(args.config)
    try:
        ok = asyncio.run(spool.delete(args.id))
    finally:
        store.close()
    if not ok:
        print(f"relay: no message {args.id} in the queue", file=sys.stderr)
        return 1
    print(f"deleted {args.id}")
    return 0
