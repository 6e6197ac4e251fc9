"""The DATA payload we send is byte for byte what aiosmtplib would send (dot-stuffing,
line endings, terminator), whether the message is strict CRLF or not."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery.client import data_payload


def aiosmtplib_payload(data: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


def test_examples() -> None:
    assert data_payload(b"a\r\n.\r\n.b\r\n") == b"a\r\n..\r\n..b\r\n.\r\n"
    assert data_payload(b".x\r\n") == b"..x\r\n.\r\n"
    assert data_payload(b"") == b"\r\n.\r\n"
    assert data_payload(b"a\nb\r.c") == b"a\r\nb\r\n..c\r\n.\r\n"


@settings(max_examples=200)
@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"\x00", b" "])))
def test_same_as_aiosmtplib(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert data_payload(data) == aiosmtplib_payload(data)
