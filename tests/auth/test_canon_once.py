"""Work saved per message: body canonicalisation, key record parsing, message parsing."""

from __future__ import annotations

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import fastrsa
from relay.auth.fastrsa import canonical_body, rfc822_parse
from relay.auth.keys import KeyRecordError, parse_key_record
from relay.commands.keygen import generate

RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
SIMPLE = CanonicalizationPolicy.from_c_value(b"simple/simple")
BODY = b"Hello  \t world \r\n\r\nsecond line\t\r\n\r\n\r\n"


def test_same_as_dkimpy_for_each_algorithm_in_turn() -> None:
    for _ in range(2):  # the second pass is served from the remembered result
        for policy in (RELAXED, SIMPLE, RELAXED):
            assert canonical_body(policy, BODY) == policy.canonicalize_body(BODY)


def test_a_different_body_is_not_served_the_last_result() -> None:
    first = canonical_body(RELAXED, BODY)
    other = BODY.replace(b"world", b"there")
    assert canonical_body(RELAXED, other) == RELAXED.canonicalize_body(other) != first
    assert canonical_body(RELAXED, b"") == RELAXED.canonicalize_body(b"")


def test_a_key_record_is_parsed_once_and_failures_are_not_remembered() -> None:
    record = generate("rsa", 2048).record()
    first = parse_key_record(record)
    assert parse_key_record(record) is first
    assert first.key_type == "rsa" and first.bits == 2048
    for _ in range(2):
        with pytest.raises(KeyRecordError):
            parse_key_record("v=DKIM1; k=rsa; p=")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b c", b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r"])))
def test_relaxed_fast_path_is_byte_identical_to_dkimpy(parts: list[bytes]) -> None:
    body = b"".join(parts)
    for policy in (RELAXED, SIMPLE):
        assert canonical_body(policy, body) == policy.canonicalize_body(body)


_PARTS = [b"A: b", b"Sub: x y", b" folded", b"\tfolded", b"\r\n", b"\n", b"\r", b"body", b"", b"x:"]


def _dkimpy_parse(message: bytes) -> object:
    try:
        return dkim.rfc822_parse(message)
    except (dkim.MessageFormatError, IndexError) as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PARTS), max_size=30))
def test_rfc822_parse_gives_dkimpys_result(parts: list[bytes]) -> None:
    message = b"".join(parts)
    try:
        ours: object = rfc822_parse(message)
    except (dkim.MessageFormatError, IndexError) as exc:
        ours = type(exc)
    assert ours == _dkimpy_parse(message)


def test_rfc822_parse_of_a_message_with_bare_lf_in_the_body() -> None:
    message = b"From: a@example.com\r\nTo: b@example.net\r\n\r\nline 1\nline 2\r\nline 3\n"
    assert rfc822_parse(message) == dkim.rfc822_parse(message)
    assert rfc822_parse(message)[1] == b"line 1\r\nline 2\r\nline 3\r\n"


def test_the_body_memo_is_bounded_by_bytes() -> None:
    """Issue 10: bounded by the bytes it holds, not by entries (a few 25 MB bodies would
    otherwise stay in memory)."""
    fastrsa._BODY_MEMO.clear()
    fastrsa._body_memo_held = 0
    limit = fastrsa._BODY_MEMO_BYTES
    big = [bytes([65 + i]) * (limit // 3) + b"\r\n" for i in range(5)]
    for body in big:
        assert canonical_body(SIMPLE, body) == SIMPLE.canonicalize_body(body)
        assert fastrsa.body_memo_bytes() <= limit
    assert len(fastrsa._BODY_MEMO) == 1  # each costs 2/3 of the bound (body + canonical)
    huge = b"x" * limit + b"\r\n"  # larger than the whole memo: not kept
    assert canonical_body(SIMPLE, huge) == SIMPLE.canonicalize_body(huge)
    assert fastrsa.body_memo_bytes() <= limit
    assert (SIMPLE.body_algorithm, huge) not in fastrsa._BODY_MEMO
    small = [b"small %d\r\n" % i for i in range(1000)]  # many small bodies all fit
    for body in small:
        canonical_body(RELAXED, body)
    assert sum(len(k[1]) + len(v) for k, v in fastrsa._BODY_MEMO.items()) == (
        fastrsa.body_memo_bytes()
    )
    assert (RELAXED.body_algorithm, small[0]) in fastrsa._BODY_MEMO
