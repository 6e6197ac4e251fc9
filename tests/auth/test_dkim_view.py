"""fastrsa.dkim_view, dkimpy's (headers, body) built from a ParsedMessage's fields, gives
dkimpy's rfc822_parse result (or its error) for any message, and for any message made by
prepending fields to another (the seal's case: our A-R, then the ARC set)."""

from __future__ import annotations

import dkim
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth.fastrsa import dkim_view, rfc822_parse
from relay.message import ParsedMessage

LINES = [b"From: a@b.test", b"\tcont", b" x", b"Subject:s", b"bad line", b"From x", b"To:"]
LINES += [b"X \t: y", b"k:v:w", b"A\rB: c"]
ENDS = [b"\r\n", b"\n"]
block = st.lists(st.tuples(st.sampled_from(LINES), st.sampled_from(ENDS)).map(b"".join))
FIELDS = [b"Authentication-Results: r; none\r\n", b"ARC-Seal: i=1;\r\n b=x\r\n", b"X: y\n"]


def _outcome(fn: object, message: bytes | ParsedMessage) -> object:
    try:
        return fn(message)  # type: ignore[operator]
    except (dkim.MessageFormatError, IndexError) as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(block, st.sampled_from([b"\r\nbody\r\n", b"\nb\n", b"", b"\r\n"]))
def test_dkim_view_is_dkimpys_parse(lines: list[bytes], rest: bytes) -> None:
    raw = b"".join(lines) + rest
    want = _outcome(dkim.rfc822_parse, raw)
    assert _outcome(rfc822_parse, raw) == want
    assert _outcome(dkim_view, ParsedMessage.parse(raw)) == want


@settings(max_examples=300, deadline=None)
@given(block, st.lists(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3), max_size=4))
def test_prepended_fields_view_like_dkimpy(first: list[bytes], steps: list[list[bytes]]) -> None:
    message = ParsedMessage.parse(b"".join(first) + b"\r\nbody\r\n")
    for new in steps:
        message = message.prepend(*new)
        got = _outcome(dkim_view, message)
        assert got == _outcome(dkim.rfc822_parse, message.raw)
        if isinstance(got, tuple):
            for field in got[0]:  # callers may mutate dkimpy's field lists
                field[1] += b"changed"
        assert _outcome(dkim_view, message) == _outcome(dkim.rfc822_parse, message.raw)
