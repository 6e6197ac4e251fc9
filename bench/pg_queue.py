"""The queue's store operations on PostgreSQL beside SQLite, in one process (not the
end-to-end benchmark): N messages enqueued by C concurrent writers, then each claimed and
its outcome recorded. Starts the tests' throwaway cluster (tests/pg/pgcluster.py).

    PYTHONPATH=. .venv/bin/python bench/pg_queue.py [N] [C] [POOL]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from relay.model import RecipientState
from relay.pgstore import PgStore
from relay.queue.base import QueueSpool
from relay.queue.pgspool import PgSpool
from relay.queue.spool import NewMessage, RecipientUpdate, Spool
from relay.store import Store
from tests.pg.pgcluster import PASSWORD, remove_cluster, start_cluster

MSG = b"From: a@example.com\r\nSubject: t\r\n\r\n" + b"x" * 4000 + b"\r\n"


async def run(spool: QueueSpool, n: int, c: int) -> tuple[float, float, float]:
    sem = asyncio.Semaphore(c)

    async def enqueue(i: int) -> str:
        async with sem:
            return await spool.enqueue(NewMessage("a@example.com", (f"r{i}@x.org",), MSG))

    t, cpu = time.perf_counter(), time.process_time()
    qids = await asyncio.gather(*(enqueue(i) for i in range(n)))
    enq, cpu_ms = time.perf_counter() - t, (time.process_time() - cpu) * 1000 / n

    async def deliver(i: int, qid: str) -> None:
        async with sem:
            await spool.claim(qid, [f"r{i}@x.org"])
            done = RecipientUpdate(f"r{i}@x.org", RecipientState.DELIVERED, "250")
            await spool.record(qid, [done])

    t = time.perf_counter()
    await asyncio.gather(*(deliver(i, q) for i, q in enumerate(qids)))
    return n / enq, cpu_ms, n / (time.perf_counter() - t)


async def main(n: int, c: int, pool: int) -> None:
    cluster = start_cluster()
    try:
        async with PgStore(cluster.url(cluster.create_database()), PASSWORD, pool_size=pool) as st:
            e, cpu, d = await run(await PgSpool.open(st), n, c)
            print(
                f"postgresql: enqueue {e:.0f} msg/s ({cpu:.2f} ms CPU/msg; {st.commits}"
                f" commits for {st.writes} writes), claim+record {d:.0f} msg/s"
            )
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "q.sqlite3").open()
            try:
                e, cpu, d = await run(Spool(store), n, c)
            finally:
                store.close()
            print(
                f"sqlite:     enqueue {e:.0f} msg/s ({cpu:.2f} ms CPU/msg),"
                f" claim+record {d:.0f} msg/s"
            )
    finally:
        remove_cluster(cluster)


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]] + [2000, 20, 16][len(sys.argv) - 1 :]
    asyncio.run(main(*args[:3]))
