"""relay.auth.fastrsa's remembered relaxed header canonicalisation and header hashing are
byte-identical to dkimpy's own functions."""

from __future__ import annotations

import hashlib

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import fastrsa
from relay.auth.fastrsa import canonicalize_headers, hash_headers, relaxed_header

RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
SIMPLE = CanonicalizationPolicy.from_c_value(b"simple/relaxed")
PIECES = [b"a", b"B c", b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r", b"\r\r\n", b"\x0b", b"b=x"]
NAMES = [b"From", b"Subject ", b"DKIM-Signature", b"X-A\t", b"to"]
fields = st.tuples(st.sampled_from(NAMES), st.lists(st.sampled_from(PIECES)).map(b"".join))


@settings(max_examples=300, deadline=None)
@given(st.lists(fields, max_size=8))
def test_relaxed_headers_match_dkimpy(headers: list[tuple[bytes, bytes]]) -> None:
    for _ in range(2):  # the second pass is served from the memo
        for policy in (RELAXED, SIMPLE):
            assert canonicalize_headers(policy, headers) == policy.canonicalize_headers(headers)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(fields, max_size=8),
    st.lists(st.sampled_from([b"from", b"to", b"subject", b"x-a"]), max_size=5),
    fields,
)
def test_hash_headers_matches_dkimpy(
    headers: list[tuple[bytes, bytes]], include: list[bytes], sig: tuple[bytes, bytes]
) -> None:
    for policy in (RELAXED, SIMPLE):
        canon = policy.canonicalize_headers(headers)
        ours, theirs = hashlib.sha256(), hashlib.sha256()
        got = hash_headers(ours, policy, canon, include, sig)
        want = dkim.hash_headers(theirs, policy, canon, include, sig, {})
        assert got == want
        assert ours.digest() == theirs.digest()


def test_the_memo_is_bounded_and_list_fields_work() -> None:
    fastrsa._HEADER_MEMO.clear()
    for i in range(fastrsa._HEADER_MEMO_MAX + 10):
        relaxed_header((b"X-N", b" %d \r\n" % i))
    assert len(fastrsa._HEADER_MEMO) <= fastrsa._HEADER_MEMO_MAX
    field = [b"Subject", b" a \t b\r\n c\r\n"]  # dkimpy parses fields as lists
    assert canonicalize_headers(RELAXED, [field]) == RELAXED.canonicalize_headers([field])
    assert canonicalize_headers(RELAXED, [field])[0] == (b"subject", b"a b c\r\n")
