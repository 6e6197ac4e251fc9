"""Unit tests of the SPF evaluator: RFC 7208 section 7.4 macro examples, identities,
limits, IPv6, explanations, timeouts, and Hypothesis properties (nothing escapes)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.auth.spf import (
    MAX_DNS_TERMS,
    check_helo,
    check_host,
    check_spf,
    default_explanation,
    parse_record,
)
from relay.auth.spf_macro import (
    MacroSyntaxError,
    MacroValues,
    expand,
    ip_values,
    parse_domain_spec,
    parse_explain_string,
)
from relay.auth.types import SpfResult, SpfResultCode
from relay.dns import MxRecord, StaticResolver

NOW = 1_700_000_000.0


def _values(ip: str) -> MacroValues:
    i, v, c = ip_values(ipaddress.ip_address(ip))
    return MacroValues(
        s="strong-bad@email.example.com",
        l="strong-bad",
        o="email.example.com",
        d="email.example.com",
        i=i,
        p="unknown",
        v=v,
        h="mx.example.org",
        c=c,
        r="relay.example.net",
        t="1700000000",
    )


# RFC 7208 section 7.4, sender strong-bad@email.example.com, IPv4 192.0.2.3
RFC_EXAMPLES = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
]


@pytest.mark.parametrize(("spec", "expected"), RFC_EXAMPLES)
def test_rfc7208_macro_examples(spec: str, expected: str) -> None:
    assert expand(parse_domain_spec(spec), _values("192.0.2.3")) == expected


def test_rfc7208_macro_example_ipv6() -> None:
    got = expand(parse_domain_spec("%{ir}.%{v}._spf.%{d2}"), _values("2001:db8::cb01"))
    assert got == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    )


def test_macro_escapes_and_uppercase_url_escaping() -> None:
    values = _values("192.0.2.3")
    assert expand(parse_explain_string("%% %_ %- x"), values) == "%   %20 x"
    values = dataclasses.replace(values, l="~jack&jill=up-a_b3.c")
    assert expand(parse_explain_string("%{L}"), values) == "~jack%26jill%3Dup-a_b3.c"
    assert expand(parse_explain_string("%{c} %{r} %{t}"), values) == (
        "192.0.2.3 relay.example.net 1700000000"
    )


@pytest.mark.parametrize(
    "spec",
    ["", "%{c}.example.com", "%{r}.x.com", "%{t}.x.com", "%{d0}.x.com", "%{x}.com", "a%b.com",
     "foo", "foo.123", "example.-com", "a b.com", "%{d"],
)  # fmt: skip
def test_bad_domain_specs(spec: str) -> None:
    with pytest.raises(MacroSyntaxError):
        parse_domain_spec(spec)


def test_parse_record_is_cached_and_reports_errors() -> None:
    before = parse_record.cache_info().hits
    rec = parse_record("v=spf1 ip4:192.0.2.0/24 mx/24//64 -all")
    assert parse_record("v=spf1 ip4:192.0.2.0/24 mx/24//64 -all") is rec
    assert parse_record.cache_info().hits == before + 1
    assert not isinstance(rec, str)
    assert [m.kind for m in rec.mechanisms] == ["ip4", "mx", "all"]
    assert (rec.mechanisms[1].cidr4, rec.mechanisms[1].cidr6) == (24, 64)
    assert isinstance(parse_record("v=spf1 ip4:300.1.1.1"), str)


async def test_null_mail_from_checks_postmaster_at_helo() -> None:
    res = StaticResolver({("helo.example.com", "TXT"): "v=spf1 ip4:192.0.2.9 -all"})
    got = await check_spf(res, "192.0.2.9", "", "helo.example.com")
    assert (got.result, got.domain, got.identity) == ("pass", "helo.example.com", "helo")
    got = await check_spf(res, "192.0.2.10", "<>", "helo.example.com")
    assert got.result == "fail"
    assert got.explanation == default_explanation("helo.example.com", "192.0.2.10")


async def test_helo_identity_and_mailfrom_identity() -> None:
    res = StaticResolver(
        {
            ("helo.example.com", "TXT"): "v=spf1 a -all",
            ("helo.example.com", "A"): "192.0.2.20",
            ("example.org", "TXT"): "v=spf1 -all",
        }
    )
    helo = await check_helo(res, "192.0.2.20", "helo.example.com")
    assert (helo.result, helo.identity, helo.lookups) == ("pass", "helo", 1)
    mf = await check_spf(res, "192.0.2.20", "bob@example.org", "helo.example.com")
    assert (mf.result, mf.identity, mf.domain, mf.mechanism) == (
        "fail",
        "mailfrom",
        "example.org",
        "-all",
    )
    literal = await check_helo(res, "192.0.2.20", "[192.0.2.20]")
    assert literal.result == "none"


async def test_ipv6_and_ipv4_mapped_client() -> None:
    res = StaticResolver(
        {
            ("example.com", "TXT"): "v=spf1 ip6:2001:db8::/32 a/24 -all",
            ("example.com", "A"): "192.0.2.1",
        }
    )
    assert (await check_spf(res, "2001:db8::5", "a@example.com", "h")).result == "pass"
    assert (await check_spf(res, "2001:db9::5", "a@example.com", "h")).result == "fail"
    # ::ffff:192.0.2.77 is taken as 192.0.2.77, inside a/24
    assert (await check_spf(res, "::ffff:192.0.2.77", "a@example.com", "h")).result == "pass"


async def test_exp_with_exp_only_macros() -> None:
    res = StaticResolver(
        {
            ("example.com", "TXT"): "v=spf1 -all exp=why.%{d}",
            ("why.example.com", "TXT"): "%{c} is not %{d}'s, said %{r} at %{t}",
        }
    )
    got = await check_spf(res, "192.0.2.1", "a@example.com", "h", receiver="mx.me", now=lambda: NOW)
    assert got.explanation == "192.0.2.1 is not example.com's, said mx.me at 1700000000"


async def test_p_macro_and_ptr_validated_names() -> None:
    res = StaticResolver(
        {
            ("example.com", "TXT"): "v=spf1 ptr:example.com -all exp=e.example.com",
            ("e.example.com", "TXT"): "from %{p}",
            ("1.2.0.192.in-addr.arpa", "PTR"): ["liar.example.com", "mx.example.com"],
            ("mx.example.com", "A"): "192.0.2.1",
            ("liar.example.com", "A"): "198.51.100.1",
        }
    )
    assert (await check_spf(res, "192.0.2.1", "a@example.com", "h")).result == "pass"
    got = await check_spf(res, "192.0.2.2", "a@example.com", "h")
    assert (got.result, got.explanation) == ("fail", "from unknown")


async def test_dns_term_limit_counts_lookups() -> None:
    res = StaticResolver({("example.com", "A"): "192.0.2.1"})
    res.add("example.com", "TXT", " ".join(["v=spf1"] + ["a"] * MAX_DNS_TERMS + ["-all"]))
    got = await check_spf(res, "198.51.100.1", "a@example.com", "h")
    assert (got.result, got.lookups) == ("fail", 10)
    res.records[("example.com", "TXT")] = [" ".join(["v=spf1"] + ["a"] * 11)]
    parse_record.cache_clear()
    got = await check_spf(res, "198.51.100.1", "a@example.com", "h")
    assert got.result == "permerror"
    assert "10 DNS" in got.explanation


async def test_void_lookup_limit() -> None:
    res = StaticResolver({("example.com", "TXT"): "v=spf1 a:n1.example.com a:n2.example.com ?all"})
    assert (await check_spf(res, "192.0.2.1", "a@example.com", "h")).result == "neutral"
    res = StaticResolver(
        {("example.com", "TXT"): "v=spf1 a:n1.example.com a:n2.example.com exists:n3.example.com"}
    )
    assert (await check_spf(res, "192.0.2.1", "a@example.com", "h")).result == "permerror"


async def test_mx_over_ten_names_is_permerror_and_null_mx_never_matches() -> None:
    res = StaticResolver({("example.com", "TXT"): "v=spf1 mx -all"})
    for n in range(11):
        res.add("example.com", "MX", (n, f"mx{n}.example.com"))
        res.add(f"mx{n}.example.com", "A", "192.0.2.1")
    assert (await check_spf(res, "192.0.2.1", "a@example.com", "h")).result == "permerror"
    res = StaticResolver({("example.com", "TXT"): "v=spf1 mx ?all", ("example.com", "MX"): (0, "")})
    assert (await check_spf(res, "192.0.2.1", "a@example.com", "h")).result == "neutral"


async def test_temperror_and_include_propagation() -> None:
    res = StaticResolver(
        {
            ("example.com", "TXT"): "v=spf1 include:broken.example.com -all",
            ("broken.example.com", "TXT"): "SERVFAIL",
        }
    )
    assert (await check_spf(res, "192.0.2.1", "a@example.com", "h")).result == "temperror"


class _HangingResolver(StaticResolver):
    async def txt(self, name: str) -> list[str]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_whole_evaluation_timeout_is_temperror() -> None:
    got = await check_spf(_HangingResolver(), "192.0.2.1", "a@example.com", "h", timeout=0.05)
    assert got.result == "temperror"


async def test_bad_client_ip_is_permerror_not_exception() -> None:
    res = StaticResolver()
    got = await check_host(res, "not-an-ip", "example.com", "a@example.com", "h")
    assert got.result == "permerror"


# --- Hypothesis: whatever the record or the identities, a result and no exception -------

_TERMS = st.sampled_from(
    ["all", "-all", "~all", "?all", "+all", "a", "mx", "ptr", "a:%{d}", "mx:%{o}",
     "a/24", "a//64", "mx/0//0", "include:inc.example.com", "include:%{l}.example.com",
     "exists:%{ir}.%{v}.x.example.com", "ip4:192.0.2.0/24", "ip6:2001:db8::/32",
     "redirect=example.com", "redirect=inc.example.com", "exp=exp.example.com", "foo=bar",
     "ptr:%{p}", "exists:%{p}.%{h}", "a:%{H}.example.com", "%", "=", ":", "/", "//33",
     "ip4:", "ip6:::", "include:", "a:%{d0}", "mx:%{z}"]
)  # fmt: skip
_RECORD = st.one_of(
    st.text(max_size=80),
    st.lists(st.one_of(_TERMS, st.text(max_size=12)), max_size=12).map(
        lambda terms: " ".join(["v=spf1", *terms])
    ),
)
_NAME = st.one_of(
    st.sampled_from(["example.com", "inc.example.com", "", "[1.2.3.4]", "a..b", "x" * 70]),
    st.text(max_size=30),
)
_IP = st.one_of(st.ip_addresses().map(str), st.sampled_from(["::ffff:192.0.2.1", "bogus", ""]))


def _fuzz_resolver(record: str, other: str) -> StaticResolver:
    res = StaticResolver(
        {
            ("example.com", "TXT"): [record],
            ("example.com", "A"): "192.0.2.1",
            ("example.com", "AAAA"): "2001:db8::1",
            ("example.com", "MX"): [(0, "example.com"), (5, "")],
            ("inc.example.com", "TXT"): [other],
            ("exp.example.com", "TXT"): "%{c} %{r} %{t} %{p} %{x",
        }
    )
    res.add("1.2.0.192.in-addr.arpa", "PTR", "example.com")
    return res


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_RECORD, other=_RECORD, ip=_IP, sender=_NAME, helo=_NAME)
async def test_arbitrary_records_never_raise(
    record: str, other: str, ip: str, sender: str, helo: str
) -> None:
    res = _fuzz_resolver(record, other)
    got = await check_spf(res, ip, f"{sender}@example.com", helo, now=lambda: NOW)
    assert isinstance(got, SpfResult)
    assert got.result in set(SpfResultCode)
    assert 0 <= got.lookups <= MAX_DNS_TERMS + 1
    got = await check_spf(res, ip, sender, helo)  # arbitrary MAIL FROM and HELO domains
    assert got.result in set(SpfResultCode)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=120))
def test_parse_record_never_raises(text: str) -> None:
    parsed = parse_record("v=spf1 " + text)
    assert isinstance(parsed, str) or all(m.kind for m in parsed.mechanisms)


async def test_fuzz_zone_is_what_the_evaluator_sees() -> None:
    res = _fuzz_resolver("v=spf1", "v=spf1")
    got = await res.mx("example.com")
    assert got == [MxRecord(0, "example.com"), MxRecord(5, "")]


ODD_HELOS = [
    "bad\udcffname.example.com", "a..b.example.com", "x" * 70 + ".example.com",
    "a b.example.com", "ünï.example.com", "JUMPIN' JUPITER", "[192.0.2.1]", "nul\x00.example.com",
]  # fmt: skip


async def test_odd_helo_names_over_real_dns_never_raise() -> None:
    """Macro-expanded names that cannot go on the wire (bad labels, no IDNA form) end as
    no match."""
    from relay.dns import DnspythonResolver
    from relay.lab.dnsserver import LabDnsServer, Zone

    zone = Zone()
    zone.add("example.com", "TXT", "v=spf1 a:%{h} exists:%{h}.x.example.com -all")
    zone.add("ptr.example.com", "TXT", "v=spf1 ptr:%{h} -all")
    with LabDnsServer(zone) as server:
        res = DnspythonResolver([server.address], timeout=1.0)
        for helo in ODD_HELOS:
            for domain in ("example.com", "ptr.example.com"):
                got = await check_spf(res, "192.0.2.1", f"a@{domain}", helo)
                assert got.result == "fail", (helo, got)


async def test_address_lookups_of_mx_names_count_as_void() -> None:
    """RFC 7208 section 4.6.4: an MX name whose address lookup gives no answer is a void
    lookup; three of them exceed the limit of two (permerror)."""

    def resolver(names: int, with_address: int | None = None) -> StaticResolver:
        res = StaticResolver({("example.com", "TXT"): "v=spf1 mx ?all"})
        for n in range(names):
            res.add("example.com", "MX", (n, f"mx{n}.example.com"))
        if with_address is not None:
            res.add(f"mx{with_address}.example.com", "A", "192.0.2.1")
        return res

    parse_record.cache_clear()
    got = await check_spf(resolver(3), "192.0.2.1", "a@example.com", "h")
    assert got.result == "permerror" and "void" in got.explanation
    assert (await check_spf(resolver(2), "192.0.2.1", "a@example.com", "h")).result == "neutral"
    # in MX order, as one by one: two voids, then the match
    assert (await check_spf(resolver(3, 2), "192.0.2.1", "a@example.com", "h")).result == "pass"
    got = await check_spf(resolver(4, 3), "192.0.2.1", "a@example.com", "h")
    assert got.result == "permerror"
