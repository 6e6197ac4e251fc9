"""Route one recipient domain to its MX hosts (RFC 5321 section 5.1, RFC 7505, RFC 8461 4.1).

Owns: the MX lookup through the injected Resolver, preference order (random among equal
preferences), implicit MX (the domain's own A/AAAA) only when the domain has no MX records
(never after an MX lookup *error*), null MX (RFC 7505: fail at once with 5.1.10), the
refusal of IP-literal MX names and of MX hosts that resolve to one of our own listen
(ip, port) pairs (a mail loop, 5.4.6), the refusal of loopback and unspecified addresses
that are not ours (threats row 30; Exim's ``ignore_target_hosts = 0.0.0.0 :
127.0.0.0/8``) unless ``allow_loopback`` (the lab), and the cap on the number of MX
hosts tried.

CNAMEs (threats row 30): an MX name that is an alias is followed by the resolver for
its addresses (RFC 2181 section 10.3 forbids such MX records, but RFC 5321 section 5.1
only asks that the name resolve to addresses, and every MTA delivers to them); the host
keeps its MX name, the one SNI, the certificate check and the MTA-STS ``mx`` patterns
use (RFC 8461 sections 4.1, 4.2). A CNAME loop or an over-long chain is bounded by the
resolver and comes back as a temporary failure: the recipients are deferred (451 4.4.3,
naming the host), as Postfix does for a name-service error.
``mx_matches`` (RFC 8461 section 4.1) is relay.mtasts.policy's, re-exported here.

The result is a frozen ``Route``: either candidate hosts with their addresses, or a
``RouteFailure`` carrying the reply that every recipient of the domain gets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Collection
from dataclasses import dataclass

from relay.dns import MxRecord, Resolver, addresses
from relay.errors import DnsError, DnsNoData, DnsNotFound, DnsTempFail
from relay.mtasts.policy import mx_matches

DEFAULT_MAX_MX = 5

__all__ = ["MxHost", "Route", "RouteFailure", "mx_matches", "resolve_route"]


@dataclass(frozen=True, slots=True)
class MxHost:
    """One MX host to try, with its addresses (IPv4 first)."""

    name: str  # lower case, no trailing dot
    preference: int
    addresses: tuple[str, ...]
    implicit: bool = False  # the domain itself, used because it has no MX records


@dataclass(frozen=True, slots=True)
class RouteFailure:
    """Why a domain cannot be routed; the reply every recipient of the domain gets."""

    code: int
    enhanced: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True, slots=True)
class Route:
    domain: str
    hosts: tuple[MxHost, ...] = ()
    failure: RouteFailure | None = None
    skipped: tuple[str, ...] = ()  # "host: reason" for each MX left out (for the log)


def is_ip_literal(name: str) -> bool:
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, the unspecified addresses (a connect to 0.0.0.0 reaches this
    host) and IPv4-mapped forms of them."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_unspecified


def _norm_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip.strip("[]")))
    except ValueError:
        return ip


class LoopDetector:
    """Is (ip, port) one of our own listen addresses? A wildcard listen address
    (0.0.0.0 / ::) stands for every loopback and unspecified address of its family."""

    def __init__(self, local_addresses: Collection[tuple[str, int]], port: int) -> None:
        self.port = port
        self._exact: set[str] = set()
        self._any_v4 = False
        self._any_v6 = False
        for host, p in local_addresses:
            if p != port:
                continue
            ip = _norm_ip(host)
            if ip == "0.0.0.0":  # noqa: S104 - comparing, not binding
                self._any_v4 = True
            elif ip == "::":
                self._any_v6 = True
            else:
                self._exact.add(ip)

    def is_local(self, ip: str) -> bool:
        norm = _norm_ip(ip)
        if norm in self._exact:
            return True
        try:
            addr = ipaddress.ip_address(norm)
        except ValueError:
            return False
        if addr.version == 4 and self._any_v4:
            return addr.is_loopback or addr.is_unspecified
        if addr.version == 6 and self._any_v6:
            return addr.is_loopback or addr.is_unspecified
        return False


def order_mx(records: list[MxRecord], rng: random.Random) -> list[MxRecord]:
    """Lowest preference first; equal preferences in random order (RFC 5321 5.1)."""
    keyed = [(r.preference, rng.random(), r) for r in records]
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [r for _, _, r in keyed]


async def _host_addresses(resolver: Resolver, name: str) -> list[str] | DnsError:
    try:
        return await addresses(resolver, name)
    except DnsError as exc:
        return exc


async def resolve_route(
    resolver: Resolver,
    domain: str,
    *,
    port: int,
    local_addresses: Collection[tuple[str, int]] = (),
    max_mx: int = DEFAULT_MAX_MX,
    rng: random.Random | None = None,
    allow_loopback: bool = False,
) -> Route:
    """Find the MX hosts of ``domain`` and their addresses, or why there are none.
    ``allow_loopback``: MX addresses on loopback that are not ours may be used (the lab
    and the tests run every MTA on 127.0.0.x); otherwise they are left out."""
    rng = rng or random.Random()  # noqa: S311 - load spreading, not security
    domain = domain.rstrip(".").lower()
    loops = LoopDetector(local_addresses, port)
    skipped: list[str] = []
    implicit = False
    try:
        records = await resolver.mx(domain)
    except DnsNotFound:
        return Route(domain, failure=RouteFailure(550, "5.1.2", f"domain {domain} not found"))
    except DnsNoData:
        # RFC 5321 5.1: no MX records at all -> the domain itself is the implicit MX.
        records = [MxRecord(0, domain)]
        implicit = True
    except DnsTempFail as exc:
        return Route(
            domain,
            failure=RouteFailure(451, "4.4.3", f"MX lookup for {domain} failed: {exc.kind}"),
        )
    except DnsError as exc:
        return Route(domain, failure=RouteFailure(451, "4.4.3", f"MX lookup failed: {exc}"))

    if not implicit:
        if not records:
            records = [MxRecord(0, domain)]
            implicit = True
        elif len(records) == 1 and records[0].host in ("", "."):
            # RFC 7505 section 3: the domain accepts no mail.
            return Route(
                domain,
                failure=RouteFailure(
                    556, "5.1.10", f"recipient domain {domain} has a null MX (accepts no mail)"
                ),
            )

    chosen: list[MxRecord] = []
    seen: set[str] = set()
    literal_only = True
    for rec in order_mx(records, rng):
        host = rec.host.rstrip(".").lower()
        if host in ("", "."):
            skipped.append(f"{domain}: null MX mixed with other MX records ignored")
            continue
        if is_ip_literal(host):
            # RFC 5321 5.1: the MX name must be a domain name; IP literals are refused.
            skipped.append(f"{host}: MX names an IP literal")
            continue
        literal_only = False
        if host in seen:
            continue
        seen.add(host)
        if len(chosen) >= max_mx:
            skipped.append(f"{host}: beyond the limit of {max_mx} MX hosts")
            continue
        chosen.append(MxRecord(rec.preference, host))

    if not chosen:
        return Route(
            domain,
            failure=RouteFailure(
                550,
                "5.4.4",
                f"no usable MX host for {domain}"
                + (" (MX names an IP literal)" if literal_only else ""),
            ),
            skipped=tuple(skipped),
        )

    if len(chosen) == 1:  # one MX host (the usual case): no task to gather
        looked_up = [await _host_addresses(resolver, chosen[0].host)]
    else:
        looked_up = await asyncio.gather(*(_host_addresses(resolver, r.host) for r in chosen))
    hosts: list[MxHost] = []
    temp_fail: list[str] = []
    loopback_only = 0
    loop_pref: int | None = None
    for rec, result in zip(chosen, looked_up, strict=True):
        if isinstance(result, DnsError):
            if isinstance(result, DnsTempFail):  # SERVFAIL, timeout, a CNAME loop
                temp_fail.append(f"{rec.host}: {result.kind}" + _detail(result))
            skipped.append(f"{rec.host}: address lookup: {result.kind}" + _detail(result))
            continue
        if any(loops.is_local(ip) for ip in result):
            # Postfix: an MX that is ourselves, and every MX not better than it, would loop.
            skipped.append(f"{rec.host}: resolves to one of our own listen addresses")
            loop_pref = rec.preference if loop_pref is None else min(loop_pref, rec.preference)
            continue
        if not allow_loopback:
            # not ours, yet on this host: another local service, or a domain pointing its
            # MX at 127.0.0.1; never a place to deliver to (Exim ignore_target_hosts)
            usable = [ip for ip in result if not is_loopback(ip)]
            if len(usable) < len(result):
                skipped.append(
                    f"{rec.host}: loopback address "
                    + ", ".join(ip for ip in result if is_loopback(ip))
                    + " refused"
                )
            if not usable:
                loopback_only += 1
                continue
            result = usable
        hosts.append(MxHost(rec.host, rec.preference, tuple(result), implicit))
    if loop_pref is not None:
        kept = [h for h in hosts if h.preference < loop_pref]
        for h in hosts:
            if h.preference >= loop_pref:
                skipped.append(f"{h.name}: preference not better than a looping MX")
        hosts = kept
        if not hosts:
            return Route(
                domain,
                failure=RouteFailure(554, "5.4.6", f"mail for {domain} loops back to myself"),
                skipped=tuple(skipped),
            )
    if not hosts:
        if temp_fail:
            failure = RouteFailure(
                451,
                "4.4.3",
                f"address lookup of the MX hosts of {domain} failed ("
                + "; ".join(temp_fail)[:400]
                + ")",
            )
        elif loopback_only:
            failure = RouteFailure(
                550,
                "5.4.4",
                f"MX hosts of {domain} resolve only to loopback addresses that are not ours",
            )
        elif implicit:
            failure = RouteFailure(550, "5.1.2", f"domain {domain} has no MX and no address")
        else:
            failure = RouteFailure(550, "5.4.4", f"no MX host of {domain} has an address")
        return Route(domain, failure=failure, skipped=tuple(skipped))
    return Route(domain, hosts=tuple(hosts), skipped=tuple(skipped))


def _detail(exc: DnsError) -> str:
    return f" ({exc.detail})" if exc.detail else ""
