"""Envelope path parsing (RFC 5321 4.1.2, RFC 6531)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.address import AddressError, Mailbox, parse_mailbox, parse_params, parse_path


@pytest.mark.parametrize(
    "text, address, route, quoted",
    [
        ("<a@b.test>", "a@b.test", (), False),
        ("<A.B+tag@Example.ORG>", "A.B+tag@example.org", (), False),
        ("a@b.test", "a@b.test", (), False),
        ('<"john doe"@b.test>', '"john doe"@b.test', (), True),
        ('<"plain"@b.test>', "plain@b.test", (), True),
        ('<"a\\"q"@b.test>', '"a\\"q"@b.test', (), True),
        ("<@hop1.test,@hop2.test:x@b.test>", "x@b.test", ("hop1.test", "hop2.test"), False),
        ("<v@[192.0.2.1]>", "v@[192.0.2.1]", (), False),
        ("<v@[IPv6:2001:DB8::0:1]>", "v@[IPv6:2001:db8::1]", (), False),
        ("<jörg@bücher.example>", "jörg@bücher.example", (), False),
    ],
)
def test_parse_valid_paths(text: str, address: str, route: tuple[str, ...], quoted: bool) -> None:
    mbox, rest = parse_path(text, null_ok=False, enhanced="5.1.3")
    assert mbox is not None and rest == ""
    assert mbox.address == address
    assert mbox.route == route and mbox.quoted == quoted


@pytest.mark.parametrize(
    "text",
    [
        "<a@@b.test>",
        "<a@b.test",
        "<a@b.test>x",
        "<a@-b.test>",
        "<a@b..test>",
        "<a@b.test.>",
        "<a.@b.test>",
        "<.a@b.test>",
        "<a b@b.test>",
        "<@hop.test x@b.test>",
        "<a@[300.1.1.1]>",
        "<a@[IPv6:zz::1]>",
        "<a@[tag:general]>",
        '<"unterminated@b.test>',
        "<ab.test>",
        "<a@" + "x" * 64 + ".test>",
        "<" + "a" * 400 + "@b.test>",
        "<a\x00@b.test>",
    ],
)
def test_parse_invalid_paths(text: str) -> None:
    with pytest.raises(AddressError) as exc:
        parse_path(text, null_ok=False, enhanced="5.1.3")
    assert exc.value.reply.code == 501 and exc.value.reply.message.startswith("5.1.3 ")


def test_null_path_and_params() -> None:
    assert parse_path("<> SIZE=10 BODY=8BITMIME", null_ok=True, enhanced="5.1.7") == (
        None,
        "SIZE=10 BODY=8BITMIME",
    )
    with pytest.raises(AddressError):
        parse_path("<>", null_ok=False, enhanced="5.1.3")
    assert parse_params("size=10 SMTPUTF8 body=8BITMIME") == {
        "SIZE": "10",
        "SMTPUTF8": None,
        "BODY": "8BITMIME",
    }
    for bad in ("SIZE=", "SIZE=1 SIZE=2", "-X=1", "A=b=c"):
        with pytest.raises(AddressError):
            parse_params(bad)


def test_path_keeps_routing_visible() -> None:
    m = parse_mailbox('@a.test:"v@ext.test"@example.org')
    assert m.route == ("a.test",) and m.local == "v@ext.test" and m.quoted
    assert m.path == '@a.test:"v@ext.test"@example.org'
    assert parse_mailbox(m.path) == m
    assert Mailbox("x", "[192.0.2.1]").literal and not Mailbox("x", "a.test").literal


_local = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"),
    min_size=1,
    max_size=30,
)
_domain = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){1,3}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(_local, _domain)
def test_canonical_address_round_trips(local: str, domain: str) -> None:
    mbox = Mailbox(local=local, domain=domain)
    parsed = parse_mailbox(mbox.address)
    assert parsed.local == local and parsed.domain == domain
    assert parse_mailbox(parsed.address).address == mbox.address


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parser_only_raises_address_error(text: str) -> None:
    try:
        mbox, _ = parse_path(text, null_ok=True, enhanced="5.1.3")
    except AddressError as exc:
        assert exc.reply.code == 501
    else:
        if mbox is not None:
            assert "\r" not in mbox.address and "\n" not in mbox.address
