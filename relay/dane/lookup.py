"""The DNS side of DANE: the DNSSEC status of the MX RRset, each host's addresses and its
TLSA RRset, turned into a DaneHostPolicy per MX host (relay.dane.policy).

TLSA base name (RFC 7672 section 2.2.3, RFC 7671 section 7): when the host's address
lookup followed a secure CNAME chain, TLSA records are looked up at the expanded name
first, then at the MX host name; the reference names for DANE-TA are both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from relay.dane.policy import DaneHostPolicy, DaneInputs, DaneState, Lookup, host_policy
from relay.dns import Answer, DnssecResolver, Resolver, TlsaRecord, peek_pair
from relay.errors import DnsBogus, DnsError, DnsNoData, DnsNotFound


@dataclass(frozen=True, slots=True)
class DaneHost:
    host: str
    address_status: str  # secure | insecure | bogus | unknown
    tlsa_name: str  # where the TLSA RRset was found (or last looked for)
    records: tuple[TlsaRecord, ...]  # every record of the RRset, usable or not
    names: tuple[str, ...]  # DANE-TA reference names: the MX host, the TLSA base name
    policy: DaneHostPolicy
    tlsa_lookup: Lookup | None = None  # how the TLSA lookup ended; None: not looked up

    @property
    def state(self) -> DaneState:
        return self.policy.state

    def policy_strings(self) -> tuple[str, ...]:
        """RFC 8460 section 4.4: for policy-type tlsa, the TLSA records as text."""
        return tuple(r.text() for r in self.records)


def supports_dnssec(resolver: Resolver) -> bool:
    return callable(getattr(resolver, "answer", None))


def _status(exc_or_answer: Answer | DnsError) -> Lookup:
    if isinstance(exc_or_answer, DnsBogus):
        return Lookup.BOGUS
    if isinstance(exc_or_answer, (DnsNoData, DnsNotFound, Answer)):
        return Lookup.SECURE if exc_or_answer.status == "secure" else Lookup.INSECURE
    return Lookup.FAILED


async def mx_status(resolver: Resolver, domain: str) -> Lookup:
    """The DNSSEC status of the domain's MX RRset; a secure denial counts as secure (the
    domain itself is then the host, RFC 7672 section 2.2.1)."""
    if not supports_dnssec(resolver):
        return Lookup.INSECURE
    r = cast(DnssecResolver, resolver)
    try:
        return _status(await r.answer(domain, "MX"))
    except DnsError as exc:
        return _status(exc)


async def _answer(r: DnssecResolver, name: str, rdtype: str) -> Answer | DnsError:
    try:
        return await r.answer(name, rdtype)
    except DnsError as exc:
        return exc


async def host_dane(resolver: Resolver, host: str, mx: Lookup) -> DaneHost:
    """The DANE policy of one MX host."""
    if mx is not Lookup.SECURE or not supports_dnssec(resolver):
        pol = host_policy(DaneInputs(mx, Lookup.INSECURE, Lookup.INSECURE))
        return DaneHost(host, "insecure", "", (), (host,), pol)
    r = cast(DnssecResolver, resolver)
    a, aaaa = peek_pair(r, host) or await asyncio.gather(
        _answer(r, host, "A"), _answer(r, host, "AAAA")
    )
    got = [x for x in (a, aaaa) if isinstance(x, Answer)]
    steps = [_status(x) for x in (a, aaaa)]
    if Lookup.BOGUS in steps:
        address = Lookup.BOGUS
    elif got and all(s is Lookup.SECURE for s in steps):
        # both families answered (records or an authenticated denial), both secure
        address = Lookup.SECURE
    else:
        address = Lookup.INSECURE
    canonical = next((x.canonical for x in got if x.canonical), host)
    names = (host,) if canonical == host else (host, canonical)
    if address is not Lookup.SECURE:
        pol = host_policy(DaneInputs(mx, address, Lookup.INSECURE))
        return DaneHost(host, address.value, "", (), names, pol)
    # RFC 7671 section 7: the expanded name first (the CNAME chain is secure: the
    # address answer's AD bit covers it), then the MX host name itself
    bases = [canonical, host] if canonical != host else [host]
    tlsa: Answer | DnsError | None = None
    tlsa_name = ""
    for base in bases:
        tlsa_name = f"_25._tcp.{base}"
        tlsa = await _answer(r, tlsa_name, "TLSA")
        if not isinstance(tlsa, (DnsNoData, DnsNotFound)):
            break
    assert tlsa is not None
    if isinstance(tlsa, Answer):
        records = cast(tuple[TlsaRecord, ...], tlsa.records)
        pol = host_policy(DaneInputs(mx, address, _status(tlsa), records))
        return DaneHost(host, "secure", tlsa_name, records, names, pol, _status(tlsa))
    pol = host_policy(DaneInputs(mx, address, _status(tlsa), (), str(tlsa)))
    return DaneHost(host, "secure", tlsa_name, (), names, pol, _status(tlsa))


async def route_dane(resolver: Resolver, domain: str, hosts: Sequence[Any]) -> dict[str, DaneHost]:
    """DaneHost for each MX host (objects with ``.name``) of the domain; {} when the
    resolver gives no DNSSEC status."""
    if not supports_dnssec(resolver) or not hosts:
        return {}
    mx = await mx_status(resolver, domain)
    if mx is not Lookup.SECURE:
        pol = host_policy(DaneInputs(mx, Lookup.INSECURE, Lookup.INSECURE))
        return {h.name: DaneHost(h.name, "insecure", "", (), (h.name,), pol) for h in hosts}
    found = await asyncio.gather(*(host_dane(resolver, h.name, mx) for h in hosts))
    return {d.host: d for d in found}
