"""The users file: round trip, atomic 0600 writes, errors naming the line, reload on
change, and the same verification time for unknown users and wrong passwords."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from relay.submission.users import UserDb, UsersFileError, check_name, load, save

FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


def test_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "users"
    users = {"alice@example.org": FAST.hash("pw-alice-1"), "bob": FAST.hash("pw-bob-22")}
    save(path, users)
    assert load(path) == users
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["users"]  # no temporary left
    assert path.read_text().startswith("# relay submission users")


def test_missing_file_is_no_users(tmp_path: Path) -> None:
    assert load(tmp_path / "none") == {}
    assert UserDb(tmp_path / "none").verify("alice", "x") is False


@pytest.mark.parametrize(
    "line", ["alice", "alice:plain-text", "al ice:$argon2id$x", "bob:$argon2id$v=19$broken"]
)
def test_bad_lines_name_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "users"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(UsersFileError, match=r"users:3: "):
        load(path)


def test_names() -> None:
    assert check_name("Alice@Example.ORG") == "alice@example.org"
    for bad in ("", "a b", "a:b", "a\x01", "x" * 256):
        with pytest.raises(ValueError):
            check_name(bad)


def test_verify_and_reload_on_change(tmp_path: Path) -> None:
    path = tmp_path / "users"
    save(path, {"alice": FAST.hash("right-password")})
    db = UserDb(path)
    assert db.verify("alice", "right-password")
    assert db.verify("ALICE", "right-password")  # names are case-insensitive
    assert not db.verify("alice", "wrong")
    assert not db.verify("nobody", "right-password")
    save(path, {"alice": FAST.hash("new-password"), "bob": FAST.hash("bob-password")})
    assert db.verify("alice", "new-password") and not db.verify("alice", "right-password")
    assert db.names() == ["alice", "bob"]
    path.write_text("garbage\n")
    with pytest.raises(UsersFileError):
        db.verify("alice", "new-password")


def test_unknown_user_takes_as_long_as_a_wrong_password(tmp_path: Path) -> None:
    """No user enumeration by timing (threats row 12): the dummy hash has the file's
    parameters, so both failures run one argon2 verification of the same cost."""
    path = tmp_path / "users"
    hasher = PasswordHasher(time_cost=2, memory_cost=16384, parallelism=1)
    save(path, {"alice": hasher.hash("right-password")})
    db = UserDb(path)
    db.verify("nobody", "x")  # the dummy is made once, at the first unknown user

    def timed(user: str) -> float:
        t0 = time.perf_counter()
        assert not db.verify(user, "wrong-password")
        return time.perf_counter() - t0

    wrong, unknown = [], []
    for _ in range(15):
        wrong.append(timed("alice"))
        unknown.append(timed("nobody"))
    mw, mu = statistics.median(wrong), statistics.median(unknown)
    assert mw > 0.002  # a real argon2 check ran for both
    assert 0.6 < mu / mw < 1.6, (mw, mu)
