"""Authentication-Results (RFC 8601): our header, forged-header removal, parsing back."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth.arcfields import aar_dmarc
from relay.auth.results import (
    authserv_id_of,
    format_header,
    format_value,
    parse_value,
    resinfos,
    strip_ours,
    unfold,
)
from relay.auth.types import (
    ArcCv,
    ArcResult,
    AuthResults,
    DkimResult,
    DmarcResult,
    DmarcResultCode,
    SpfResult,
    SpfResultCode,
)
from relay.message import ParsedMessage

ID = "relay.example.net"


def _parse_header(header: str) -> object:
    name, _, value = unfold(header).partition(":")
    assert name == "Authentication-Results"
    assert value.endswith("\r\n")
    return parse_value(value[:-2])


def test_full_header_layout_and_values() -> None:
    results = AuthResults(
        SpfResult(SpfResultCode.FAIL, "example.com", "mailfrom"),
        (
            DkimResult("fail", "example.com", "s1", "AbC/de+f", reason="body hash mismatch"),
            DkimResult("pass", "lists.example.org", "k2", "zzzz1234"),
        ),
        DmarcResult(DmarcResultCode.FAIL, "example.com", "reject", "reject"),
        ArcResult(ArcCv.PASS, 2, 1, ("lists.example.org", "fwd.example.net")),
        dmarc_override="fwd.example.net",
    )
    infos = resinfos(
        results,
        mail_from="bob@example.com",
        helo="mx.example.com",
        client_ip="192.0.2.7",
        disposition="none",
    )
    value = format_value(ID, infos)
    assert value == (
        "relay.example.net; spf=fail smtp.mailfrom=bob@example.com; "
        'dkim=fail reason="body hash mismatch" header.d=example.com header.s=s1 '
        'header.b="AbC/de+f"; dkim=pass header.d=lists.example.org header.s=k2 '
        "header.b=zzzz1234; dmarc=fail (p=reject dis=none arc-sealer=fwd.example.net) "
        # policy.dmarc: the applied policy on a fail (RFC 9989's A-R registry entry)
        "header.from=example.com policy.dmarc=reject policy.override=trusted_forwarder; "
        "arc=pass (i=2 "
        "oldest-pass=1 sealers=lists.example.org,fwd.example.net) header.oldest-pass=1 "
        "smtp.remote-ip=192.0.2.7"
    )
    header = format_header(ID, infos)
    assert header.startswith("Authentication-Results: relay.example.net;\r\n\tspf=fail")
    assert all(len(line) <= 80 for line in header.split("\r\n"))
    assert header.count("Authentication-Results") == 1
    parsed = parse_value(value)
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "fail"),
        ("dkim", "fail"),
        ("dkim", "pass"),
        ("dmarc", "fail"),
        ("arc", "pass"),
    ]
    assert parsed.results[1].reason == "body hash mismatch"
    assert parsed.results[1].prop("header.b") == "AbC/de+f"
    assert parsed.results[3].prop("policy.override") == "trusted_forwarder"
    assert _parse_header(header) == parsed


def test_helo_identity_and_dkim_none() -> None:
    results = AuthResults(
        SpfResult(SpfResultCode.PASS, "mx.example.com", "helo"),
        (),
        DmarcResult(DmarcResultCode.NONE, "example.com"),
        ArcResult(ArcCv.NONE),
    )
    value = format_value(ID, resinfos(results, mail_from="", helo="mx.example.com"))
    assert value == (
        "relay.example.net; spf=pass smtp.helo=mx.example.com; dkim=none; "
        "dmarc=none header.from=example.com; arc=none"
    )
    assert format_value(ID, []) == "relay.example.net; none"
    assert parse_value("relay.example.net; none").results == ()


def test_strip_removes_only_ours() -> None:
    msg = (
        b"Authentication-Results: relay.example.net; dmarc=pass\r\n"
        b"Received: from x\r\n"
        b"authentication-results : (forged) RELAY.example.NET. 1;\r\n\tspf=pass\r\n"
        b'Authentication-Results: "relay.example.net"; dkim=pass\r\n'
        b"Authentication-Results: relay.example.net.evil; dkim=pass\r\n"
        b"Authentication-Results: mx.google.com; dmarc=pass\r\n"
        b"ARC-Authentication-Results: i=1; relay.example.net; dmarc=pass\r\n"
        b"X-Authentication-Results: relay.example.net; dmarc=pass\r\n"
        b"From: a@example.com\r\n"
        b"\r\n"
        b"Authentication-Results: relay.example.net; in the body stays\r\n"
    )
    out, removed = strip_ours(msg, "Relay.Example.Net")
    assert removed == 3
    assert out.raw == (
        b"Received: from x\r\n"
        b"Authentication-Results: relay.example.net.evil; dkim=pass\r\n"
        b"Authentication-Results: mx.google.com; dmarc=pass\r\n"
        b"ARC-Authentication-Results: i=1; relay.example.net; dmarc=pass\r\n"
        b"X-Authentication-Results: relay.example.net; dmarc=pass\r\n"
        b"From: a@example.com\r\n"
        b"\r\n"
        b"Authentication-Results: relay.example.net; in the body stays\r\n"
    )
    untouched = b"From: a@example.com\nSubject: x\n\nbody\n"
    assert strip_ours(untouched, ID) == (ParsedMessage.parse(untouched), 0)
    lf = b"Authentication-Results: relay.example.net; x=y\nFrom: a@b.example\n\nbody\n"
    stripped, removed = strip_ours(lf, ID)
    assert (stripped.raw, removed) == (b"From: a@b.example\n\nbody\n", 1)


def test_authserv_id_of() -> None:
    assert authserv_id_of(" (c (nested)) host.example 1; spf=pass") == "host.example"
    assert authserv_id_of('"quoted id"; none') == "quoted id"
    assert authserv_id_of("(unterminated") is None


def test_aar_dmarc() -> None:
    assert aar_dmarc("i=1; lists.example; dmarc=pass (p=reject) header.from=x.example") == "pass"
    assert aar_dmarc("i=2; a.example; spf=pass smtp.mailfrom=x@y.example; dmarc=fail") == "fail"
    assert aar_dmarc("i=1; a.example; spf=pass (dmarc=pass in a comment)") == ""
    assert aar_dmarc('i=1; a.example; spf=pass smtp.mailfrom="dmarc=pass"@x.example') == ""
    assert aar_dmarc("garbage (") == ""


# ---- hostile input never injects anything ----

_hostile = st.text(
    alphabet=st.sampled_from(list('abcXYZ09.-_@;=()"\\ \t\r\n\x00\x7fé/:+')),
    min_size=0,
    max_size=40,
)
_okdomain = st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){1,3}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    local=_hostile,
    mf_domain=st.one_of(_okdomain, _hostile),
    helo=_hostile,
    d=st.one_of(_okdomain, _hostile),
    selector=_hostile,
    b=_hostile,
    reason=_hostile,
    from_domain=st.one_of(_okdomain, _hostile),
    ip=_hostile,
)
def test_formatting_never_injects_and_parses_back(
    local: str,
    mf_domain: str,
    helo: str,
    d: str,
    selector: str,
    b: str,
    reason: str,
    from_domain: str,
    ip: str,
) -> None:
    results = AuthResults(
        SpfResult(SpfResultCode.SOFTFAIL, mf_domain, "mailfrom"),
        (DkimResult("fail", d, selector, b, reason=reason),),
        DmarcResult(DmarcResultCode.FAIL, from_domain, "quarantine", "quarantine"),
        ArcResult(ArcCv.FAIL, 1, 0, (d,)),
        dmarc_override=from_domain,
    )
    mail_from = f"{local}@{mf_domain}"
    infos = resinfos(
        results, mail_from=mail_from, helo=helo, client_ip=ip, disposition="quarantine"
    )
    header = format_header(ID, infos)
    body = header[:-2]
    # the only line breaks are folds (CRLF + TAB), and the field ends with one CRLF
    assert "\r" not in body.replace("\r\n\t", "") and "\n" not in body.replace("\r\n\t", "")
    assert header.endswith("\r\n") and header.isascii()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", header.replace("\r\n", ""))
    parsed = parse_value(format_value(ID, infos))
    assert _parse_header(header) == parsed
    assert [r.method for r in parsed.results] == ["spf", "dkim", "dmarc", "arc"]
    assert parsed.authserv_id == ID
    spf = parsed.results[0]
    got = spf.prop("smtp.mailfrom")
    loc, _, raw_dom = mail_from.rpartition("@")
    dom = raw_dom.strip().lower().rstrip(".")
    spf_dom = mf_domain.strip()
    assert got in ("", f"{loc}@{dom}", dom, raw_dom.strip(), spf_dom, spf_dom.lower().rstrip("."))
    for res in parsed.results:
        for _k, v in res.properties:
            assert "\r" not in v and "\n" not in v
    dk = parsed.results[1]
    if dk.prop("header.d"):
        assert dk.prop("header.d") in (d.strip().lower().rstrip("."), d.strip())
    if dk.prop("header.s"):
        assert dk.prop("header.s") == selector
