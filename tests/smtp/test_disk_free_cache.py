"""CachedDiskFree: the free-space answer for MAIL is looked up at most once per ttl."""

from __future__ import annotations

import shutil
from pathlib import Path

from relay.smtp.limits import CachedDiskFree, disk_free


def test_free_space_is_reused_within_ttl_and_refreshed_after(tmp_path: Path) -> None:
    now = [100.0]
    answers = iter([5_000, 7_000])
    asked: list[Path] = []

    def lookup(path: Path) -> int:
        asked.append(path)
        return next(answers)

    target = tmp_path / "relay.sqlite3"
    free = CachedDiskFree(target, ttl=1.0, clock=lambda: now[0], lookup=lookup)
    assert free() == 5_000
    now[0] += 0.5
    assert free() == 5_000  # within the ttl: not asked again
    now[0] += 0.6
    assert free() == 7_000
    assert asked == [target, target]


def test_default_lookup_asks_the_nearest_existing_directory(tmp_path: Path) -> None:
    free = CachedDiskFree(tmp_path / "not" / "yet" / "relay.sqlite3")
    got = free()
    assert got > 0 and abs(got - shutil.disk_usage(tmp_path).free) < 64 << 20
    assert abs(disk_free(tmp_path / "missing") - got) < 64 << 20
