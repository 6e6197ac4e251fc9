"""Which MAIL FROM an authenticated user may use."""

from __future__ import annotations

import pytest

from relay.submission.senders import default_senders, sender_allowed

PATTERNS = ("alice@example.org", "*@lists.example.org")


@pytest.mark.parametrize(
    ("mail_from", "ok"),
    [
        ("alice@example.org", True),
        ("Alice@EXAMPLE.org", True),
        ("bob@example.org", False),
        ("anyone@lists.example.org", True),
        ("x@sub.lists.example.org", False),  # *@domain is that domain only
        ("alice@example.org.evil.test", False),
        ("", False),  # the null sender needs "<>"
    ],
)
def test_patterns(mail_from: str, ok: bool) -> None:
    assert sender_allowed(mail_from, PATTERNS) is ok


def test_star_and_null_sender() -> None:
    assert sender_allowed("x@y.test", ("*",)) and not sender_allowed("", ("*",))
    assert sender_allowed("", ("<>",))


def test_defaults() -> None:
    assert default_senders("Alice@Example.org") == ("alice@example.org",)
    assert default_senders("alice") == ()
    assert not sender_allowed("alice@example.org", default_senders("alice"))
