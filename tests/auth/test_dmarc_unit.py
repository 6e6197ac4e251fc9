"""DMARC unit tests: record edge cases, pct sampling, From handling, p vs sp."""

from __future__ import annotations

import pytest

from relay.auth.dmarc import (
    DmarcRecordError,
    aligned,
    author_domains,
    check_dmarc,
    parse_record,
)
from relay.auth.types import DkimResult, DmarcResultCode, SpfResult, SpfResultCode
from relay.dns import StaticResolver


def _msg(from_line: str) -> bytes:
    return f"{from_line}\r\nTo: x@example.net\r\nSubject: s\r\n\r\nhi\r\n".encode()


def _resolver(**records: str | list[str]) -> StaticResolver:
    r = StaticResolver()
    for name, value in records.items():
        r.add(name.replace("__", "."), "TXT", value if isinstance(value, list) else [value])
    return r


SPF_FAIL = SpfResult(SpfResultCode.FAIL, "evil.test", "mailfrom")
NO_DKIM: tuple[DkimResult, ...] = ()


def test_record_requires_version_first() -> None:
    with pytest.raises(DmarcRecordError):
        parse_record("p=reject; v=DMARC1")
    with pytest.raises(DmarcRecordError):
        parse_record("v=dmarc1; p=reject")  # the version value is case-sensitive


def test_record_without_p_but_with_rua_is_p_none() -> None:
    rec = parse_record("v=DMARC1; rua=mailto:r@example.com")
    assert (rec.p, rec.sp, rec.p_implied) == ("none", "none", True)
    with pytest.raises(DmarcRecordError):
        parse_record("v=DMARC1; rua=not a uri")
    with pytest.raises(DmarcRecordError):
        parse_record("v=DMARC1; p=reject; sp=bogus")  # invalid sp, no rua (6.6.3 step 6)


def test_record_bad_optional_tags_fall_back_to_defaults() -> None:
    rec = parse_record("v=DMARC1; p=Reject; pct=150; adkim=x; aspf=S; fo=9; ri=soon; foo=bar")
    assert (rec.p, rec.pct, rec.adkim, rec.aspf, rec.fo, rec.ri) == (
        "reject",
        100,
        "r",
        "s",
        ("0",),
        86400,
    )
    assert "pct=150" in rec.ignored and "adkim=x" in rec.ignored


def test_alignment_modes() -> None:
    assert aligned("mail.example.co.uk", "example.co.uk", "r")
    assert not aligned("mail.example.co.uk", "example.co.uk", "s")
    assert not aligned("other.co.uk", "example.co.uk", "r")  # public suffix is no org domain
    assert aligned("EXAMPLE.com.", "example.com", "s")


def test_author_domains() -> None:
    assert author_domains(_msg('From: "Doe, John" <j@Example.COM>')).domains == ("example.com",)
    assert author_domains(_msg("From: a@x.example, b@y.example, c@x.example")).domains == (
        "x.example",
        "y.example",
    )
    assert "no From" in author_domains(b"Subject: x\r\n\r\nbody").error
    two = b"From: a@x.example\r\nFrom: b@y.example\r\n\r\nbody"
    assert "more than one From" in author_domains(two).error
    assert "unable to extract" in author_domains(_msg("From: undisclosed")).error
    assert "unable to extract" in author_domains(_msg("From: a@bad_domain!")).error
    folded = b"From: Someone\r\n <s@fold.example>\r\n\r\nbody"
    assert author_domains(folded).domains == ("fold.example",)
    idn = "From: a@b\u00fccher.example".encode()
    assert author_domains(idn + b"\r\n\r\nx").domains == ("xn--bcher-kva.example",)


async def test_no_from_is_permerror_and_two_from_fields_too() -> None:
    res = _resolver()
    ev = await check_dmarc(res, b"Subject: x\r\n\r\nb", SPF_FAIL, NO_DKIM)
    assert ev.result.result is DmarcResultCode.PERMERROR
    ev = await check_dmarc(res, b"From: a@x.example\r\nFrom: b@y.example\r\n\r\nb", None, ())
    assert ev.result.result is DmarcResultCode.PERMERROR


@pytest.mark.parametrize(
    ("draw", "policy", "sampled_out"),
    [
        (0.0, "reject", False),
        (0.249, "reject", False),
        (0.25, "quarantine", True),
        (0.9, "quarantine", True),
    ],
)
async def test_pct_sampling_lowers_reject_to_quarantine(
    draw: float, policy: str, sampled_out: bool
) -> None:
    res = _resolver(_dmarc__example__com="v=DMARC1; p=reject; pct=25")
    ev = await check_dmarc(res, _msg("From: a@example.com"), SPF_FAIL, NO_DKIM, rng=lambda: draw)
    assert ev.result.result is DmarcResultCode.FAIL
    assert (ev.result.policy, ev.result.record_policy, ev.sampled_out) == (
        policy,
        "reject",
        sampled_out,
    )


async def test_pct_zero_never_applies_and_pass_draws_nothing() -> None:
    res = _resolver(_dmarc__example__com="v=DMARC1; p=quarantine; pct=0")

    def never() -> float:
        raise AssertionError("no draw expected")

    ev = await check_dmarc(res, _msg("From: a@example.com"), SPF_FAIL, NO_DKIM, rng=never)
    assert ev.result.policy == "none" and ev.sampled_out
    ok = SpfResult(SpfResultCode.PASS, "bounce.example.com", "mailfrom")
    res2 = _resolver(_dmarc__example__com="v=DMARC1; p=reject; pct=50")
    ev = await check_dmarc(res2, _msg("From: a@example.com"), ok, NO_DKIM, rng=never)
    assert ev.result.result is DmarcResultCode.PASS and ev.result.aligned_spf


async def test_subdomain_uses_sp_and_own_record_uses_p() -> None:
    res = _resolver(_dmarc__example__com="v=DMARC1; p=reject; sp=quarantine")
    ev = await check_dmarc(res, _msg("From: a@news.example.com"), SPF_FAIL, NO_DKIM)
    assert (ev.result.policy, ev.record_domain, ev.result.org_domain) == (
        "quarantine",
        "example.com",
        "example.com",
    )
    ev = await check_dmarc(res, _msg("From: a@example.com"), SPF_FAIL, NO_DKIM)
    assert ev.result.policy == "reject"


async def test_strict_dkim_misaligned_subdomain_signature() -> None:
    res = _resolver(_dmarc__example__com="v=DMARC1; p=reject; adkim=s")
    sig = DkimResult("pass", domain="mail.example.com", selector="s1")
    ev = await check_dmarc(res, _msg("From: a@example.com"), SPF_FAIL, (sig,))
    assert ev.result.result is DmarcResultCode.FAIL
    [dk] = [a for a in ev.alignments if a.method == "dkim"]
    assert (dk.aligned, dk.mode, dk.result) == (False, "s", "pass")


async def test_several_records_at_author_domain_means_no_policy() -> None:
    res = _resolver(_dmarc__example__com=["v=DMARC1; p=reject", "v=DMARC1; p=none"])
    ev = await check_dmarc(res, _msg("From: a@example.com"), SPF_FAIL, NO_DKIM)
    assert ev.result.result is DmarcResultCode.NONE
    assert "several" in ev.result.reason


async def test_temporary_failure_is_temperror() -> None:
    res = StaticResolver({("_dmarc.example.com", "TXT"): "SERVFAIL"})
    ev = await check_dmarc(res, _msg("From: a@example.com"), SPF_FAIL, NO_DKIM)
    assert ev.result.result is DmarcResultCode.TEMPERROR
    assert ev.result.policy == "none"
