"""The SASL decoders (RFC 4616 PLAIN, LOGIN, RFC 4954 responses): pure functions."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.submission.sasl import (
    BAD_BASE64,
    BAD_PLAIN,
    CANCELLED,
    Credentials,
    SaslError,
    decode_response,
    encode_challenge,
    parse_login_field,
    parse_plain,
)

field = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=60,
)


@given(authzid=st.one_of(st.just(""), field), user=field, password=field)
def test_plain_round_trip(authzid: str, user: str, password: str) -> None:
    raw = f"{authzid}\0{user}\0{password}".encode()
    line = base64.b64encode(raw).decode()
    assert parse_plain(decode_response(line)) == Credentials(user, password, authzid)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_give_a_501(data: bytes) -> None:
    line = base64.b64encode(data).decode()
    assert decode_response(line) == data
    try:
        creds = parse_plain(data)
    except SaslError as exc:
        assert exc.reply.startswith("501 5.5.2")
    else:
        assert creds.user and creds.password


@given(st.text(max_size=40))
def test_garbage_is_501_never_an_exception(text: str) -> None:
    try:
        decode_response(text)
    except SaslError as exc:
        assert exc.reply.startswith("501 ")


def test_cancel_and_empty_and_bad_base64() -> None:
    with pytest.raises(SaslError) as e:
        decode_response("*")
    assert e.value is CANCELLED and e.value.reply == "501 5.7.0 Authentication cancelled"
    assert decode_response("=") == b""  # RFC 4954 section 4: empty initial response
    with pytest.raises(SaslError) as e:
        decode_response("not base64!")
    assert e.value is BAD_BASE64 and e.value.reply.startswith("501 5.5.2")
    with pytest.raises(SaslError):
        decode_response("YWJ")  # incomplete quantum


@pytest.mark.parametrize(
    "raw",
    [b"", b"user\0pass", b"\0\0pass", b"\0user\0", b"a\0b\0c\0d", b"\0u\0\xff\xfe"],
)
def test_malformed_plain(raw: bytes) -> None:
    with pytest.raises(SaslError) as e:
        parse_plain(raw)
    assert e.value.reply.startswith("501 5.5.2")


def test_fields_over_255_octets_are_refused() -> None:
    with pytest.raises(SaslError) as e:
        parse_plain(b"\0" + b"u" * 256 + b"\0p")
    assert e.value is BAD_PLAIN


def test_login_fields_and_challenges() -> None:
    assert encode_challenge("Username:") == "VXNlcm5hbWU6"
    assert encode_challenge("Password:") == "UGFzc3dvcmQ6"
    assert parse_login_field("älice".encode()) == "älice"
    with pytest.raises(SaslError):
        parse_login_field(b"")
