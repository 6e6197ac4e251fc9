"""relay.message.ParsedMessage, the one parse of a message: a value made by ``prepend`` or
``without`` is the value a fresh parse of its bytes gives, and it is immutable; the
signature-tag cache (keyed by the header value's text) gives what a fresh parse gives."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import keys
from relay.auth.keys import header_values, signature_tags
from relay.auth.results import split_header, strip_ours
from relay.message import HeaderField, ParsedMessage

LINES = [
    b"DKIM-Signature: v=1; d=a.test; s=s1;\r\n\tb=AB CD\r\n",
    b"From: x@a.test\r\n",
    b"ARC-Seal: i=1; d=b.test; s=x\r\n",
    b"dkim-signature:d=c.test;  s = s2 ; h=from:to\n",
    b" folded; t=1\r\n",
    b"Bad line\r\n",
    b"Authentication-Results: relay.test; spf=pass\r\n",
    b"Received: from x\r\n\tby y\r\n",
]
TOPS = [line for line in LINES if line[:1] not in (b" ", b"\t")]
BODIES = [b"\r\nbody\r\n", b"\nbody\n\nmore\n", b"\r\n", b"", b"no empty line\r\n"]


def _fresh(message: ParsedMessage) -> ParsedMessage:
    return ParsedMessage.parse(message.raw)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(LINES), max_size=6),
    st.sampled_from(BODIES),
    st.lists(st.lists(st.sampled_from(TOPS), min_size=1, max_size=3), max_size=4),
)
def test_prepend_is_a_fresh_parse(
    lines: list[bytes], body: bytes, prepends: list[list[bytes]]
) -> None:
    message = ParsedMessage.parse(b"".join(lines) + body)
    for new in prepends:
        message = message.prepend(*new)
        assert message == _fresh(message)
        assert message.header_block() + message.rest() == message.raw


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=8), st.sampled_from(BODIES))
def test_without_is_a_fresh_parse(lines: list[bytes], body: bytes) -> None:
    message = ParsedMessage.parse(b"".join(lines) + body)
    for name in ("dkim-signature", "authentication-results", "", "from"):
        smaller, removed = message.without(lambda f, n=name: f.lname == n)  # type: ignore[misc]
        assert removed == len([f for f in message.fields if f.lname == name])
        assert smaller == _fresh(smaller)


def test_strip_ours_reads_the_value_and_keeps_other_fields() -> None:
    raw = (
        b"Authentication-Results: relay.test; dmarc=pass\r\n"
        b"Authentication-Results: other.test; spf=pass\r\nFrom: a@b.test\r\n\r\nbody\r\n"
    )
    stripped, removed = strip_ours(ParsedMessage.parse(raw), "relay.test")
    assert removed == 1
    assert stripped.raw == raw.split(b"\r\n", 1)[1]
    assert [f.name for f in stripped.fields] == ["Authentication-Results", "From"]
    assert stripped.body() == b"body\r\n"


def test_the_value_is_immutable_and_pickles_as_its_bytes() -> None:
    message = ParsedMessage.parse(b"From: a@b.test\r\nTo: c@d.test\r\n\r\nhi\r\n")
    with pytest.raises(AttributeError):
        message.raw = b""  # type: ignore[misc]
    assert isinstance(message.fields, tuple)
    assert pickle.loads(pickle.dumps(message)) == message
    assert len(pickle.dumps(message)) < len(message.raw) + 200
    assert message.get_all("TO") == (HeaderField("To", b"To: c@d.test\r\n"),)
    assert message.body() == b"hi\r\n" and message.header_block().endswith(b"d.test\r\n")


def test_readers_share_one_parse() -> None:
    message = ParsedMessage.parse(b"".join(LINES[:3]) + b"\r\nbody\r\n")
    fields, rest = split_header(message)
    assert tuple(fields) == message.fields and rest == b"\r\nbody\r\n"
    assert header_values(message, [b"arc-seal"]) == [(b"arc-seal", b" i=1; d=b.test; s=x")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"d", b"=", b";", b" ", b"\t", b"s", b"x1", b"\r\n"])))
def test_signature_tags_cache_matches_a_fresh_parse(parts: list[bytes]) -> None:
    value = b"".join(parts)
    fresh = dict(keys._signature_tags.__wrapped__(value))
    first = signature_tags(value)
    assert first == fresh
    first[b"zz"] = b"changed"
    assert signature_tags(value) == fresh


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.lists(st.sampled_from(LINES), max_size=5))
def test_parse_keeps_every_byte(noise: bytes, lines: list[bytes]) -> None:
    for raw in (noise, b"".join(lines) + noise, b"".join(lines) + b"\r\n" + noise):
        message = ParsedMessage.parse(raw)
        assert b"".join(f.raw for f in message.fields) == message.header_block()
        assert message.header_block() + message.rest() == raw
        assert raw.endswith(message.body()) and message.head_len <= message.body_offset
        assert all(f.name == "" or b":" in f.raw for f in message.fields)
