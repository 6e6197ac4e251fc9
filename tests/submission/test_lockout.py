"""The AUTH brute-force guard with a fake clock: back-off, lock-out per IP and per user,
the window, a success resetting the user."""

from __future__ import annotations

from relay.submission.lockout import MAX_DELAY, Lockout


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **kw: float) -> Lockout:
    args = {"max_failures": 3, "window": 60.0, "lockout": 300.0, "delay": 1.0, **kw}
    return Lockout(int(args["max_failures"]), args["window"], args["lockout"], args["delay"], clock)


def test_backoff_doubles_and_is_capped() -> None:
    clock = Clock()
    lo = make(clock, max_failures=100)
    delays = [lo.failure("192.0.2.1", "alice") for _ in range(8)]
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert delays[5:] == [MAX_DELAY] * 3


def test_lockout_after_threshold_then_expires() -> None:
    clock = Clock()
    lo = make(clock)
    for _ in range(2):
        lo.failure("192.0.2.1", "alice")
    assert not lo.locked("192.0.2.1", "alice")
    lo.failure("192.0.2.1", "alice")
    assert lo.locked("192.0.2.1")  # the IP, whatever user
    assert lo.locked("198.51.100.7", "alice")  # the user, from any IP
    assert lo.locked("192.0.2.1", "bob")
    assert not lo.locked("198.51.100.7", "bob")
    clock.now += 299
    assert lo.locked("192.0.2.1")
    clock.now += 2
    assert not lo.locked("192.0.2.1", "alice")


def test_failures_outside_the_window_are_forgotten() -> None:
    clock = Clock()
    lo = make(clock)
    lo.failure("192.0.2.1", "alice")
    lo.failure("192.0.2.1", "alice")
    clock.now += 61
    assert lo.failure("192.0.2.1", "alice") == 1.0  # the first in the window again
    assert not lo.locked("192.0.2.1", "alice")


def test_many_users_from_one_ip_lock_the_ip() -> None:
    clock = Clock()
    lo = make(clock)
    for user in ("a", "b", "c"):
        lo.failure("192.0.2.1", user)
    assert lo.locked("192.0.2.1", "d")
    assert not lo.locked("198.51.100.7", "a")  # no user reached the threshold


def test_success_resets_the_user_not_the_ip() -> None:
    clock = Clock()
    lo = make(clock)
    lo.failure("192.0.2.1", "alice")
    lo.failure("192.0.2.1", "alice")
    lo.success("Alice")
    assert lo.failure("198.51.100.7", "alice") == 1.0
    lo.failure("192.0.2.1", "bob")
    assert lo.locked("192.0.2.1")  # three failures from the IP


def test_zero_delay_and_no_user() -> None:
    clock = Clock()
    lo = make(clock, delay=0.0)
    assert lo.failure("192.0.2.1", None) == 0.0
    assert not lo.locked("192.0.2.1", None)
