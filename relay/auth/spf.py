"""SPF evaluation (RFC 7208): our own asyncio check_host() over ``relay.dns.Resolver``.

Owns record selection (4.5), record syntax (4.6, 12), every mechanism (5) and modifier
(6), macros (7, via ``spf_macro``), the processing limits (4.6.4: 10 DNS-querying terms,
2 void lookups, 10 names per mx/ptr) and the explanation (6.2). Records are parsed once
and cached; DNS answers come only from the injected resolver, never a blocking call.

Public API: ``check_spf`` (MAIL FROM identity, or postmaster@HELO for the null
reverse-path), ``check_helo`` (HELO identity) and ``check_host`` (the RFC function).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from relay.auth.spf_macro import (
    ALL_LETTERS,
    MacroSyntaxError,
    MacroValues,
    Token,
    expand,
    ip_values,
    parse_domain_spec,
    parse_explain_string,
    parse_macro_string,
    truncate_domain,
    uses_letter,
)
from relay.auth.types import SpfResult, SpfResultCode
from relay.dns import Resolver
from relay.errors import DnsError, DnsNoData, DnsNotFound, DnsTempFail

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_DNS_TERMS = 10  # 4.6.4: include, a, mx, ptr, exists, redirect
MAX_VOID_LOOKUPS = 2  # 4.6.4
MAX_NAMES = 10  # 4.6.4: address lookups per mx / ptr
DEFAULT_TIMEOUT = 20.0  # 4.6.4: at least 20 seconds for the whole evaluation

_QUALIFIERS = {
    "+": SpfResultCode.PASS,
    "-": SpfResultCode.FAIL,
    "~": SpfResultCode.SOFTFAIL,
    "?": SpfResultCode.NEUTRAL,
}
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)\Z", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z0-9]+)(.*)\Z", re.S)
_DUAL_CIDR = re.compile(r"(.*?)(?:/(0|[1-9][0-9]?))?(?://(0|[1-9][0-9]{0,2}))?\Z", re.S)
_IP4 = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3})(?:/(0|[1-9][0-9]?))?\Z")
_IP6 = re.compile(r"([0-9A-Fa-f:.]+)(?:/(0|[1-9][0-9]{0,2}))?\Z")
_VERSION = re.compile(r"v=spf1(?: |\Z)", re.I)


class SpfPermError(Exception):
    """The evaluation ends in permerror (syntax error or processing limit)."""


class SpfTempError(Exception):
    """The evaluation ends in temperror (a DNS failure that may go away)."""


@dataclass(frozen=True, slots=True)
class Mechanism:
    qualifier: SpfResultCode
    kind: str  # all | include | a | mx | ptr | ip4 | ip6 | exists
    domain: tuple[Token, ...] | None  # parsed domain-spec; None means <domain>
    network: IPNetwork | None  # ip4 / ip6
    cidr4: int
    cidr6: int
    text: str  # the term as written


@dataclass(frozen=True, slots=True)
class SpfRecord:
    mechanisms: tuple[Mechanism, ...]
    redirect: tuple[Token, ...] | None
    exp: tuple[Token, ...] | None
    redirect_text: str = ""


def _cidr(value: str | None, default: int, limit: int) -> int:
    if value is None:
        return default
    n = int(value)
    if n > limit:
        raise SpfPermError(f"CIDR length /{n} is out of range")
    return n


def _domain_spec(text: str) -> tuple[Token, ...]:
    try:
        return parse_domain_spec(text)
    except MacroSyntaxError as exc:
        raise SpfPermError(str(exc)) from None


def _parse_mechanism(term: str) -> Mechanism:
    m = _MECHANISM.match(term)
    if m is None:
        raise SpfPermError(f"unknown term {term!r}")
    qualifier = _QUALIFIERS.get(m.group(1) or "+", SpfResultCode.PASS)
    kind = m.group(2).lower()
    rest = m.group(3)
    domain: tuple[Token, ...] | None = None
    network: IPNetwork | None = None
    cidr4, cidr6 = 32, 128
    if kind == "all":
        if rest:
            raise SpfPermError(f"bad term {term!r}")
    elif kind in ("include", "exists"):
        if not rest.startswith(":"):
            raise SpfPermError(f"{kind} needs a domain: {term!r}")
        domain = _domain_spec(rest[1:])
    elif kind == "ptr":
        if rest:
            if not rest.startswith(":"):
                raise SpfPermError(f"bad term {term!r}")
            domain = _domain_spec(rest[1:])
    elif kind in ("a", "mx"):
        c = _DUAL_CIDR.match(rest)
        assert c is not None  # the pattern matches any string
        head = c.group(1)
        cidr4 = _cidr(c.group(2), 32, 32)
        cidr6 = _cidr(c.group(3), 128, 128)
        if head:
            if not head.startswith(":"):
                raise SpfPermError(f"bad term {term!r}")
            domain = _domain_spec(head[1:])
    elif kind == "ip4":
        n = _IP4.match(rest[1:]) if rest.startswith(":") else None
        if n is None:
            raise SpfPermError(f"bad ip4 term {term!r}")
        try:
            addr4 = ipaddress.IPv4Address(n.group(1))
        except ValueError:
            raise SpfPermError(f"bad ip4 address in {term!r}") from None
        network = ipaddress.IPv4Network((addr4, _cidr(n.group(2), 32, 32)), strict=False)
    elif kind == "ip6":
        n = _IP6.match(rest[1:]) if rest.startswith(":") else None
        if n is None:
            raise SpfPermError(f"bad ip6 term {term!r}")
        try:
            addr6 = ipaddress.IPv6Address(n.group(1))
        except ValueError:
            raise SpfPermError(f"bad ip6 address in {term!r}") from None
        network = ipaddress.IPv6Network((addr6, _cidr(n.group(2), 128, 128)), strict=False)
    else:
        raise SpfPermError(f"unknown mechanism {term!r}")
    return Mechanism(qualifier, kind, domain, network, cidr4, cidr6, term)


def _parse_record(text: str) -> SpfRecord:
    """Parse a whole record (which starts with v=spf1). Raises SpfPermError."""
    mechanisms: list[Mechanism] = []
    redirect: tuple[Token, ...] | None = None
    redirect_text = ""
    exp: tuple[Token, ...] | None = None
    for term in text.split(" ")[1:]:
        if not term:
            continue
        mod = _MODIFIER.match(term)
        if mod is not None:
            name, value = mod.group(1).lower(), mod.group(2)
            if name == "redirect":
                if redirect is not None:
                    raise SpfPermError("redirect= given twice")
                redirect, redirect_text = _domain_spec(value), term
            elif name == "exp":
                if exp is not None:
                    raise SpfPermError("exp= given twice")
                exp = _domain_spec(value)
            else:
                try:
                    parse_macro_string(value, ALL_LETTERS)
                except MacroSyntaxError as exc:
                    raise SpfPermError(f"modifier {name}: {exc}") from None
            continue
        mechanisms.append(_parse_mechanism(term))
    return SpfRecord(tuple(mechanisms), redirect, exp, redirect_text)


@functools.lru_cache(maxsize=2048)
def parse_record(text: str) -> SpfRecord | str:
    """The parsed record, or the reason it is a permerror (cached: records repeat)."""
    try:
        return _parse_record(text)
    except SpfPermError as exc:
        return str(exc) or "syntax error"


def is_spf_record(text: str) -> bool:
    return _VERSION.match(text) is not None


def _queryable(name: str) -> bool:
    """Labels of 1..63 characters, 253 in all, and text that can be encoded (a HELO read
    with surrogateescape must not reach the resolver's IDNA step)."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253 or not all(0 < len(x) <= 63 for x in name.split(".")):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_domain(name: str) -> bool:
    """A <domain> check_host() accepts (4.3): queryable, two labels or more, not a
    domain literal."""
    return _queryable(name) and "." in name.rstrip(".") and not name.startswith("[")


@dataclass(frozen=True, slots=True)
class _Outcome:
    code: SpfResultCode
    mechanism: str = ""
    explanation: str = ""


T = TypeVar("T")


class _Evaluation:
    """The state of one top-level evaluation: counters shared across include/redirect."""

    def __init__(
        self,
        resolver: Resolver,
        ip: IPAddress,
        sender: str,
        helo: str,
        receiver: str,
        now: Callable[[], float],
    ) -> None:
        self.resolver = resolver
        self.ip = ip
        self.sender = sender
        self.helo = helo
        self.receiver = receiver
        self.timestamp = str(int(now()))
        self.dns_terms = 0
        self.voids = 0
        self._values: MacroValues | None = None  # built when a macro is first expanded
        self._ptr: list[str] | DnsError | None = None
        self._validated: list[str] | None = None

    # -- DNS helpers ------------------------------------------------------------------
    def count_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise SpfPermError(f"more than {MAX_DNS_TERMS} DNS-querying terms")

    def void(self) -> None:
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise SpfPermError(f"more than {MAX_VOID_LOOKUPS} void lookups")

    async def query(self, fn: Callable[[str], Awaitable[list[T]]], name: str) -> list[T]:
        """Records of a mechanism's main query: [] (counted void) on NXDOMAIN / no data or
        an unqueryable name; SpfTempError on a temporary failure."""
        if not _queryable(name):
            self.void()
            return []
        try:
            result = await fn(name)
        except (DnsNotFound, DnsNoData):
            self.void()
            return []
        except DnsTempFail as exc:
            raise SpfTempError(str(exc)) from None
        if not result:
            self.void()
        return result

    async def addresses(self, name: str) -> list[IPAddress]:
        """Addresses of name in the client's family; [] for no answer, temp errors raise."""
        if not _queryable(name):
            return []
        fn = self.resolver.a if self.ip.version == 4 else self.resolver.aaaa
        try:
            found = await fn(name)
        except (DnsNotFound, DnsNoData):
            return []
        except DnsTempFail as exc:
            raise SpfTempError(str(exc)) from None
        return _parse_ips(found)

    # -- macros -----------------------------------------------------------------------
    async def ptr_names(self) -> list[str] | DnsError:
        """The client's PTR names (first 10, 4.6.4), or the DNS error; asked once."""
        if self._ptr is None:
            try:
                self._ptr = (await self.resolver.ptr(str(self.ip)))[:MAX_NAMES]
            except DnsError as exc:
                self._ptr = exc
        return self._ptr

    async def validated_names(self) -> list[str]:
        """PTR names whose forward lookup gives the client back (5.5); a DNS error on a
        name skips that name."""
        if self._validated is None:
            names = await self.ptr_names()
            if isinstance(names, DnsError):
                names = []
            results = await asyncio.gather(
                *(self.addresses(n) for n in names), return_exceptions=True
            )
            self._validated = [
                n
                for n, r in zip(names, results, strict=True)
                if isinstance(r, list) and self.ip in r
            ]
        return self._validated

    @property
    def values(self) -> MacroValues:
        """The macro values of this evaluation (section 7.2), ``d`` left empty."""
        if self._values is None:
            local, _, sdomain = self.sender.rpartition("@")
            i, v, c = ip_values(self.ip)
            self._values = MacroValues(
                s=self.sender,
                l=local or "postmaster",
                o=sdomain,
                d="",
                i=i,
                p="",
                v=v,
                h=self.helo,
                c=c,
                r=self.receiver,
                t=self.timestamp,
            )
        return self._values

    async def expand(self, tokens: tuple[Token, ...], domain: str) -> str:
        values = dataclasses.replace(self.values, d=domain)
        if uses_letter(tokens, "p"):
            values = dataclasses.replace(values, p=await self.p_value(domain))
        return expand(tokens, values)

    async def expand_domain(self, tokens: tuple[Token, ...], domain: str) -> str:
        return truncate_domain(await self.expand(tokens, domain))

    async def p_value(self, domain: str) -> str:
        names = await self.validated_names()
        if not names:
            return "unknown"
        d = domain.lower().rstrip(".")
        for n in names:
            if n == d:
                return n
        for n in names:
            if n.endswith("." + d):
                return n
        return names[0]

    # -- check_host ---------------------------------------------------------------------
    async def record(self, domain: str) -> SpfRecord | None:
        """The SPF record of domain (4.4, 4.5): None when there is none."""
        try:
            txts = await self.resolver.txt(domain)
        except (DnsNotFound, DnsNoData):
            return None
        except DnsTempFail as exc:
            raise SpfTempError(str(exc)) from None
        spf = [t for t in txts if is_spf_record(t)]
        if not spf:
            return None
        if len(spf) > 1:
            raise SpfPermError(f"{len(spf)} SPF records at {domain}")
        if not spf[0].isascii():
            raise SpfPermError("non-ASCII characters in the SPF record")
        parsed = parse_record(spf[0])
        if isinstance(parsed, str):
            raise SpfPermError(parsed)
        return parsed

    async def check_host(self, domain: str, want_exp: bool) -> _Outcome:
        if not valid_domain(domain):
            return _Outcome(SpfResultCode.NONE, explanation=f"{domain!r} is not a domain name")
        try:
            record = await self.record(domain)
        except SpfTempError as exc:
            return _Outcome(SpfResultCode.TEMPERROR, explanation=str(exc))
        except SpfPermError as exc:
            return _Outcome(SpfResultCode.PERMERROR, explanation=str(exc))
        if record is None:
            return _Outcome(SpfResultCode.NONE, explanation=f"no SPF record at {domain}")
        try:
            return await self.evaluate(record, domain, want_exp)
        except SpfTempError as exc:
            return _Outcome(SpfResultCode.TEMPERROR, explanation=str(exc))
        except SpfPermError as exc:
            return _Outcome(SpfResultCode.PERMERROR, explanation=str(exc))

    async def evaluate(self, record: SpfRecord, domain: str, want_exp: bool) -> _Outcome:
        for mech in record.mechanisms:
            if await self.matches(mech, domain):
                explanation = ""
                if mech.qualifier is SpfResultCode.FAIL and want_exp:
                    explanation = await self.explanation(record, domain)
                return _Outcome(mech.qualifier, mech.text, explanation)
        if record.redirect is not None:
            self.count_term()
            target = await self.expand_domain(record.redirect, domain)
            outcome = await self.check_host(target, want_exp)
            if outcome.code is SpfResultCode.NONE:
                raise SpfPermError(f"redirect to {target}: no SPF record")
            return outcome
        return _Outcome(SpfResultCode.NEUTRAL, explanation="no mechanism matched")

    async def matches(self, mech: Mechanism, domain: str) -> bool:
        kind = mech.kind
        if kind == "all":
            return True
        if kind in ("ip4", "ip6"):
            assert mech.network is not None
            return self.ip.version == mech.network.version and self.ip in mech.network
        self.count_term()
        target = domain if mech.domain is None else await self.expand_domain(mech.domain, domain)
        if kind == "include":
            outcome = await self.check_host(target, want_exp=False)
            if outcome.code is SpfResultCode.PASS:
                return True
            if outcome.code is SpfResultCode.TEMPERROR:
                raise SpfTempError(outcome.explanation)
            if outcome.code is SpfResultCode.PERMERROR:
                raise SpfPermError(outcome.explanation)
            if outcome.code is SpfResultCode.NONE:
                raise SpfPermError(f"include:{target}: no SPF record")
            return False
        if kind == "exists":
            return bool(await self.query(self.resolver.a, target))
        if kind == "a":
            fn = self.resolver.a if self.ip.version == 4 else self.resolver.aaaa
            return self._in_any(_parse_ips(await self.query(fn, target)), mech)
        if kind == "mx":
            mxs = await self.query(self.resolver.mx, target)
            hosts = [m.host for m in sorted(mxs, key=lambda m: m.preference) if m.host]
            if len(hosts) > MAX_NAMES:
                raise SpfPermError(f"mx:{target} has more than {MAX_NAMES} MX names")
            found = await asyncio.gather(
                *(self.addresses(h) for h in hosts), return_exceptions=True
            )
            for ips in found:  # in MX order, as a one-by-one evaluation would see them
                if isinstance(ips, BaseException):
                    raise ips
                if not ips:
                    # 4.6.4: an address lookup of an MX name that gives no answer (NXDOMAIN
                    # or no records) is a void lookup and counts toward the limit of 2
                    self.void()
                if self._in_any(ips, mech):
                    return True
            return False
        if kind == "ptr":
            names = await self.ptr_names()
            if isinstance(names, DnsTempFail):
                return False  # 5.5: a DNS error on the PTR lookup means no match
            if isinstance(names, DnsError) or not names:
                self.void()
                return False
            t = target.lower().rstrip(".")
            return any(n == t or n.endswith("." + t) for n in await self.validated_names())
        raise SpfPermError(f"unknown mechanism {kind}")  # pragma: no cover - parser rejects

    def _in_any(self, ips: list[IPAddress], mech: Mechanism) -> bool:
        prefix = mech.cidr4 if self.ip.version == 4 else mech.cidr6
        for addr in ips:
            if addr.version != self.ip.version:
                continue
            net = ipaddress.ip_network((addr, prefix), strict=False)
            if self.ip in net:
                return True
        return False

    async def explanation(self, record: SpfRecord, domain: str) -> str:
        """The exp= text (6.2), or "" when there is none or it cannot be used."""
        if record.exp is None:
            return ""
        try:
            name = await self.expand_domain(record.exp, domain)
            if not _queryable(name):
                return ""
            txts = await self.resolver.txt(name)
        except (DnsError, SpfTempError, SpfPermError):
            return ""
        if len(txts) != 1 or not txts[0].isascii():
            return ""
        try:
            tokens = parse_explain_string(txts[0])
        except MacroSyntaxError:
            return ""
        try:
            return await self.expand(tokens, domain)
        except (SpfTempError, SpfPermError):
            return ""


def _parse_ips(values: list[str]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for v in values:
        try:
            out.append(ipaddress.ip_address(v))
        except ValueError:
            continue
    return out


@functools.lru_cache(maxsize=1024)
def client_address(ip: str) -> IPAddress:
    """The client address, an IPv4-mapped IPv6 address taken as IPv4 (section 5);
    remembered (a client sends many messages; addresses are immutable)."""
    addr = ipaddress.ip_address(ip.strip().strip("[]"))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def default_explanation(domain: str, ip: str) -> str:
    """The explanation given on fail when the domain publishes no usable exp=."""
    return f"{domain} does not designate {ip} as a permitted sender"


async def check_host(
    resolver: Resolver,
    ip: str,
    domain: str,
    sender: str,
    helo: str,
    *,
    identity: str = "mailfrom",
    receiver: str = "relay.example.net",
    now: Callable[[], float] = time.time,
    timeout: float = DEFAULT_TIMEOUT,
) -> SpfResult:
    """RFC 7208 check_host(<ip>, <domain>, <sender>); never raises for bad input or DNS."""
    try:
        addr = client_address(ip)
    except ValueError:
        return SpfResult(SpfResultCode.PERMERROR, domain, identity, f"bad client IP {ip!r}")
    ev = _Evaluation(resolver, addr, sender, helo, receiver, now)
    try:
        async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
            outcome = await ev.check_host(domain, want_exp=True)
    except TimeoutError:
        outcome = _Outcome(SpfResultCode.TEMPERROR, explanation="SPF evaluation timed out")
    explanation = outcome.explanation
    if outcome.code is SpfResultCode.FAIL and not explanation:
        explanation = default_explanation(domain, str(addr))
    return SpfResult(outcome.code, domain, identity, explanation, outcome.mechanism, ev.dns_terms)


def _split_sender(mail_from: str, helo: str) -> tuple[str, str]:
    """(sender, domain) per 4.3 and 2.4: null reverse-path -> postmaster@helo."""
    addr = mail_from.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    if not addr:
        return f"postmaster@{helo}", helo
    local, at, domain = addr.rpartition("@")
    if not at:
        return f"postmaster@{addr}", addr
    return f"{local or 'postmaster'}@{domain}", domain


async def check_spf(
    resolver: Resolver,
    ip: str,
    mail_from: str,
    helo: str,
    *,
    receiver: str = "relay.example.net",
    now: Callable[[], float] = time.time,
    timeout: float = DEFAULT_TIMEOUT,
) -> SpfResult:
    """SPF for the MAIL FROM identity; with a null reverse-path, postmaster@HELO (2.4),
    reported with identity "helo"."""
    sender, domain = _split_sender(mail_from, helo)
    identity = "mailfrom" if mail_from.strip().strip("<>") else "helo"
    return await check_host(
        resolver,
        ip,
        domain,
        sender,
        helo,
        identity=identity,
        receiver=receiver,
        now=now,
        timeout=timeout,
    )


async def check_helo(
    resolver: Resolver,
    ip: str,
    helo: str,
    *,
    receiver: str = "relay.example.net",
    now: Callable[[], float] = time.time,
    timeout: float = DEFAULT_TIMEOUT,
) -> SpfResult:
    """SPF for the HELO identity (2.3): check_host(ip, helo, postmaster@helo)."""
    return await check_host(
        resolver,
        ip,
        helo,
        f"postmaster@{helo}",
        helo,
        identity="helo",
        receiver=receiver,
        now=now,
        timeout=timeout,
    )
