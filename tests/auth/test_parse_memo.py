"""The remembered header-field and signature-tag parses give what a fresh parse gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import keys
from relay.auth.keys import header_values, signature_tags
from relay.auth.results import _split_header, split_header

LINES = [
    b"DKIM-Signature: v=1; d=a.test; s=s1;\r\n\tb=AB CD",
    b"From: x@a.test",
    b"ARC-Seal: i=1; d=b.test; s=x",
    b"dkim-signature:d=c.test;  s = s2 ; h=from:to",
    b" folded; t=1",
]
WANTED = [(b"dkim-signature",), (b"arc-seal", b"dkim-signature"), (b"from",)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(LINES), max_size=6), st.sampled_from(WANTED))))
def test_header_values_memo_matches_a_fresh_parse(
    calls: list[tuple[list[bytes], tuple[bytes, ...]]],
) -> None:
    for lines, wanted in calls:
        message = b"\r\n".join(lines) + b"\r\n\r\nbody\r\n"
        for _ in range(2):  # the second call is served from the memo
            got = header_values(message, wanted)
            assert got == keys._header_values(message, frozenset(wanted))
            got.append((b"x", b"y"))  # a caller's change does not reach the memo
        assert header_values(bytes(message), wanted) == keys._header_values(
            message, frozenset(wanted)
        )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"d", b"=", b";", b" ", b"\t", b"s", b"x1", b"\r\n"])))
def test_signature_tags_memo_matches_a_fresh_parse(parts: list[bytes]) -> None:
    value = b"".join(parts)
    fresh = dict(keys._signature_tags.__wrapped__(value))
    first = signature_tags(value)
    assert first == fresh
    first[b"zz"] = b"changed"
    assert signature_tags(value) == fresh


FIELD_LINES = [b"From: a@b.test\r\n", b"\tfolded\r\n", b"Bad line\r\n", b"To: c\n", b"\r\n", b"x"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(FIELD_LINES), max_size=6), max_size=4))
def test_split_header_memo_matches_a_fresh_split(messages: list[list[bytes]]) -> None:
    for lines in messages:
        message = b"".join(lines)
        for _ in range(2):  # the second call is served from the memo
            fields, rest = split_header(message)
            assert (fields, rest) == _split_header(message)
            fields.clear()  # a caller's change does not reach the memo
