"""The RFC 9989 DNS tree walk (relay.auth.treewalk) over a real lab DNS server.

Each case is a zone served by relay.lab.dnsserver and read through the relay's own
AiodnsResolver; the queries the server saw are asserted where the walk's bounds matter.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay.auth.dmarc import check_dmarc
from relay.auth.treewalk import Walker, walk_names
from relay.auth.types import DkimResult, DmarcResultCode, SpfResult, SpfResultCode
from relay.dns import AiodnsResolver
from relay.lab.dnsserver import LabDnsServer, Zone

LONG = "a.b.c.d.e.f.g.h.i.j.mail.example.com"


@pytest.fixture
def lab() -> Iterator[LabDnsServer]:
    with LabDnsServer(Zone()) as server:
        yield server


def _resolver(lab: LabDnsServer) -> AiodnsResolver:
    return AiodnsResolver([lab.address], timeout=2)


def _msg(domain: str) -> bytes:
    return f"From: x@{domain}\r\nSubject: s\r\n\r\nb\r\n".encode()


def _dmarc_queries(lab: LabDnsServer) -> list[str]:
    return [n for n, t in lab.zone.queries if t == "TXT" and n.startswith("_dmarc.")]


SPF_FAIL = SpfResult(SpfResultCode.FAIL, "evil.test", "mailfrom")


def test_walk_names_rfc_example_is_eight_queries() -> None:
    """RFC 9989 4.10 example: 13 labels -> the name, then its 7-label suffix, then one
    label less each time: 8 queries."""
    assert walk_names(LONG) == [
        LONG,
        "g.h.i.j.mail.example.com",
        "h.i.j.mail.example.com",
        "i.j.mail.example.com",
        "j.mail.example.com",
        "mail.example.com",
        "example.com",
        "com",
    ]
    assert walk_names("example.com") == ["example.com", "com"]
    assert walk_names("a.b.c.d.e.f.g") == ["a.b.c.d.e.f.g", *walk_names("b.c.d.e.f.g")]
    assert len(walk_names("a.b.c.d.e.f.g")) == 7
    assert all(len(walk_names("x." * n + "com")) <= 8 for n in range(30))


async def test_long_name_walk_is_bounded_and_np_applies(lab: LabDnsServer) -> None:
    lab.zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; np=none")
    ev = await check_dmarc(_resolver(lab), _msg(LONG), SPF_FAIL, ())
    assert ev.record_domain == "example.com" and ev.org_domain == "example.com"
    assert ev.walk == tuple(f"_dmarc.{n}" for n in walk_names(LONG))
    assert len(_dmarc_queries(lab)) == 8  # never more than RFC 9989 allows
    # the author name does not exist (NXDOMAIN): np=none, not p=reject, applies
    assert (ev.result.result, ev.result.policy, ev.author_exists) == (
        DmarcResultCode.FAIL,
        "none",
        False,
    )


async def test_np_only_for_a_non_existent_subdomain(lab: LabDnsServer) -> None:
    lab.zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none; sp=quarantine; np=reject")
    lab.zone.add("real.example.com", "A", "192.0.2.1")
    res = _resolver(lab)
    ghost = await check_dmarc(res, _msg("ghost.example.com"), SPF_FAIL, ())
    real = await check_dmarc(res, _msg("real.example.com"), SPF_FAIL, ())
    own = await check_dmarc(res, _msg("example.com"), SPF_FAIL, ())
    assert (ghost.result.policy, real.result.policy, own.result.policy) == (
        "reject",
        "quarantine",
        "none",
    )


async def test_psd_n_is_the_org_domain_even_below_another_record(lab: LabDnsServer) -> None:
    lab.zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    lab.zone.add("_dmarc.mail.example.com", "TXT", "v=DMARC1; p=quarantine; psd=n")
    w = Walker(_resolver(lab))
    assert await w.org_domain("a.b.mail.example.com") == "mail.example.com"
    assert w.asked == ["_dmarc.a.b.mail.example.com", "_dmarc.b.mail.example.com",
                       "_dmarc.mail.example.com"]  # fmt: skip
    # without psd=n, the record with the fewest labels wins
    assert await Walker(_resolver(lab)).org_domain("x.example.com") == "example.com"


async def test_psd_y_org_domain_is_one_label_below(lab: LabDnsServer) -> None:
    lab.zone.add("_dmarc.bank.example", "TXT", "v=DMARC1; p=reject; psd=y")
    res = _resolver(lab)
    assert await Walker(res).org_domain("www.giant.bank.example") == "giant.bank.example"
    # at the start of the walk, psd=y does not stop it: the PSD is its own org domain
    assert await Walker(res).org_domain("bank.example") == "bank.example"
    # policy: a customer without a record gets the PSD's policy (sp=, default p=)
    spf = SpfResult(SpfResultCode.PASS, "mega.bank.example", "mailfrom")
    ev = await check_dmarc(res, _msg("giant.bank.example"), spf, ())
    assert (ev.record_domain, ev.org_domain, ev.result.result, ev.result.policy) == (
        "bank.example",
        "giant.bank.example",
        DmarcResultCode.FAIL,
        "reject",
    )
    [a] = ev.alignments
    assert (a.aligned, a.org_domain) == (False, "mega.bank.example")


async def test_nearest_ancestor_record_is_the_policy(lab: LabDnsServer) -> None:
    """RFC 9989 4.10.1: the walk asks the intermediate names RFC 7489 skipped."""
    lab.zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none")
    lab.zone.add("_dmarc.corp.example.com", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    res = _resolver(lab)
    walk = await check_dmarc(res, _msg("hr.corp.example.com"), SPF_FAIL, ())
    psl = await check_dmarc(res, _msg("hr.corp.example.com"), SPF_FAIL, (), discovery="psl")
    assert (walk.record_domain, walk.result.policy) == ("corp.example.com", "quarantine")
    assert (psl.record_domain, psl.result.policy) == ("example.com", "none")
    assert psl.walk == ("_dmarc.hr.corp.example.com", "_dmarc.example.com")


async def test_testing_mode_over_dns(lab: LabDnsServer) -> None:
    lab.zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; t=y; pct=10")
    ev = await check_dmarc(_resolver(lab), _msg("example.com"), SPF_FAIL, ())
    assert (ev.result.policy, ev.result.record_policy, ev.testing) == (
        "quarantine",
        "reject",
        True,
    )
    assert ev.record is not None and ev.record.removed == ("pct=10",)


async def test_relaxed_dkim_alignment_by_walked_org_domain(lab: LabDnsServer) -> None:
    lab.zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    sig = DkimResult("pass", domain="mailer.example.com", selector="s")
    ev = await check_dmarc(_resolver(lab), _msg("news.example.com"), SPF_FAIL, (sig,))
    assert ev.result.result is DmarcResultCode.PASS and ev.result.aligned_dkim
    # a name that shares no label with the From domain is not walked
    other = DkimResult("pass", domain="elsewhere.net", selector="s")
    lab.zone.queries.clear()
    ev = await check_dmarc(_resolver(lab), _msg("example.com"), SPF_FAIL, (other,))
    assert ev.result.result is DmarcResultCode.FAIL
    assert not any("elsewhere" in n for n in _dmarc_queries(lab))


async def test_several_records_are_discarded_and_walk_goes_on(lab: LabDnsServer) -> None:
    lab.zone.add("_dmarc.sub.example.com", "TXT", "v=DMARC1; p=none")
    lab.zone.add("_dmarc.sub.example.com", "TXT", "v=DMARC1; p=quarantine")
    lab.zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    lab.zone.add("sub.example.com", "A", "192.0.2.1")
    ev = await check_dmarc(_resolver(lab), _msg("sub.example.com"), SPF_FAIL, ())
    assert (ev.record_domain, ev.result.policy) == ("example.com", "reject")


async def test_servfail_on_the_walk_is_temperror(lab: LabDnsServer) -> None:
    lab.zone.failures["_dmarc.example.com"] = "SERVFAIL"
    ev = await check_dmarc(_resolver(lab), _msg("a.example.com"), SPF_FAIL, ())
    assert (ev.result.result, ev.result.policy) == (DmarcResultCode.TEMPERROR, "none")


async def test_failure_above_a_found_record_counts_as_no_record(lab: LabDnsServer) -> None:
    """Our choice (RFC 9989 is silent): a TLD that SERVFAILs _dmarc queries after the
    record was found does not make the verdict temperror; before any record it does."""
    lab.zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    lab.zone.failures["_dmarc.com"] = "SERVFAIL"
    ok = SpfResult(SpfResultCode.PASS, "mail.example.com", "mailfrom")
    ev = await check_dmarc(_resolver(lab), _msg("example.com"), ok, ())
    assert (ev.result.result, ev.org_domain) == (DmarcResultCode.PASS, "example.com")
    ev = await check_dmarc(_resolver(lab), _msg("other.com"), SPF_FAIL, ())
    assert ev.result.result is DmarcResultCode.TEMPERROR
