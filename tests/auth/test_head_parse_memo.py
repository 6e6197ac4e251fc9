"""fastrsa.rfc822_parse, which remembers the last header block and parses only lines
prepended to it, gives dkimpy's rfc822_parse result (or its error) for any sequence."""

from __future__ import annotations

import dkim
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth.fastrsa import rfc822_parse

LINES = [b"From: a@b.test", b"\tcont", b" x", b"Subject:s", b"bad line", b"From x", b"To:"]
ENDS = [b"\r\n", b"\n"]
block = st.lists(st.tuples(st.sampled_from(LINES), st.sampled_from(ENDS)).map(b"".join))


def _outcome(fn: object, message: bytes) -> object:
    try:
        return fn(message)  # type: ignore[operator]
    except (dkim.MessageFormatError, IndexError) as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(block, st.booleans()), max_size=5), block)
def test_prepended_lines_parse_like_dkimpy(
    steps: list[tuple[list[bytes], bool]], first: list[bytes]
) -> None:
    message = b"".join(first) + b"\r\nbody\r\n"
    for lines, prepend in steps:
        message = (b"".join(lines) + message) if prepend else (b"".join(lines) + b"\r\nb\n")
        assert _outcome(rfc822_parse, message) == _outcome(dkim.rfc822_parse, message)
        got = _outcome(rfc822_parse, message)  # served from the memo
        if isinstance(got, tuple):
            for field in got[0]:  # callers may mutate dkimpy's field lists
                field[1] += b"changed"
        assert _outcome(rfc822_parse, message) == _outcome(dkim.rfc822_parse, message)
