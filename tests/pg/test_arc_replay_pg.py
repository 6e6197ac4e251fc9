"""The ARC replay counters on the shared PostgreSQL store (relay.auth.replay_pg): the same
answers as the SQLite guard, and two nodes admitting overrides of one sealer at once never
pass a limit between them (the sealer's advisory lock)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.auth.replay import ArcReplayGuard, ReplayLimits
from relay.auth.replay_pg import PgArcReplayGuard
from relay.pgschema import migrate_all
from relay.pgstore import PgStore
from relay.store import Store
from tests.pg.pgcluster import PASSWORD

NOW = 1_800_000_000.0


async def test_the_same_answers_as_the_sqlite_guard(tmp_path: Path, pg_url: str) -> None:
    limits = ReplayLimits(max_recipients=5, window=3600, per_sealer_hour=3)
    calls = [
        ("lists.test", "seal1", 2, NOW),
        ("lists.test", "seal1", 3, NOW + 1),
        ("lists.test", "seal1", 1, NOW + 2),  # the seal carried 5: a replay
        ("lists.test", "seal2", 6, NOW + 3),  # more than a seal may carry at all
        ("lists.test", "seal3", 1, NOW + 4),
        ("lists.test", "seal4", 1, NOW + 5),  # the sealer's 3 this hour are used
        ("lists.test", "seal1", 1, NOW + 3601),  # window and hour passed
    ]
    async with Store(tmp_path / "s.sqlite3") as store:
        sqlite = ArcReplayGuard(store, limits)
        want = [await sqlite.admit(*c) for c in calls]
    async with PgStore(pg_url, PASSWORD) as pg:
        await migrate_all(pg)
        guard = PgArcReplayGuard(pg, limits)
        got = [await guard.admit(*c) for c in calls]
    assert got == want
    assert [bool(w) for w in want] == [False, False, True, True, False, True, False]


async def test_two_nodes_at_once_never_pass_a_limit(pg_url: str) -> None:
    limits = ReplayLimits(max_recipients=10, window=3600, per_sealer_hour=7)
    async with PgStore(pg_url, PASSWORD) as a, PgStore(pg_url, PASSWORD) as b:
        await migrate_all(a)
        guards = [PgArcReplayGuard(a, limits), PgArcReplayGuard(b, limits)]
        seal = await asyncio.gather(
            *(guards[i % 2].admit("s.test", "one-seal", 3, NOW) for i in range(12))
        )
        assert sum(1 for r in seal if not r) == 3  # 3 x 3 recipients <= 10 < 4 x 3
        sealer = await asyncio.gather(
            *(guards[i % 2].admit("s.test", f"seal{i}", 1, NOW) for i in range(12))
        )
        assert sum(1 for r in sealer if not r) == 7 - 3  # 3 overrides already this hour
