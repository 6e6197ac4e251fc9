"""The reply builder (relay.policyserver.answer): the request, the key, and the reply
table of docs/postfix-policy.md, row by row."""

from __future__ import annotations

import pytest

from relay.dane.policy import DaneState
from relay.model import StsMode, TlsPolicy, TlsResultType
from relay.policyserver.answer import (
    MAX_REPLY,
    PolicyFacts,
    Reply,
    Request,
    Status,
    domain_of,
    match_patterns,
    parse_request,
    policy_reply,
)

ENFORCE = TlsPolicy(
    domain="example.com",
    mode=StsMode.ENFORCE,
    mx_patterns=("mx1.example.com", "*.example.net", "mx1.example.com"),
    max_age=86400,
    policy_id="a1",
)
TESTING = TlsPolicy(
    domain="example.com", mode=StsMode.TESTING, mx_patterns=("mx.example.com",), max_age=1
)
NONE = TlsPolicy(domain="example.com", mode=StsMode.NONE, max_age=1)
NO_POLICY = TlsPolicy(domain="example.com")
FETCH_FAILED = TlsPolicy(
    domain="example.com",
    policy_id="a2",
    fetch_error=TlsResultType.STS_POLICY_FETCH_ERROR,
    fetch_error_reason="503",
)
D, E, X, N = DaneState.DANE, DaneState.ENCRYPT, DaneState.DEFER, DaneState.NONE


def test_request_parsing() -> None:
    assert parse_request(b"postfix example.com", "postfix") == Request("postfix", "example.com")
    wrong = parse_request(b"other example.com", "postfix")
    assert isinstance(wrong, Reply) and wrong.status is Status.PERM
    assert "unknown map name 'other'" in wrong.data and "'postfix'" in wrong.data
    for bad, why in [
        (b"postfix", "not 'name key'"),
        (b"postfix ", "empty key"),
        (b"postfix \xff", "not UTF-8"),
    ]:
        r = parse_request(bad, "postfix")
        assert isinstance(r, Reply) and r.status is Status.PERM and why in r.data, (bad, r)


@pytest.mark.parametrize(
    "key",
    ["[mx.example.com]", "[mx.example.com]:587", "[192.0.2.1]", "example.com:2525", ".example.com"]
    + ["192.0.2.1", "2001:db8::1"],
)
def test_keys_that_are_not_an_mx_domain_are_notfound(key: str) -> None:
    r = domain_of(key)
    assert isinstance(r, Reply) and r.status is Status.NOTFOUND and r.text() == "NOTFOUND "


def test_a_domain_key_is_normalised_and_junk_is_perm() -> None:
    assert domain_of("Example.COM") == "example.com"
    assert domain_of("bücher.example") == "xn--bcher-kva.example"
    for junk in ("exa mple.com", "a..b", "-x-.com", "x" * 300):
        r = domain_of(junk)
        assert isinstance(r, Reply) and r.status is Status.PERM and "invalid domain" in r.data


def test_match_patterns_turn_wildcards_into_postfix_suffixes() -> None:
    assert match_patterns(("mx1.example.com", "*.example.net", "mx1.example.com")) == (
        "mx1.example.com:.example.net"
    )


def _reply(
    policy: TlsPolicy | None, dane: tuple[DaneState, ...] = (), unavailable: str = ""
) -> str:
    return policy_reply(PolicyFacts("example.com", policy, unavailable, dane)).text()


SECURE = "OK secure match=mx1.example.com:.example.net servername=hostname protocols=>=TLSv1.2"


@pytest.mark.parametrize(
    ("policy", "dane", "unavailable", "want"),
    [
        # MTA-STS alone
        (ENFORCE, (), "", SECURE),
        (TESTING, (), "", "NOTFOUND "),
        (NONE, (), "", "NOTFOUND "),
        (NO_POLICY, (), "", "NOTFOUND "),
        (None, (), "", "NOTFOUND "),
        (FETCH_FAILED, (), "", "NOTFOUND "),  # as delivery: opportunistic, reported
        # the cache cannot be read: fail closed
        (None, (), "database is locked", "TEMP MTA-STS policy of example.com unavailable"),
        (None, (D, D), "database is locked", "TEMP MTA-STS policy of example.com unavailable"),
        # DANE on every MX host: DANE, MTA-STS ignored (RFC 8461 section 2)
        (ENFORCE, (D, D), "", "OK dane-only"),
        (NO_POLICY, (D,), "", "OK dane-only"),
        (TESTING, (D, X), "", "OK dane-only"),
        (ENFORCE, (D, E), "", "OK dane"),
        # DANE on some hosts
        (ENFORCE, (D, N), "", SECURE),
        (TESTING, (D, N), "", "OK dane"),
        (NO_POLICY, (N, E), "", "OK dane"),
        # secure MX RRset but no TLSA anywhere: as without DANE
        (ENFORCE, (N, N), "", SECURE),
        (NO_POLICY, (N,), "", "NOTFOUND "),
    ],
)
def test_reply_table(
    policy: TlsPolicy | None, dane: tuple[DaneState, ...], unavailable: str, want: str
) -> None:
    assert _reply(policy, dane, unavailable) == want


def test_every_reply_names_its_rfc() -> None:
    for policy in (ENFORCE, TESTING, NO_POLICY):
        for dane in ((), (D,), (D, N)):
            assert policy_reply(PolicyFacts("example.com", policy, "", dane)).rfc


def test_a_reply_over_the_postfix_limit_becomes_temp() -> None:
    huge = Reply(Status.OK, "secure match=" + "a" * MAX_REPLY)
    assert huge.wire().startswith(b"TEMP ")
    assert Reply(Status.PERM, "two\r\nlines").wire() == b"PERM two lines"
