"""The netstring codec of the socketmap protocol (relay.policyserver.netstring): round
trips whatever the chunking, and every malformed or oversized stream is refused."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.policyserver.netstring import NetstringReader, NetstringTooLong, encode

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 200


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@FUZZ
@given(
    st.lists(st.binary(max_size=LIMIT), max_size=8),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_round_trip_whatever_the_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode(p) for p in payloads)
    reader = NetstringReader(LIMIT)
    got: list[bytes] = []
    for chunk in _chunks(stream, cuts):
        got.extend(reader.feed(chunk))
    assert got == payloads
    assert reader.error is None and reader.pending == 0


@FUZZ
@given(st.binary(min_size=LIMIT + 1, max_size=3 * LIMIT), st.integers(1, 8))
def test_oversized_is_refused_from_its_length_alone(payload: bytes, head: int) -> None:
    """The length field says it is too long: refused before the payload is read."""
    reader = NetstringReader(LIMIT)
    framed = encode(payload)
    assert reader.feed(framed[:head]) == [] or reader.error is not None
    reader.feed(framed[head : head + 3])
    assert isinstance(reader.error, NetstringTooLong)
    assert reader.error.limit == LIMIT
    assert reader.feed(b"0:,") == []  # nothing after the error


@FUZZ
@given(st.binary(max_size=64))
def test_any_bytes_give_payloads_or_an_error_never_an_exception(junk: bytes) -> None:
    reader = NetstringReader(LIMIT)
    out = reader.feed(junk)
    # whatever came out re-encodes to a prefix of the input
    assert junk.startswith(b"".join(encode(p) for p in out))


@pytest.mark.parametrize(
    ("stream", "problem"),
    [
        (b"3:abc;", "not followed by ','"),
        (b"x:", "length has the byte b'x'"),
        (b":abc,", "without a length"),
        (b"03:abc,", "leading zero"),
        (b"-1:", "length has the byte b'-'"),
        (b"9999:", "over the limit of 200"),
        (b"12345678901234567890", "over the limit"),
    ],
)
def test_malformed_streams_name_the_problem(stream: bytes, problem: str) -> None:
    reader = NetstringReader(LIMIT)
    assert reader.feed(stream) == []
    assert reader.error is not None and problem in str(reader.error)


def test_requests_before_a_bad_frame_are_still_returned() -> None:
    reader = NetstringReader(LIMIT)
    assert reader.feed(b"1:a,2:bc,3:abc;") == [b"a", b"bc"]
    assert reader.error is not None


def test_zero_length_and_the_exact_limit() -> None:
    reader = NetstringReader(LIMIT)
    assert reader.feed(b"0:," + encode(b"x" * LIMIT)) == [b"", b"x" * LIMIT]
    assert encode(b"") == b"0:,"
