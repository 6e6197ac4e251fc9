"""DNSSEC status through real unbound: signed lab zones (dnspython signatures) behind a
validating unbound with the lab trust anchor; relay's resolver trusts its AD bit."""

from __future__ import annotations

import pytest

from relay.dns import DnspythonResolver, secure_addresses
from relay.errors import DnsBogus, DnsNoData, DnsNotFound, DnsTempFail
from relay.lab.unbound import ValidatingResolver


def _res(lab: ValidatingResolver, dnssec: str | None = None) -> DnspythonResolver:
    return DnspythonResolver([lab.address], timeout=3, dnssec=dnssec)


async def test_signed_answers_are_secure(unbound_lab: ValidatingResolver) -> None:
    res = _res(unbound_lab)
    for name, rdtype in (
        ("dane.test", "MX"),
        ("mx.dane.test", "A"),
        ("_25._tcp.mx.dane.test", "TLSA"),
    ):
        ans = await res.answer(name, rdtype)
        assert ans.status == "secure", (name, rdtype)
    tlsa = await res.tlsa("_25._tcp.mx.dane.test")
    assert [(t.usage, t.selector, t.mtype, t.data) for t in tlsa] == [(3, 1, 1, b"\xab" * 32)]


async def test_secure_cname_is_followed_and_stays_secure(unbound_lab: ValidatingResolver) -> None:
    ans = await _res(unbound_lab).answer("alias.dane.test", "A")
    assert (ans.records, ans.status, ans.canonical) == (("127.0.0.10",), "secure", "mx.dane.test")


async def test_authenticated_denials_are_secure(unbound_lab: ValidatingResolver) -> None:
    res = _res(unbound_lab)
    with pytest.raises(DnsNotFound) as nx:
        await res.answer("nothing.dane.test", "A")
    assert nx.value.status == "secure"
    with pytest.raises(DnsNoData) as nodata:
        await res.answer("mx.dane.test", "AAAA")
    assert nodata.value.status == "secure"
    addrs = await secure_addresses(res, "mx.dane.test")
    assert (addrs.addresses, addrs.status) == (("127.0.0.10",), "secure")


async def test_unsigned_zone_is_insecure(unbound_lab: ValidatingResolver) -> None:
    res = _res(unbound_lab)
    assert (await res.answer("mx.insecure.test", "A")).status == "insecure"
    assert (await res.answer("_25._tcp.mx.insecure.test", "TLSA")).status == "insecure"
    assert (await secure_addresses(res, "mx.insecure.test")).status == "insecure"


async def test_bad_signature_is_bogus_not_insecure(unbound_lab: ValidatingResolver) -> None:
    res = _res(unbound_lab)
    with pytest.raises(DnsBogus) as exc:
        await res.answer("_25._tcp.bad.dane.test", "TLSA")
    assert exc.value.status == "bogus" and "EDE" in exc.value.detail
    assert isinstance(exc.value, DnsTempFail)  # temporary for everything but DANE
    with pytest.raises(DnsBogus):
        await secure_addresses(res, "bad.dane.test")
    assert "validation failure" in unbound_lab.log_text()


async def test_ad_bit_not_trusted_when_dnssec_is_off(unbound_lab: ValidatingResolver) -> None:
    res = _res(unbound_lab, dnssec="off")
    assert (await res.answer("mx.dane.test", "A")).status == "insecure"
    with pytest.raises(DnsTempFail) as exc:  # still no answer, but not called bogus
        await res.answer("bad.dane.test", "A")
    assert not isinstance(exc.value, DnsBogus)
