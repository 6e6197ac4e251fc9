"""The DANE decision (relay/dane/policy.py) branch by branch, and the TLSA lookup's use of
DNSSEC status and secure CNAMEs (relay/dane/lookup.py, RFC 7671 section 7)."""

from __future__ import annotations

import pytest

from relay.dane.lookup import route_dane
from relay.dane.policy import (
    DaneInputs,
    DaneState,
    Lookup,
    Offer,
    after_handshake,
    host_policy,
)
from relay.dane.tlsa import DaneMatch
from relay.dns import StaticResolver, TlsaRecord

EE = TlsaRecord(3, 1, 1, b"\1" * 32)
PKIX = TlsaRecord(1, 1, 1, b"\1" * 32)
S, N, B, F = Lookup.SECURE, Lookup.INSECURE, Lookup.BOGUS, Lookup.FAILED


@pytest.mark.parametrize(
    ("mx", "addr", "tlsa", "records", "state", "rfc"),
    [
        (N, S, S, (EE,), DaneState.NONE, "RFC 7672 2.2.1"),
        (B, S, S, (EE,), DaneState.NONE, "RFC 7672 2.2.1"),
        (S, N, S, (EE,), DaneState.NONE, "RFC 7672 2.2.2"),
        (S, S, B, (), DaneState.DEFER, "RFC 7672 2.2"),
        (S, S, F, (), DaneState.DEFER, "RFC 7672 2.2"),
        (S, S, N, (EE,), DaneState.NONE, "RFC 7672 2.2"),
        (S, S, S, (), DaneState.NONE, "RFC 7672 2.2"),
        (S, S, S, (EE, PKIX), DaneState.DANE, "RFC 7672 2.2, 3.1"),
        (S, S, S, (PKIX,), DaneState.ENCRYPT, "RFC 7672 2.2, 3.1.3"),
    ],
)
def test_host_policy(
    mx: Lookup,
    addr: Lookup,
    tlsa: Lookup,
    records: tuple[TlsaRecord, ...],
    state: DaneState,
    rfc: str,
) -> None:
    pol = host_policy(DaneInputs(mx, addr, tlsa, records))
    assert pol.state is state
    assert pol.rfc.startswith(rfc)
    if state is DaneState.DANE:
        assert pol.records == (EE,)  # only the usable ones are matched


def test_after_handshake() -> None:
    dane = host_policy(DaneInputs(S, S, S, (EE,)))
    enc = host_policy(DaneInputs(S, S, S, (PKIX,)))
    for pol in (dane, enc):
        assert after_handshake(pol, Offer.NOT_OFFERED, None).result_type == "starttls-not-supported"
        assert not after_handshake(pol, Offer.FAILED, None).send
    assert after_handshake(enc, Offer.ENCRYPTED, None).send
    assert not after_handshake(dane, Offer.ENCRYPTED, None).send
    miss = DaneMatch(False, EE, 1, "no", "certificate-host-mismatch")
    assert after_handshake(dane, Offer.ENCRYPTED, miss).result_type == "certificate-host-mismatch"
    assert after_handshake(dane, Offer.ENCRYPTED, DaneMatch(True, EE, 0)).send


class _H:
    def __init__(self, name: str) -> None:
        self.name = name


async def test_tlsa_at_the_secure_cname_target_first_then_the_mx_name() -> None:
    """RFC 7671 section 7: the expanded name's TLSA first; the reference names are both."""
    res = StaticResolver(
        {
            ("d.test", "MX"): [(10, "mx.d.test")],
            ("mx.d.test", "CNAME"): ["real.hoster.test"],
            ("real.hoster.test", "A"): ["192.0.2.1"],
            ("real.hoster.test", "AAAA"): [],
            ("_25._tcp.real.hoster.test", "TLSA"): [(3, 1, 1, "01" * 32)],
            ("_25._tcp.mx.d.test", "TLSA"): [(3, 1, 1, "02" * 32)],
        },
        secure=["d.test", "mx.d.test", "real.hoster.test", "_25._tcp.real.hoster.test"],
    )
    got = (await route_dane(res, "d.test", [_H("mx.d.test")]))["mx.d.test"]
    assert got.state is DaneState.DANE
    assert got.tlsa_name == "_25._tcp.real.hoster.test"
    assert got.names == ("mx.d.test", "real.hoster.test")
    # without TLSA at the target, the MX host name's own
    del res.records[("_25._tcp.real.hoster.test", "TLSA")]
    res.secure.add("_25._tcp.mx.d.test")
    got = (await route_dane(res, "d.test", [_H("mx.d.test")]))["mx.d.test"]
    assert got.tlsa_name == "_25._tcp.mx.d.test" and got.records[0].data == b"\2" * 32


async def test_insecure_cname_means_no_dane() -> None:
    res = StaticResolver(
        {
            ("d.test", "MX"): [(10, "mx.d.test")],
            ("mx.d.test", "CNAME"): ["real.hoster.test"],
            ("real.hoster.test", "A"): ["192.0.2.1"],
            ("_25._tcp.real.hoster.test", "TLSA"): [(3, 1, 1, "01" * 32)],
        },
        secure=["d.test", "real.hoster.test", "_25._tcp.real.hoster.test"],  # not the alias
    )
    got = (await route_dane(res, "d.test", [_H("mx.d.test")]))["mx.d.test"]
    assert got.state is DaneState.NONE and got.policy.rfc == "RFC 7672 2.2.2"


async def test_resolver_without_dnssec_status_gives_no_dane() -> None:
    class Plain:
        async def mx(self, name: str) -> list[object]:
            return []

    assert await route_dane(Plain(), "d.test", [_H("mx.d.test")]) == {}  # type: ignore[arg-type]
