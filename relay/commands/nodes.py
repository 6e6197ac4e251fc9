"""``relay nodes --config P [--json]``: the relay processes sharing the PostgreSQL store
(``[storage] url``), one line per lease owner (``node_id:pid:random``): its node, when it
started, its last heartbeat (written by its sweeper every ``storage.lease``/3 seconds),
whether it is alive (a heartbeat within one lease) and the recipients it holds in flight.
A SQLite store (``storage.path``) has exactly one relay: nothing to list."""

from __future__ import annotations

import argparse
import json
import sys
import time

from relay.commands.queue import run_on_queue
from relay.config import load_config
from relay.queue.base import QueueSpool
from relay.queue.pgspool import NodeRow, PgSpool


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("nodes", help="the relay nodes sharing the PostgreSQL store")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.storage.postgresql:
        print(
            f"storage.path {config.storage.path}: one relay holds a SQLite store;"
            " nodes share a storage.url",
            file=sys.stderr,
        )
        return 0

    async def fetch(spool: QueueSpool) -> list[NodeRow]:
        assert isinstance(spool, PgSpool)  # storage.url
        return await spool.nodes()

    rows = run_on_queue(args.config, fetch)
    now = time.time()
    out = [
        {
            "node_id": n.node_id,
            "owner": n.owner,
            "started": _iso(n.started),
            "heartbeat": _iso(n.heartbeat),
            "alive": now - n.heartbeat <= config.storage.lease,
            "inflight": n.inflight,
        }
        for n in rows
    ]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print("no node has run on this store yet")
    for n, row in zip(out, rows, strict=True):
        state = "alive" if n["alive"] else f"silent {now - row.heartbeat:.0f}s"
        print(
            f"{n['node_id']}  {n['owner']}  {state}  started {n['started']}"
            f"  heartbeat {n['heartbeat']}  inflight={n['inflight']}"
        )
    return 0
