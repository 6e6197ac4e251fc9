"""The group-commit writer wakes an event loop once per commit group (not once per
write), and every write of the group still gets its own result or error; the message id
given with a NewMessage is what the queue stores."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.errors import StoreError
from relay.queue.spool import NewMessage, Spool
from relay.store import Store


async def test_one_loop_wakeup_per_commit_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s.sqlite3").open()
    store.write_sync(lambda c: c.execute("CREATE TABLE t (v INTEGER)"))
    loop = asyncio.get_running_loop()
    wakeups: list[int] = []
    real = loop.call_soon_threadsafe

    def counting(cb: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        wakeups.append(1)
        return real(cb, *args, **kw)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    gate = threading.Event()

    def blocker(conn: sqlite3.Connection) -> str:
        gate.wait(5)  # holds the writer so the next 20 writes queue up as one group
        return "first"

    def insert(v: int) -> Callable[[sqlite3.Connection], int]:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT INTO t VALUES (?)", (v,))
            return v

        return run

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    first = asyncio.ensure_future(store.write(blocker))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(store.write(insert(i))) for i in range(20)]
    failing = asyncio.ensure_future(store.write(bad))
    await asyncio.sleep(0.05)
    gate.set()
    assert await first == "first"
    assert [await f for f in rest] == list(range(20))
    with pytest.raises(StoreError):
        await failing
    assert store.commits >= 2 and len(wakeups) == 2  # 22 writes, two groups, two wake-ups
    assert store.read_sync(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()[0]) == 20
    monkeypatch.undo()
    store.close()


async def test_given_message_id_is_stored(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3").open()
    spool = Spool(store)
    data = b"Message-ID: <in-header@x>\r\n\r\nhi\r\n"
    a = await spool.enqueue(NewMessage("a@x.test", ("b@y.test",), data))
    b = await spool.enqueue(NewMessage("a@x.test", ("b@y.test",), data, message_id="<given@x>"))
    ids = {m.id: m.message_id for m in await spool.list()}
    assert ids == {a: "<in-header@x>", b: "<given@x>"}
    assert NewMessage("a@x.test", (), data).msgid() == "<in-header@x>"
    store.close()
