"""The outbound address guard's plain-address shortcut agrees with the full check."""

from __future__ import annotations

from aiosmtplib.email import quote_address
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery import guard

ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
PLAIN = rf"[{ATEXT}]+(\.[{ATEXT}]+)*@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*"


@given(st.from_regex(PLAIN, fullmatch=True))
def test_a_plain_address_goes_on_the_wire_as_written(address: str) -> None:
    assert guard.slow_problem(address) is None
    assert quote_address(address) == f"<{address}>"
    assert guard.wire_address(address) == f"<{address}>"
    assert guard.address_problem(address) is None


@given(st.text(max_size=40))
def test_any_text_gets_the_full_checks_verdict(address: str) -> None:
    assert guard.address_problem(address) == guard.slow_problem(address)


def test_what_the_shortcut_does_not_take_still_refused() -> None:
    for bad in ("a@b\r\nRCPT TO:<x@y>", "a b@c", "<a@b>", "a@b>", "a@b\x00"):
        assert guard.address_problem(bad) is not None, bad
    assert guard.wire_address('"a b"@c.test') == quote_address('"a b"@c.test')
