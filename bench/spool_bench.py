"""The queue's store writes alone: N one-recipient messages enqueued in flight (as intake
and a list's fan-out write them), then each one's delivered outcome recorded (the write
that also deletes it), all concurrently so the store groups them as in the running
relay. Prints CPU microseconds a message for each step and the commits it took.

    PYTHONPATH=. .venv/bin/python -m bench.spool_bench [N]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from relay.model import RecipientState
from relay.queue.spool import NewMessage, RecipientUpdate, Spool
from relay.store import Store

DATA = b"From: a@list.test\r\nSubject: x\r\n\r\n" + b"x" * 1500


async def run(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "q.sqlite3").open()
        try:
            spool = Spool(store)
            c0 = time.process_time()
            qids = await asyncio.gather(
                *(
                    spool.enqueue(
                        NewMessage("b@l.test", (f"m{i}@sink.test",), DATA, (), 0), claimed=True
                    )
                    for i in range(n)
                )
            )
            c1 = time.process_time()
            commits = store.commits
            await asyncio.gather(
                *(
                    spool.record(
                        q,
                        [
                            RecipientUpdate(
                                f"m{i}@sink.test",
                                RecipientState.DELIVERED,
                                "250 ok",
                                0.0,
                                "mx",
                                "TLSv1.3",
                            )
                        ],
                    )
                    for i, q in enumerate(qids)
                )
            )
            c2 = time.process_time()
            left = await spool.list()
        finally:
            store.close()
    assert left == [], "every message must be gone after its outcome"
    return {
        "messages": n,
        "enqueue_cpu_us": round((c1 - c0) / n * 1e6, 1),
        "record_cpu_us": round((c2 - c1) / n * 1e6, 1),
        "enqueue_commits": commits,
        "record_commits": store.commits - commits,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(asyncio.run(run(int(args[0]) if args else 3000)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
