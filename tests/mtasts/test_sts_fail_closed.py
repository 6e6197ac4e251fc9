"""MTA-STS fails closed when the policy cache cannot be read (RFC 8461 section 5): a
StoreError while reading the cached policy must never read as "no policy"."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from relay.model import StsMode
from relay.mtasts.cache import CacheUnavailable
from relay.store import Store
from tests.mtasts.conftest import StsLab
from tests.mtasts.sts_https_server import Answer

T = TypeVar("T")


class FaultyStore(Store):
    """A real Store whose reads fail the way SQLite fails them while ``fail_reads``."""

    fail_reads = False

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self.fail_reads:

            def locked(c: sqlite3.Connection) -> Any:
                raise sqlite3.OperationalError("database is locked")

            return await super().read(locked)  # type: ignore[no-any-return]
        return await super().read(fn)


@pytest.fixture
def faulty(tmp_path: Path) -> Any:
    s = FaultyStore(tmp_path / "faulty.sqlite3").open()
    yield s
    s.close()


def policy(mode: str = "enforce") -> str:
    return f"version: STSv1\nmode: {mode}\nmx: mx.example.com\nmax_age: 86400\n"


async def test_unreadable_cache_and_policy_host_down_raises_not_no_policy(
    lab: StsLab, faulty: FaultyStore
) -> None:
    lab.publish("example.com", policy(), "v1")
    m = lab.manager(faulty)
    assert (await m.get_policy("example.com")).enforce  # cached now
    # the attacker blocks the policy host; the cache read fails (SQLITE_BUSY)
    lab.publish("example.com", None, "v1", answer=Answer(503, b"down"))
    faulty.fail_reads = True
    with pytest.raises(CacheUnavailable) as exc:
        await m.get_policy("example.com")
    assert "database is locked" in exc.value.reason
    assert "policy fetch failed" in exc.value.reason
    assert m.counters.cache_unavailable >= 1
    faulty.fail_reads = False  # the store recovers: the cached enforce policy applies again
    assert (await m.get_policy("example.com")).enforce


async def test_unreadable_cache_and_txt_hidden_raises(lab: StsLab, faulty: FaultyStore) -> None:
    lab.publish("example.com", policy(), "v1")
    m = lab.manager(faulty)
    await m.get_policy("example.com")
    lab.zone.remove("_mta-sts.example.com")  # a DNS attacker hides the record
    faulty.fail_reads = True
    with pytest.raises(CacheUnavailable) as exc:
        await m.get_policy("example.com")
    assert "TXT none" in exc.value.reason


async def test_unreadable_cache_with_a_fresh_fetch_uses_the_fetched_policy(
    lab: StsLab, faulty: FaultyStore
) -> None:
    lab.publish("example.com", policy("testing"), "v1")
    m = lab.manager(faulty)
    faulty.fail_reads = True  # never cached; the policy host answers: that policy applies
    pol = await m.get_policy("example.com")
    assert (pol.mode, pol.policy_id) == (StsMode.TESTING, "v1")
    assert lab.fetches("example.com") == 1
