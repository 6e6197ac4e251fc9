"""PgStore.listen on a real PostgreSQL: the LISTEN connection is re-established after its
backend is terminated (and after a silent loss found by the liveness check), the caller
is woken once it is back (NOTIFYs sent meanwhile are lost), and a NOTIFY after that still
reaches the callback; stop() ends it for good."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from relay import pgstore
from relay.pgstore import PgStore
from tests.pg.pgcluster import PASSWORD


async def _until(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_terminated_listen_connection_is_re_established(pg_url: str) -> None:
    got: list[str] = []
    async with PgStore(pg_url, PASSWORD) as store:
        stop = await store.listen("relay_test", got.append)
        notifier = await asyncpg.connect(pg_url, password=PASSWORD)
        try:
            await notifier.execute("NOTIFY relay_test, 'one'")
            await _until(lambda: got == ["one"], 5)
            for round_ in range(2):  # twice: the new connection is watched too
                pids = [
                    r["pid"]
                    for r in await notifier.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
                    )
                ]
                assert len(pids) == 1
                assert await notifier.fetchval("SELECT pg_terminate_backend($1)", pids[0])
                await _until(lambda: "" in got, 5)  # back, and the caller told to look again
                got.remove("")
                await notifier.execute(f"NOTIFY relay_test, 'after-{round_}'")
                await _until(lambda r=round_: f"after-{r}" in got, 5)  # type: ignore[misc]
            await stop()
            await notifier.execute("NOTIFY relay_test, 'stopped'")
            await asyncio.sleep(0.3)
            assert "stopped" not in got
            n = await notifier.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
                " AND state = 'idle' AND pid <> pg_backend_pid()"
                " AND query NOT LIKE 'UNLISTEN%'"
            )
            assert n in (0, 1)  # the pooled connection may stay open, no longer listening
        finally:
            await notifier.close()


async def test_a_silently_broken_listen_connection_is_found_by_the_check(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgstore, "LISTEN_CHECK", 0.3)
    got: list[str] = []
    async with PgStore(pg_url, PASSWORD) as store:
        stop = await store.listen("relay_test", got.append)
        listener = stop.__self__  # type: ignore[attr-defined]
        listener_conn = listener.conn
        answers = iter([False])  # the peer stops answering once (no FIN: no termination)

        async def alive() -> bool:
            return next(answers, True)

        monkeypatch.setattr(listener, "_alive", alive)
        await _until(lambda: "" in got, 5)
        assert stop.__self__.conn is not listener_conn  # type: ignore[attr-defined]
        notifier = await asyncpg.connect(pg_url, password=PASSWORD)
        try:
            await notifier.execute("NOTIFY relay_test, 'again'")
            await _until(lambda: "again" in got, 5)
        finally:
            await notifier.close()
            await stop()
