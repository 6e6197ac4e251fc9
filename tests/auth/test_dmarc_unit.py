"""DMARC unit tests: record edge cases, t=y testing, From handling, p vs sp."""

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
    assert (rec.p, rec.sp, rec.p_implied, rec.applies) == ("none", "none", True, True)
    # dmarcbis 4.10.1: no valid p= (or an invalid sp=/np=) and no valid rua= URI: the
    # receiver applies no DMARC processing (under RFC 7489 6.6.3 step 6 likewise)
    rec = parse_record("v=DMARC1; rua=not a uri")
    assert (rec.p, rec.p_implied, rec.rua, rec.applies) == ("none", True, (), False)
    rec = parse_record("v=DMARC1; p=reject; sp=bogus")  # invalid sp, no rua: no DMARC
    assert (rec.p_implied, rec.applies, rec.ignored) == (True, False, ("sp=bogus",))
    rec = parse_record("v=DMARC1; p=reject; np=bogus; rua=mailto:r@example.com")
    assert (rec.p, rec.sp, rec.np, rec.applies) == ("none", "none", "", True)  # as p=none
    rec = parse_record("v=DMARC1; p=reject; sp=quarantine")
    assert (rec.p, rec.sp, rec.p_implied, rec.applies) == ("reject", "quarantine", False, True)
    with pytest.raises(DmarcRecordError):
        parse_record("v=DMARC2; p=reject")


def test_record_bad_optional_tags_fall_back_to_defaults() -> None:
    rec = parse_record("v=DMARC1; p=Reject; pct=150; adkim=x; aspf=S; fo=9; ri=soon; foo=bar")
    assert (rec.p, rec.adkim, rec.aspf, rec.fo) == ("reject", "r", "s", ("0",))
    assert "adkim=x" in rec.ignored and "foo=bar" in rec.ignored  # unknown tags ignored
    # RFC 9989 removed pct, rf and ri: kept aside as removed, whatever their value
    assert rec.removed == ("pct=150", "ri=soon")


def test_record_rfc9989_tags() -> None:
    rec = parse_record("v=DMARC1; p=reject; sp=quarantine; np=none; t=y; psd=n")
    assert (rec.np, rec.t, rec.psd) == ("none", True, "n")
    # an invalid np= with no rua=: no DMARC processing (dmarcbis 4.10.1); t, psd ignored
    rec = parse_record("v=DMARC1; p=reject; np=bogus; t=maybe; psd=x")
    assert (rec.np, rec.applies, rec.t, rec.psd) == ("", False, False, "u")
    assert set(rec.ignored) == {"np=bogus", "t=maybe", "psd=x"}


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


@pytest.mark.parametrize("draw", [0.0, 0.25, 0.9])
async def test_pct_is_ignored_the_full_policy_applies(draw: float) -> None:
    """RFC 9989 removed pct= (its sampling, RFC 7489 6.6.4, lowered reject to quarantine
    for a draw outside the sample): the published policy applies to every failure."""
    res = _resolver(_dmarc__example__com="v=DMARC1; p=reject; pct=25")
    ev = await check_dmarc(res, _msg("From: a@example.com"), SPF_FAIL, NO_DKIM, rng=lambda: draw)
    assert ev.result.result is DmarcResultCode.FAIL
    assert (ev.result.policy, ev.result.record_policy, ev.sampled_out) == (
        "reject",
        "reject",
        False,
    )
    assert ev.record is not None and ev.record.removed == ("pct=25",)


@pytest.mark.parametrize(
    ("published", "applied"), [("reject", "quarantine"), ("quarantine", "none"), ("none", "none")]
)
async def test_testing_mode_applies_the_policy_one_step_lower(published: str, applied: str) -> None:
    """RFC 9989 4.7, t=y: the policy is applied one step lower; a pass is untouched."""
    res = _resolver(_dmarc__example__com=f"v=DMARC1; p={published}; t=y")
    ev = await check_dmarc(res, _msg("From: a@example.com"), SPF_FAIL, NO_DKIM)
    assert (ev.result.result, ev.result.policy, ev.result.record_policy) == (
        DmarcResultCode.FAIL,
        applied,
        published,
    )
    assert ev.testing and ev.result.testing
    ok = SpfResult(SpfResultCode.PASS, "example.com", "mailfrom")
    ev = await check_dmarc(res, _msg("From: a@example.com"), ok, NO_DKIM)
    assert ev.result.result is DmarcResultCode.PASS and ev.result.policy == published


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
