"""The queue store alone, without SMTP: how much a message costs the store (issue 14).

``concurrency`` tasks each queue a message claimed (as intake does), then record its one
recipient delivered (as the scheduler does: the message deleted), until ``messages`` are
done. The same work on the SQLite spool (its writer thread, synchronous=FULL) and on
PostgreSQL (``PgSpool`` on a throwaway cluster, synchronous_commit=on). Reported: messages
per second, this process's CPU ms per message (the relay's side: asyncpg or sqlite3) and,
for PostgreSQL, the server's CPU ms per message (every postgres process); optionally
pg_stat_statements' top statements.

    PYTHONPATH=. .venv/bin/python bench/storebench.py [--messages 3000] [--concurrency 20]
        [--rounds 3] [--pg-stats]

The SMTP benchmark (bench/run.py --store postgresql) is the end-to-end figure; this one
shows where the store's part of it goes, with far less noise from the load generator and
the sink sharing the two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pgsys import PgServer  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402
from relay.model import RecipientState  # noqa: E402
from relay.pgstore import PgStore  # noqa: E402
from relay.queue import pgspool  # noqa: E402
from relay.queue.pgspool import PgSpool  # noqa: E402
from relay.queue.spool import NewMessage, RecipientUpdate, Spool  # noqa: E402
from relay.store import Store  # noqa: E402
from tests.pg.pgcluster import PASSWORD  # noqa: E402


def body(i: int, size: int = 4096) -> bytes:
    head = (
        f"From: a@sender.test\r\nTo: b@sink.test\r\nMessage-ID: <s{i}@sender.test>\r\n"
        f"Subject: store bench {i}\r\n\r\n"
    ).encode()
    line = f"line {i} of a message body that is text, as most mail is.\r\n".encode()
    return head + line * max(1, (size - len(head)) // len(line))


async def work(spool: Any, messages: int, concurrency: int) -> None:
    todo = iter(range(messages))
    done = RecipientState.DELIVERED

    async def one() -> None:
        for i in todo:
            msg = NewMessage("a@sender.test", ("b@sink.test",), body(i))
            qid = await spool.enqueue(msg, claimed=True)
            removed, _ = await spool.record(qid, [RecipientUpdate("b@sink.test", done, "250 ok")])
            if not removed:
                raise RuntimeError(f"{qid} was not removed")

    await asyncio.gather(*(one() for _ in range(concurrency)))


async def run_sqlite(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    path = workdir / f"q{time.monotonic_ns()}.sqlite3"
    async with Store(path) as store:
        spool = Spool(store)
        await work(spool, 200, args.concurrency)  # warm-up
        c0, t0 = time.process_time(), time.perf_counter()
        await work(spool, args.messages, args.concurrency)
        c1, t1 = time.process_time(), time.perf_counter()
    return {
        "msgs_per_s": args.messages / (t1 - t0),
        "client_cpu_ms": (c1 - c0) * 1000 / args.messages,
        "server_cpu_ms": 0.0,
    }


async def run_pg(args: argparse.Namespace, server: PgServer) -> dict[str, Any]:
    url = server.database()
    database = url.split("/", 3)[3].split("?", 1)[0]
    async with PgStore(url, PASSWORD) as store:
        spool = await PgSpool.open(store, node_id="bench")
        await work(spool, 200, args.concurrency)  # warm-up
        server.top_statements(database)  # reset
        s0 = cpu_seconds(server.pids())
        c0, t0 = time.process_time(), time.perf_counter()
        await work(spool, args.messages, args.concurrency)
        c1, t1 = time.process_time(), time.perf_counter()
        s1 = cpu_seconds(server.pids())
    return {
        "msgs_per_s": args.messages / (t1 - t0),
        "client_cpu_ms": (c1 - c0) * 1000 / args.messages,
        "server_cpu_ms": (s1 - s0) * 1000 / args.messages,
        "statements": server.top_statements(database, 8),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pg-stats", action="store_true")
    p.add_argument(
        "--queue-migrations",
        type=int,
        action="append",
        help="PostgreSQL with only the first N queue migrations (repeatable: the variants run"
        " alternately, to measure a change of the schema on a machine whose speed drifts)",
    )
    args = p.parse_args()
    all_steps = list(pgspool.MIGRATIONS)
    variants = args.queue_migrations or [len(all_steps)]
    server = PgServer(stats=args.pg_stats)
    names = ["sqlite"] + [f"postgresql:{n}" for n in variants]
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    try:
        with tempfile.TemporaryDirectory(prefix="relay-storebench-") as tmp:
            for rnd in range(args.rounds):
                order = names if rnd % 2 == 0 else names[::-1]
                for name in order:
                    if name == "sqlite":
                        r = asyncio.run(run_sqlite(args, Path(tmp)))
                    else:
                        pgspool.MIGRATIONS = all_steps[: int(name.split(":")[1])]
                        r = asyncio.run(run_pg(args, server))
                    results[name].append(r)
                    print(
                        f"round {rnd + 1} {name:14s} {r['msgs_per_s']:7.0f} msgs/s"
                        f"  client {r['client_cpu_ms']:.3f} ms/msg"
                        f"  server {r['server_cpu_ms']:.3f} ms/msg",
                        flush=True,
                    )
                    for st in r.get("statements", []):
                        print(
                            f"    {st['calls']:6d} calls {st['mean_ms']:.4f} ms/call"
                            f" {st['wal_bytes'] / max(1, st['calls']):7.0f} WAL B/call"
                            f"  {st['query'][:90]}"
                        )
    finally:
        server.stop()
    med = {
        n: {
            k: statistics.median(r[k] for r in rs)
            for k in ("msgs_per_s", "client_cpu_ms", "server_cpu_ms")
        }  # fmt: skip
        for n, rs in results.items()
    }
    s = med["sqlite"]
    print(f"\nmedians of {args.rounds} rounds, {args.messages} messages, {args.concurrency} tasks")
    print(f"sqlite          {s['msgs_per_s']:7.0f} msgs/s  {s['client_cpu_ms']:.3f} CPU ms/msg")
    for name in names[1:]:
        g = med[name]
        print(
            f"{name:14s}  {g['msgs_per_s']:7.0f} msgs/s  {g['client_cpu_ms']:.3f} + server"
            f" {g['server_cpu_ms']:.3f} CPU ms/msg"
            f"  ({g['msgs_per_s'] / s['msgs_per_s']:.2f}x sqlite)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
