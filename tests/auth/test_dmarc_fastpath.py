"""relay.auth.dmarc's fast paths: the plain-From address read gives what
email.utils.getaddresses gives, author_domains what the getaddresses-only version gave,
and the remembered record parse what a fresh parse gives (errors included)."""

from __future__ import annotations

import dataclasses
import email.utils
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import dmarc
from relay.auth.dmarc import (
    _PLAIN_FROM,
    MAX_FROM_DOMAINS,
    AuthorDomains,
    DmarcRecordError,
    _addresses,
    _domain_ok,
    _parse_record,
    _worst,
    author_domains,
    check_dmarc,
    discover,
    evaluate,
    parse_record,
)
from relay.auth.results import header_fields
from relay.auth.types import DkimResult, SpfResult, SpfResultCode
from relay.dns import StaticResolver


def reference_author_domains(message: bytes) -> AuthorDomains:
    """relay.auth.dmarc.author_domains before the fast path (getaddresses only)."""
    values = [v for n, v in header_fields(message) if n.lower() == "from"]
    if not values:
        return AuthorDomains(error="the message has no From header field")
    if len(values) > 1:
        return AuthorDomains(error="the message has more than one From header field")
    text = re.sub(r"\r?\n", "", values[0]).strip()
    shown = text if len(text) <= 80 else text[:77] + "..."
    found: list[str] = []
    for _name, addr in email.utils.getaddresses([text]):
        _local, at, dom = addr.rpartition("@")
        domain = _domain_ok(dom) if at else None
        if domain is None:
            return AuthorDomains(error=f"unable to extract a From domain from: {shown}")
        if domain not in found:
            found.append(domain)
    if not found:
        return AuthorDomains(error=f"unable to extract a From domain from: {shown}")
    return AuthorDomains(tuple(found[:MAX_FROM_DOMAINS]))


def getaddresses(text: str) -> list[str]:
    return [addr for _name, addr in email.utils.getaddresses([text])]


ATOMS = ["a", "Bob", "x-y", "o'neil", "=?utf-8?q?J=C3=B6rg?=", "1", "!#$%&*+/=?^_`{|}~"]
SPECIALS = [".", "@", "<", ">", " ", "\t", '"', "(", ")", ",", ":", ";", "[", "]", "\\"]
NEAR = ATOMS + SPECIALS + ["é", "\r\n ", "..", "@@", "<>", "a@b.test", "<a@b.test>"]


def _plain(phrase: list[str], local: list[str], domain: list[str], angle: bool) -> str:
    addr = ".".join(local) + "@" + ".".join(domain)
    if not angle:
        return addr
    return (" ".join(phrase) + " " if phrase else "") + "<" + addr + ">"


atoms = st.lists(st.sampled_from(ATOMS), min_size=1, max_size=3)
plain_froms = st.builds(
    _plain, st.lists(st.sampled_from(ATOMS), max_size=3), atoms, atoms, st.booleans()
)


@settings(max_examples=200, deadline=None)
@given(plain_froms)
def test_plain_froms_take_the_fast_path_and_read_like_getaddresses(text: str) -> None:
    assert _PLAIN_FROM.fullmatch(text) is not None
    assert _addresses(text) == getaddresses(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(NEAR), max_size=14).map("".join))
def test_any_from_reads_like_getaddresses(text: str) -> None:
    assert _addresses(text) == getaddresses(text)


def _insert(text: str, piece: str, at: int) -> str:
    at %= len(text) + 1
    return text[:at] + piece + text[at:]


# a plain From with one odd piece put in somewhere: the fast path's edges
near_plain = st.builds(_insert, plain_froms, st.sampled_from(NEAR), st.integers(0, 60))


@settings(max_examples=300, deadline=None)
@given(near_plain)
def test_near_plain_froms_read_like_getaddresses(text: str) -> None:
    assert _addresses(text) == getaddresses(text)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            plain_froms, near_plain, st.lists(st.sampled_from(NEAR), max_size=10).map("".join)
        ),
        max_size=2,
    ),
    st.sampled_from(["\r\n", "\n"]),
)
def test_author_domains_match_the_getaddresses_version(froms: list[str], eol: str) -> None:
    head = "".join(f"From: {f}{eol}" for f in froms).encode("utf-8")
    message = b"Subject: s\r\n" + head + b"To: t@x.test\r\n\r\nbody\r\n"
    assert author_domains(message) == reference_author_domains(message)


def test_a_plain_from_gives_its_domain() -> None:
    message = b"From: Bench Sender <bench@Sender.Test>\r\n\r\nbody\r\n"
    assert author_domains(message) == AuthorDomains(("sender.test",))


RECORD_PARTS = ["v=DMARC1", ";", " ", "p=reject", "p=none", "sp=quarantine", "sp=x", "pct=50"]
RECORD_PARTS += ["pct=500", "rua=mailto:a@b.test", "rua=bad", "fo=1:d", "fo=z", "ri=3600"]
RECORD_PARTS += ["adkim=s", "aspf=q", "P=Reject", "p", "=", "v=DMARC2", "ruf=mailto:x@y!10m"]


def _parse_outcome(fn: object, text: str) -> object:
    try:
        return fn(text)  # type: ignore[operator]
    except DmarcRecordError as exc:
        return ("error", str(exc))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(RECORD_PARTS), max_size=10).map("".join))
def test_remembered_record_parse_matches_a_fresh_parse(text: str) -> None:
    for _ in range(2):  # the second call is served from the cache
        assert _parse_outcome(parse_record, text) == _parse_outcome(_parse_record, text)


def test_the_record_cache_is_bounded_and_keyed_by_text() -> None:
    assert dmarc._parse_cached.cache_info().maxsize == 1024
    assert parse_record("v=DMARC1; p=reject").p == "reject"
    assert parse_record("v=DMARC1; p=none").p == "none"  # a changed record is parsed anew
    # RFC 9989 4.7: an invalid p= is read as p=none (RFC 7489 6.6.3 made it no record)
    assert parse_record("v=DMARC1; p=bogus").p_implied
    with pytest.raises(DmarcRecordError, match="v=DMARC1"):
        parse_record("v=DMARC2; p=reject")
    with pytest.raises(DmarcRecordError, match="v=DMARC1"):
        parse_record("v=DMARC2; p=reject")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "B", ".", "-", "_", "é", " ", "xn--", "1", ".."]), max_size=12)
)
def test_remembered_domain_check_matches_a_fresh_check(pieces: list[str]) -> None:
    domain = "".join(pieces)
    for _ in range(2):
        assert _domain_ok(domain) == _domain_ok.__wrapped__(domain)


@pytest.mark.parametrize(
    "from_value",
    ["a@one.test", "a@one.test, b@two.test", "a@two.test, b@one.test, c@none.test", "x"],
)
async def test_check_dmarc_records_the_author_domains_as_replace_did(from_value: str) -> None:
    resolver = StaticResolver()
    resolver.add("_dmarc.one.test", "TXT", "v=DMARC1; p=reject")
    resolver.add("_dmarc.two.test", "TXT", "v=DMARC1; p=quarantine; pct=50")
    message = f"From: {from_value}\r\nSubject: s\r\n\r\nbody\r\n".encode()
    spf = SpfResult(SpfResultCode.PASS, "one.test", "mailfrom")
    dkim = (DkimResult("pass", domain="two.test", selector="s"),)
    # the PSL discovery, whose evaluation is discover + evaluate per domain (the tree walk
    # adds the identifiers' walks: tests/auth/test_dmarc_treewalk.py)
    got = await check_dmarc(resolver, message, spf, dkim, rng=lambda: 0.9, discovery="psl")
    authors = author_domains(message)
    if authors.error:
        assert got.author_domains == ()
        return
    discoveries = [await discover(resolver, d, method="psl") for d in authors.domains]
    evals = [evaluate(d, spf, dkim, rng=lambda: 0.9) for d in discoveries]
    assert got == dataclasses.replace(_worst(evals), author_domains=authors.domains)
