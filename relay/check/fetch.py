"""The DNS and HTTPS reads of `relay check`, done once, then handed to the pure checks."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

from relay.auth.dmarc_record import is_dmarc_record
from relay.auth.spf import is_spf_record
from relay.auth.treewalk import Walker, WalkError
from relay.check import Finding
from relay.check.bimi import check_bimi
from relay.check.dane import check_dane
from relay.check.dkim import check_dkim
from relay.check.dmarc import check_dmarc, external_destinations
from relay.check.mtasts import check_mtasts
from relay.check.mx import check_mx
from relay.check.probe import probe_mx
from relay.check.spf import _target, _terms
from relay.check.spf import check_spf as spf_findings
from relay.check.tlsrpt import check_tlsrpt
from relay.dns import Resolver
from relay.errors import DnsError, DnsNoData, DnsNotFound, DnsTempFail
from relay.http import SafeHttpClient
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


async def _spf_tree(resolver: Resolver, domain: str) -> dict[str, list[str] | None]:
    records: dict[str, list[str] | None] = {}
    todo = [domain]
    while todo and len(records) < 40:
        name = todo.pop()
        if name in records:
            continue
        records[name] = await _txt(resolver, name)
        for t in records[name] or []:
            if is_spf_record(t):
                todo.extend(x for term in _terms(t) if (x := _target(term)))
    return records


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
    try:
        mx_recs = await resolver.mx(domain)
        mx = [(r.preference, r.host) for r in mx_recs]
    except (DnsNotFound, DnsNoData):
        mx = []
    except DnsTempFail as exc:
        raise CannotCheck(f"DNS lookup of MX {domain} failed: {exc}") from None
    addresses: dict[str, list[str]] = {}
    for _p, host in mx:
        if not host:
            continue
        try:
            addresses[host] = await resolver.a(host)
        except DnsError:
            addresses[host] = []
    out += check_mx(domain, mx, addresses, set())
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
    policy, fetch_error = None, ""
    if disc.record is not None and http is not None:
        try:
            policy = await fetch_policy(http, domain, port=https_port)
        except PolicyFetchError as exc:
            fetch_error = exc.reason
    hosts = [h for _p, h in mx if h]
    out += check_mtasts(domain, str(disc.status), disc.reason, policy, fetch_error, hosts)
    out += check_tlsrpt(domain, await _txt(resolver, f"_smtp._tls.{domain}"))
    out += check_dane()
    out += check_bimi(domain, await _txt(resolver, f"default._bimi.{domain}"), record)
    if probe and ctx is not None:
        results = await asyncio.gather(
            *(probe_mx(h, addresses[h][0], smtp_port, ctx) for h in hosts if addresses.get(h))
        )
        for r in results:
            out += r
    return out
