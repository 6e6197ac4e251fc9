"""Group commit: 50 concurrent writers share fsyncs; every write is durable when it returns;
one failing write does not take the others down."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from relay.errors import StoreError
from relay.queue.spool import NewMessage, Spool
from relay.store import Store

MSG = b"From: a@example.com\r\nSubject: t\r\n\r\nhi\r\n"


async def test_fifty_concurrent_enqueues_share_commits(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3").open()
    spool = Spool(store)
    before = store.commits
    qids = await asyncio.gather(
        *(
            spool.enqueue(NewMessage("a@example.com", (f"r{i}@example.org",), MSG))
            for i in range(50)
        )
    )
    commits = store.commits - before
    assert len(set(qids)) == 50
    assert 1 <= commits < 25, commits  # 50 writers, far fewer fsync'd commits
    store.close()
    # durable: a fresh connection (as after a crash) sees all 50
    conn = sqlite3.connect(tmp_path / "q.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM queue_messages").fetchone()[0] == 50
    conn.close()


async def test_one_failing_write_does_not_fail_its_group(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3").open()
    spool = Spool(store)

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    results = await asyncio.gather(
        store.write(bad),
        *(spool.enqueue(NewMessage("a@example.com", ("b@example.org",), MSG)) for _ in range(5)),
        return_exceptions=True,
    )
    assert isinstance(results[0], StoreError)
    assert all(isinstance(r, str) for r in results[1:])
    assert len(await spool.list()) == 5
    store.close()


def test_synchronous_full_and_wal(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3").open()
    mode = store.write_sync(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    sync = store.write_sync(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    assert mode == "wal" and sync == 2  # FULL: the WAL is fsync'd at every commit
    store.close()
