"""The DNS and HTTPS reads of `relay check`, done once, then handed to the pure checks."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from relay.auth.dmarc_record import is_dmarc_record
from relay.auth.spf import is_spf_record
from relay.auth.treewalk import Walker, WalkError
from relay.check import ERROR, Finding
from relay.check.bimi import MAX_SVG_BYTES, Logo, check_bimi, check_logo, logo_url
from relay.check.dane import check_dane
from relay.check.dkim import check_dkim
from relay.check.dmarc import check_dmarc, external_destinations
from relay.check.mtasts import check_mtasts
from relay.check.mx import check_mx
from relay.check.probe import probe_mx
from relay.check.spf import _target, _terms, host_target
from relay.check.spf import check_spf as spf_findings
from relay.check.tlsrpt import check_tlsrpt
from relay.dane.lookup import mx_status, route_dane, supports_dnssec
from relay.dane.policy import Lookup
from relay.dns import DnssecResolver, Resolver, addresses
from relay.errors import DnsBogus, DnsError, DnsNoData, DnsNotFound, DnsTempFail
from relay.http import HttpFetchError, SafeHttpClient
from relay.model import TlsResultType
from relay.mtasts.fetch import PolicyFetchError, discover, fetch_policy


class CannotCheck(Exception):
    """DNS did not answer: nothing can be said (exit 2)."""


async def _txt(resolver: Resolver, name: str) -> list[str] | None:
    try:
        return await resolver.txt(name)
    except (DnsNotFound, DnsNoData):
        return None
    except DnsTempFail as exc:
        raise CannotCheck(f"DNS lookup of {name} failed: {exc}") from None
    except DnsError:
        return None


@dataclass(frozen=True, slots=True)
class _Host:
    name: str


async def _addresses(resolver: Resolver, host: str) -> tuple[list[str], str]:
    """The A/AAAA addresses of host and its canonical name (host itself unless the name
    is a CNAME, which a resolver with ``answer`` tells)."""
    found = await addresses(resolver, host)
    answer = getattr(resolver, "answer", None)
    canonical = host
    if answer is not None:
        try:
            got = await cast(DnssecResolver, resolver).answer(host, "A")
            canonical = got.canonical or host
        except DnsError:
            pass
    return found, canonical.rstrip(".").lower()


async def _spf_tree(resolver: Resolver, domain: str) -> dict[str, list[str] | None]:
    records: dict[str, list[str] | None] = {}
    todo = [domain]
    while todo and len(records) < 40:
        name = todo.pop()
        if name in records:
            continue
        records[name] = await _txt(resolver, name)
        for t in records[name] or []:
            if not is_spf_record(t):
                continue
            for term in _terms(t):
                target = _target(term)
                if target and "%" not in target:
                    todo.append(target)
                host = host_target(term)
                if host is not None and host not in records:
                    records[host] = await _host_answer(resolver, host)
    return records


async def _host_answer(resolver: Resolver, key: str) -> list[str] | None:
    """The answer for an a:/mx:/exists: term's domain; None when void (NXDOMAIN/NODATA)."""
    kind, _, name = key.partition(":")
    try:
        if kind == "mx":
            return [r.host for r in await resolver.mx(name)]
        return await addresses(resolver, name)
    except (DnsNotFound, DnsNoData):
        return None
    except DnsError:
        return []


async def run_checks(
    resolver: Resolver,
    domain: str,
    *,
    selectors: Sequence[str] = (),
    http: SafeHttpClient | None = None,
    https_port: int = 443,
    probe: bool = True,
    smtp_port: int = 25,
    ctx: ssl.SSLContext | None = None,
) -> list[Finding]:
    out: list[Finding] = []
    bogus = ""
    try:
        mx_recs = await resolver.mx(domain)
        mx = [(r.preference, r.host) for r in mx_recs]
    except (DnsNotFound, DnsNoData):
        mx = []
    except DnsBogus as exc:  # a validating resolver refused the answer: say so, go on
        mx, bogus = [], str(exc)
    except DnsTempFail as exc:
        raise CannotCheck(f"DNS lookup of MX {domain} failed: {exc}") from None
    addresses: dict[str, list[str]] = {}
    cnames: set[str] = set()
    for _p, host in mx:
        if not host:
            continue
        try:
            addresses[host], canonical = await _addresses(resolver, host)
        except DnsError:
            addresses[host], canonical = [], host
        if canonical != host:
            cnames.add(host)
    if bogus:
        out.append(
            Finding(
                "MX",
                "mx.dnssec_bogus",
                ERROR,
                bogus,
                "fix the zone's DNSSEC signatures: validating senders cannot find your MX",
            )
        )
    else:
        out += check_mx(domain, mx, addresses, cnames)
    out += spf_findings(domain, await _spf_tree(resolver, domain))
    walker = Walker(resolver)
    try:
        found, _steps = await walker.policy(domain)
        org = await walker.org_domain(domain)
        error = ""
    except WalkError as exc:
        if exc.temporary:
            raise CannotCheck(str(exc)) from None
        found, org, error = None, domain, str(exc)
    record = found.record if found is not None else None
    authorised: dict[str, bool] = {}
    if record is not None:
        for dest in external_destinations(domain, org, record):
            txts = await _txt(resolver, f"{org}._report._dmarc.{dest}")
            authorised[dest] = any(is_dmarc_record(t) for t in txts or [])
    out += check_dmarc(
        domain, record, found.name if found else "", org, tuple(walker.asked), error, authorised
    )
    for sel in selectors:
        out += check_dkim(domain, sel, await _txt(resolver, f"{sel}._domainkey.{domain}"))
    disc = await discover(resolver, domain)
    policy, fetch_error, fetch_cert = None, "", False
    if disc.record is not None and http is not None:
        try:
            policy = await fetch_policy(http, domain, port=https_port)
        except PolicyFetchError as exc:
            fetch_error = exc.reason
            fetch_cert = exc.result_type is TlsResultType.STS_WEBPKI_INVALID
    hosts = [h for _p, h in mx if h]
    out += check_mtasts(
        domain, str(disc.status), disc.reason, policy, fetch_error, hosts, fetch_cert
    )
    out += check_tlsrpt(domain, await _txt(resolver, f"_smtp._tls.{domain}"))
    mx_lookup = await mx_status(resolver, domain)
    dane_hosts = await route_dane(resolver, domain, [_Host(h) for h in hosts])
    if not supports_dnssec(resolver):
        mx_lookup = Lookup.INSECURE
    out += check_dane(domain, mx_lookup, dane_hosts)
    bimi = await _txt(resolver, f"default._bimi.{domain}")
    out += check_bimi(domain, bimi, record)
    url = logo_url(bimi)
    if url.lower().startswith("https://") and http is not None:
        try:
            resp = await http.get(url, max_bytes=4 * MAX_SVG_BYTES, accept="image/svg+xml")
            out += check_logo(url, Logo(resp.body, resp.content_type))
        except HttpFetchError as exc:
            out += check_logo(url, Logo(error=exc.message))
    if probe and ctx is not None:
        results = await asyncio.gather(
            *(probe_mx(h, addresses[h][0], smtp_port, ctx) for h in hosts if addresses.get(h))
        )
        for r in results:
            out += r
    return out
