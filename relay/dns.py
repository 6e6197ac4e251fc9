"""DNS for everything in relay: a Resolver protocol and its dnspython implementation.

Results are typed; failures are split into NXDOMAIN (DnsNotFound), no records of the
type (DnsNoData) and temporary failure (DnsTempFail: SERVFAIL, timeout, refused), since
mail routing treats each differently (RFC 5321 section 5.1). dkimpy and every other
consumer get names resolved only through this module, never through their own resolver.

Every answer (``Resolver.answer``) and every negative answer carries its DNSSEC status.
The relay does not validate DNSSEC itself: like Postfix (``smtp_dns_support_level =
dnssec``) it trusts the AD bit (RFC 4035 section 3.2.3, RFC 6840 section 5.7) of a
validating resolver the operator trusts (``[dns] dnssec = "trust-ad"``). A SERVFAIL
that the resolver says is a validation failure (an RFC 8914 extended error, or an
answer that only comes with the CD bit set) is *bogus* (DnsBogus); any other SERVFAIL
is temporary. Neither is ever "insecure".
"""

from __future__ import annotations

import asyncio
import encodings.idna
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol, TypeVar, cast

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from relay import metrics
from relay.errors import DnsBogus, DnsError, DnsNoData, DnsNotFound, DnsTempFail

DnssecStatus = Literal["secure", "insecure", "bogus"]
DNSSEC_MODES = ("off", "trust-ad")


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    host: str  # lower case, no trailing dot; "" for the null MX "."


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 section 2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True, slots=True)
class Answer:
    """A positive answer: the records (typed as the method of that type gives them),
    the smallest TTL of the RRsets used, the DNSSEC status of the whole answer (the AD
    bit covers the CNAME chain too) and the name the records are owned by after CNAMEs."""

    name: str
    rdtype: str
    records: tuple[Any, ...]
    ttl: int
    status: DnssecStatus
    canonical: str


class Resolver(Protocol):
    """What relay needs from DNS. Each method raises a DnsError subclass on failure."""

    async def mx(self, name: str) -> list[MxRecord]: ...

    async def txt(self, name: str) -> list[str]:
        """TXT records of name, each record's strings joined without spaces."""
        ...

    async def a(self, name: str) -> list[str]: ...

    async def aaaa(self, name: str) -> list[str]: ...

    async def ptr(self, ip: str) -> list[str]: ...


class DnssecResolver(Resolver, Protocol):
    """A Resolver whose answers carry their DNSSEC status (DANE needs it)."""

    async def answer(self, name: str, rdtype: str) -> Answer:
        """The answer for (name, rdtype); rdtype is MX, TXT, A, AAAA, PTR (name is then
        an IP address) or TLSA. Negative answers raise, with ``.status`` set."""
        ...


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


_R = TypeVar("_R")


def _families(results: Sequence[_R | BaseException]) -> tuple[list[_R], list[DnsError]]:
    """The A and AAAA lookups (gathered with ``return_exceptions``) split into answers
    and DNS errors, in order; any other exception is raised."""
    answers: list[_R] = []
    errors: list[DnsError] = []
    for r in results:
        if isinstance(r, BaseException):
            if not isinstance(r, DnsError):
                raise r
            errors.append(r)
        else:
            answers.append(r)
    return answers, errors


def _no_address(name: str, errors: Sequence[DnsError]) -> NoReturn:
    """Neither family gave an address: a temporary failure of either is raised first,
    then an NXDOMAIN, else NoData."""
    for e in errors:
        if isinstance(e, DnsTempFail):
            raise e
    for e in errors:
        if isinstance(e, DnsNotFound):
            raise e
    raise DnsNoData(name, "A/AAAA")


def peek_pair(resolver: object, name: str) -> tuple[Answer | DnsError, Answer | DnsError] | None:
    """The cached A and AAAA answers (or cached errors) of name when the resolver caches
    both and both are fresh, else None: the usual case, routing the hundredth message to
    a domain, then costs no lookup tasks."""
    peek = getattr(resolver, "cached", None)
    if peek is None:
        return None
    a, aaaa = peek(name, "A"), peek(name, "AAAA")
    return None if a is None or aaaa is None else (a, aaaa)


async def addresses(resolver: Resolver, name: str) -> list[str]:
    """A and AAAA addresses of name (IPv4 first). NoData when neither exists; an
    NXDOMAIN is raised as such; a temporary failure of one family is raised only when
    the other gave nothing."""
    hit = peek_pair(resolver, name)
    results: Sequence[list[str] | BaseException]
    if hit is not None:
        results = [h if isinstance(h, DnsError) else list(h.records) for h in hit]
    else:
        results = await asyncio.gather(
            resolver.a(name), resolver.aaaa(name), return_exceptions=True
        )
    answers, errors = _families(results)
    out = [a for r in answers for a in r]
    if out:
        return out
    _no_address(name, errors)


@dataclass(frozen=True, slots=True)
class AddressAnswer:
    """A and AAAA of a host with the DNSSEC status of the pair: secure only when every
    family that answered (positively or with an authenticated denial) is secure."""

    addresses: tuple[str, ...]
    status: DnssecStatus


async def secure_addresses(resolver: DnssecResolver, name: str) -> AddressAnswer:
    """``addresses`` with DNSSEC status (RFC 7672 section 2.2.2: the address records
    of an MX host must be secure for DANE to apply)."""
    hit = peek_pair(resolver, name)
    results: Sequence[Answer | BaseException] = hit or await asyncio.gather(
        resolver.answer(name, "A"), resolver.answer(name, "AAAA"), return_exceptions=True
    )
    answers, errors = _families(results)
    out = [a for r in answers for a in cast(tuple[str, ...], r.records)]
    if not out:
        _no_address(name, errors)
    # an authenticated denial of one family counts towards the pair's status
    statuses = [r.status for r in answers] + [
        e.status for e in errors if isinstance(e, (DnsNoData, DnsNotFound))
    ]
    if any(isinstance(e, DnsBogus) for e in errors):
        status: DnssecStatus = "bogus"
    elif errors and any(isinstance(e, DnsTempFail) for e in errors):
        status = "insecure"  # one family unknown: not provably secure
    else:
        status = "secure" if all(s == "secure" for s in statuses) else "insecure"
    return AddressAnswer(tuple(out), status)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def effective_dnssec(mode: str | None, trusted: bool, hosts: Sequence[str]) -> str:
    """The DNSSEC mode actually used: the AD bit is trusted only from nameservers on
    loopback or ones the operator marked ``dnssec_trusted`` (RFC 6698 section 1.3 /
    RFC 7672 section 2.1: the path to a remote validating resolver is not secure).
    Unset mode: "trust-ad" when every nameserver is on loopback, else "off"."""
    local = bool(hosts) and all(_is_loopback(h) for h in hosts)
    if mode is None:
        return "trust-ad" if local or (trusted and hosts) else "off"
    if mode == "trust-ad" and not (local or trusted):
        return "off"
    return mode


def _split_hostport(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        end = text.index("]")
        rest = text[end + 1 :]
        return text[1:end], int(rest[1:]) if rest.startswith(":") else 53
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


def system_nameservers() -> list[str]:
    """The nameservers of /etc/resolv.conf (127.0.0.1 when it lists none)."""
    out: list[str] = []
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append(parts[1].split("%")[0])
    except OSError:
        pass
    return out or ["127.0.0.1"]


def _qname(name: str, rdtype: str) -> dns.name.Name:
    """The wire name, label by label as given: SPF (RFC 7208) can ask for names holding
    spaces, ':' or '/', which are legal DNS labels (RFC 2181 section 11). Non-ASCII
    labels are IDNA-encoded."""
    qname = _norm(name)
    if not qname:
        raise DnsNotFound(name, rdtype, "empty name")
    labels: list[bytes] = []
    for part in qname.split("."):
        try:
            raw = part.encode("ascii")
        except UnicodeEncodeError:
            try:
                raw = encodings.idna.ToASCII(part)
            except UnicodeError as exc:
                raise DnsNotFound(qname, rdtype, f"invalid name: {exc}") from None
        if not raw or len(raw) > 63:
            raise DnsNotFound(qname, rdtype, "invalid name: bad label length")
        labels.append(raw)
    try:
        return dns.name.Name([*labels, b""])
    except dns.exception.DNSException as exc:  # longer than 255 octets
        raise DnsNotFound(qname, rdtype, f"invalid name: {exc}") from None


def _text(n: dns.name.Name) -> str:
    """A name as relay keeps it: lower case, no trailing dot, labels as raw text."""
    return ".".join(lab.decode("utf-8", "replace") for lab in n.labels if lab).lower()


# RFC 8914 section 4: the extended errors that mean "validation failed" (bogus), not
# "could not reach / could not answer".
_EDE_BOGUS = {6, 7, 8, 9, 10, 11, 12}


def _convert(rdtype: str, rrset: dns.rrset.RRset) -> list[Any]:
    out: list[Any] = []
    for rd in rrset:
        r = cast(Any, rd)
        if rdtype == "MX":
            out.append(MxRecord(int(r.preference), _text(r.exchange)))
        elif rdtype == "TXT":
            out.append(b"".join(r.strings).decode("utf-8", "replace"))
        elif rdtype in ("PTR", "CNAME"):
            out.append(_text(r.target))
        elif rdtype == "TLSA":
            out.append(TlsaRecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)))
        else:
            out.append(str(r.address))
    return out


class DnspythonResolver:
    """Resolver over dnspython's asyncio queries: UDP with TCP fallback on truncation,
    through the given nameservers ("host", "host:port", "[v6]:port"; empty: those of
    /etc/resolv.conf), ``tries`` rounds over them within ``timeout`` seconds.

    ``dnssec``: "trust-ad" sets DO and AD on queries (RFC 3225, RFC 6840 section 5.7)
    and takes the AD bit of the answer as "secure"; "off" (or None, decided by
    ``effective_dnssec``) reports every answer insecure.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 5.0,
        tries: int = 2,
        *,
        dnssec: str | None = None,
        dnssec_trusted: bool = False,
    ) -> None:
        servers = [str(n) for n in nameservers] or system_nameservers()
        self.servers = [_split_hostport(s) for s in servers]
        self.timeout = timeout
        self.tries = max(tries, 1)
        self.dnssec = effective_dnssec(dnssec, dnssec_trusted, [h for h, _ in self.servers])
        self.trust_ad = self.dnssec == "trust-ad"

    @classmethod
    def from_config(cls, cfg: Any) -> DnspythonResolver:
        """From a relay.config.DnsConfig."""
        return cls(
            [str(n) for n in cfg.nameservers],
            timeout=cfg.timeout,
            dnssec=cfg.dnssec,
            dnssec_trusted=cfg.dnssec_trusted,
        )

    async def _exchange(
        self, qname: dns.name.Name, rdtype: str, *, cd: bool = False
    ) -> tuple[dns.message.Message | None, str]:
        """The first usable response (not SERVFAIL/REFUSED) of any server, else the last
        SERVFAIL (or None) and why."""
        query = dns.message.make_query(
            qname,
            dns.rdatatype.from_text(rdtype),
            use_edns=0,
            payload=1232,
            want_dnssec=self.trust_ad,
        )
        if self.trust_ad:
            query.flags |= dns.flags.AD
        if cd:
            query.flags |= dns.flags.CD
        per_try = self.timeout / (self.tries * len(self.servers))
        failed: dns.message.Message | None = None
        why = "no answer"
        for _round in range(self.tries):
            for host, port in self.servers:
                try:
                    resp, _tcp = await dns.asyncquery.udp_with_fallback(
                        query, host, timeout=per_try, port=port
                    )
                except dns.exception.Timeout:
                    why = "timeout"
                    continue
                except (OSError, dns.exception.DNSException, ValueError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                    continue
                rcode = resp.rcode()
                if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return resp, ""
                why = dns.rcode.to_text(rcode)
                if rcode == dns.rcode.SERVFAIL:
                    failed = resp
            if failed is not None:
                break  # every server answered SERVFAIL (or failed): asking again won't help
        return failed, why

    async def _bogus(self, qname: dns.name.Name, rdtype: str, resp: dns.message.Message) -> str:
        """Why a SERVFAIL is a validation failure, or "" when it is not."""
        if not self.trust_ad:
            return ""
        for ede in resp.extended_errors():
            if int(ede.code) in _EDE_BOGUS:
                return f"EDE {int(ede.code)}: {ede.text or ''}".rstrip(": ")
        # RFC 4035 section 3.2.2: with CD set the resolver answers without validating;
        # an answer then (where there was SERVFAIL) means the data failed validation.
        unchecked, _ = await self._exchange(qname, rdtype, cd=True)
        if unchecked is not None and unchecked.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return "validation failed (answers with CD only)"
        return ""

    async def answer(self, name: str, rdtype: str) -> Answer:
        if rdtype == "PTR":
            name = reverse_name(name)
        qname = _qname(name, rdtype)
        try:
            ans = await self._ask(qname, _norm(name), rdtype)
        except DnsError as exc:
            metrics.dns_query(rdtype, exc)
            raise
        metrics.dns_query(rdtype, None)
        return ans

    async def _ask(self, qname: dns.name.Name, shown: str, rdtype: str) -> Answer:
        try:
            async with asyncio.timeout(self.timeout + 1):
                resp, why = await self._exchange(qname, rdtype)
                if resp is not None and resp.rcode() == dns.rcode.SERVFAIL:
                    bogus = await self._bogus(qname, rdtype, resp)
                    if bogus:
                        raise DnsBogus(shown, rdtype, bogus)
        except TimeoutError:
            raise DnsTempFail(shown, rdtype, "timeout") from None
        if resp is None or resp.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise DnsTempFail(shown, rdtype, why)
        status: DnssecStatus = (
            "secure" if self.trust_ad and resp.flags & dns.flags.AD else "insecure"
        )
        if resp.rcode() == dns.rcode.NXDOMAIN:
            raise DnsNotFound(shown, rdtype, status=status)
        want = dns.rdatatype.from_text(rdtype)
        owner = qname
        ttl: int | None = None
        for _hop in range(9):
            found = [r for r in resp.answer if r.name == owner and r.rdtype == want]
            if found:
                rrset = found[0]
                ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
                records = _convert(rdtype, rrset)
                return Answer(shown, rdtype, tuple(records), ttl, status, _text(owner))
            cnames = [r for r in resp.answer if r.name == owner and r.rdtype == dns.rdatatype.CNAME]
            if not cnames or want == dns.rdatatype.CNAME:
                break
            ttl = cnames[0].ttl if ttl is None else min(ttl, cnames[0].ttl)
            owner = cast(Any, cnames[0][0]).target
        raise DnsNoData(shown, rdtype, status=status)

    async def lookup_ttl(self, rdtype: str, name: str) -> tuple[list[Any], int]:
        """The typed answer of one query and the smallest TTL among its records."""
        ans = await self.answer(name, rdtype)
        return list(ans.records), ans.ttl

    async def mx(self, name: str) -> list[MxRecord]:
        return list((await self.answer(name, "MX")).records)

    async def txt(self, name: str) -> list[str]:
        return list((await self.answer(name, "TXT")).records)

    async def a(self, name: str) -> list[str]:
        return list((await self.answer(name, "A")).records)

    async def aaaa(self, name: str) -> list[str]:
        return list((await self.answer(name, "AAAA")).records)

    async def ptr(self, ip: str) -> list[str]:
        return list((await self.answer(ip, "PTR")).records)

    async def tlsa(self, name: str) -> list[TlsaRecord]:
        return list((await self.answer(name, "TLSA")).records)


# The name used before the move to dnspython (c-ares could neither send DO nor show AD,
# and refused names SPF allows); kept so that callers keep working.
AiodnsResolver = DnspythonResolver


def resolver_from_config(cfg: Any) -> Resolver:
    """The relay's resolver for a relay.config.DnsConfig: dnspython, behind the cache
    unless ``cache_max_ttl`` is 0."""
    inner = DnspythonResolver.from_config(cfg)
    if cfg.cache_max_ttl > 0:
        return CachingResolver(
            inner, max_ttl=cfg.cache_max_ttl, negative_ttl=cfg.cache_negative_ttl
        )
    return inner


class CachingResolver:
    """A TTL-bounded cache in front of another Resolver (what a local recursive resolver
    gives Postfix for free), so routing one message does not cost three queries.

    Answers are kept for their records' smallest TTL (when the inner resolver tells it,
    through ``answer`` or ``lookup_ttl``; else ``max_ttl``), capped at ``max_ttl``;
    NXDOMAIN and "no records of the type" for ``negative_ttl`` (RFC 2308 caching without
    the SOA); temporary failures (SERVFAIL, timeout, bogus) are never kept. Concurrent
    identical queries share one lookup. Callers get their own copy of the list. The
    DNSSEC status is kept with each answer.
    """

    def __init__(
        self,
        inner: Resolver,
        *,
        max_ttl: float = 300.0,
        negative_ttl: float = 30.0,
        max_entries: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Answer | DnsError]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[Answer]] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._cache.clear()

    def cached(self, name: str, rdtype: str) -> Answer | DnsError | None:
        """The fresh cached answer (or cached negative answer) for name, else None."""
        entry = self._cache.get((rdtype, _norm(name)))
        if entry is None or self.clock() >= entry[0]:
            return None
        self.hits += 1
        return entry[1]

    async def answer(self, name: str, rdtype: str) -> Answer:
        key = (rdtype, _norm(name))
        entry = self._cache.get(key)
        if entry is not None:
            expires, value = entry
            if self.clock() < expires:
                self.hits += 1
                if isinstance(value, DnsError):
                    raise value.with_traceback(None)
                return value
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            self.misses += 1
            task = asyncio.get_running_loop().create_task(self._fetch_and_store(key, rdtype, name))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        else:
            self.hits += 1
        # shielded: one caller giving up does not cancel the lookup the others wait for
        return await asyncio.shield(task)

    async def _get(self, rdtype: str, name: str) -> list[Any]:
        return list((await self.answer(name, rdtype)).records)

    def _done(self, key: tuple[str, str], task: asyncio.Task[Answer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every caller went away

    async def _fetch_and_store(self, key: tuple[str, str], rdtype: str, name: str) -> Answer:
        try:
            value = await self._fetch(rdtype, name)
        except (DnsNotFound, DnsNoData) as exc:
            if self.negative_ttl > 0:
                self._store(key, exc, self.negative_ttl)
            raise
        ttl = min(value.ttl, self.max_ttl)
        if ttl > 0:
            self._store(key, value, ttl)
        return value

    def _store(self, key: tuple[str, str], value: Answer | DnsError, ttl: float) -> None:
        if len(self._cache) >= self.max_entries:
            now = self.clock()
            for k in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[k]
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[key] = (self.clock() + ttl, value)

    async def _fetch(self, rdtype: str, name: str) -> Answer:
        answer = getattr(self.inner, "answer", None)
        if answer is not None:
            return await cast(Callable[[str, str], Awaitable[Answer]], answer)(name, rdtype)
        lookup_ttl = getattr(self.inner, "lookup_ttl", None)
        if lookup_ttl is not None:
            value, ttl = await cast(
                Callable[[str, str], Awaitable[tuple[list[Any], int]]], lookup_ttl
            )(rdtype, name)
        else:
            method = cast(
                Callable[[str], Awaitable[list[Any]]], getattr(self.inner, rdtype.lower())
            )
            value, ttl = await method(name), int(self.max_ttl) + 1
        return Answer(_norm(name), rdtype, tuple(value), ttl, "insecure", _norm(name))

    async def mx(self, name: str) -> list[MxRecord]:
        return cast(list[MxRecord], await self._get("MX", name))

    async def txt(self, name: str) -> list[str]:
        return cast(list[str], await self._get("TXT", name))

    async def a(self, name: str) -> list[str]:
        return cast(list[str], await self._get("A", name))

    async def aaaa(self, name: str) -> list[str]:
        return cast(list[str], await self._get("AAAA", name))

    async def ptr(self, ip: str) -> list[str]:
        return cast(list[str], await self._get("PTR", ip))

    async def tlsa(self, name: str) -> list[TlsaRecord]:
        return cast(list[TlsaRecord], await self._get("TLSA", name))


class StaticResolver:
    """A dict-backed Resolver for unit tests and the SPF suite.

    ``records`` maps (name, type) to a list of values, or to one of the strings
    "NXDOMAIN", "SERVFAIL", "TIMEOUT", "BOGUS". A name with no entry of any type is
    NXDOMAIN; a name with entries of other types only gives NoData. MX values are
    (preference, host) tuples; TXT values are strings (or lists of strings, joined);
    TLSA values are TlsaRecord or (usage, selector, mtype, hex) tuples.
    A (name, "CNAME") entry is followed for the other types (8 hops, then DnsTempFail).
    Names in ``secure`` (owner names; every name in a CNAME chain must be there) are
    answered "secure", the others "insecure".
    """

    def __init__(
        self,
        records: Mapping[tuple[str, str], object] | None = None,
        secure: Iterable[str] = (),
    ) -> None:
        self.records: dict[tuple[str, str], object] = {}
        self.queries: list[tuple[str, str]] = []
        self.secure = {_norm(n) for n in secure}
        for (name, rdtype), value in (records or {}).items():
            self.add(name, rdtype, value)

    def add(self, name: str, rdtype: str, value: object) -> None:
        key = (_norm(name), rdtype.upper())
        if isinstance(value, str) and value in ("NXDOMAIN", "SERVFAIL", "TIMEOUT", "BOGUS"):
            self.records[key] = value
            return
        existing = self.records.get(key)
        if isinstance(value, list) or (
            isinstance(value, tuple) and rdtype.upper() not in ("MX", "TLSA")
        ):
            items = list(value)
        else:
            items = [value]
        if isinstance(existing, list):
            existing.extend(items)
        else:
            self.records[key] = items

    def _lookup(self, name: str, rdtype: str) -> tuple[list[object], str, DnssecStatus]:
        qname = _norm(name)
        self.queries.append((qname, rdtype))
        chain = [qname]
        for _hop in range(8):  # follow CNAME entries, as a recursive resolver would
            target = self.records.get((qname, "CNAME"))
            if rdtype == "CNAME" or (qname, rdtype) in self.records:
                break
            if not isinstance(target, list) or not target:
                break
            qname = _norm(str(target[0]))
            chain.append(qname)
        else:
            raise DnsTempFail(_norm(name), rdtype, "CNAME chain too long")
        status: DnssecStatus = "secure" if all(n in self.secure for n in chain) else "insecure"
        value = self.records.get((qname, rdtype))
        if value is None:
            for t in ("NXDOMAIN", "SERVFAIL", "TIMEOUT", "BOGUS"):
                for (n, _), v in self.records.items():
                    if n == qname and v == t:
                        value = v
            if value is None:
                if any(n == qname for (n, _) in self.records):
                    raise DnsNoData(qname, rdtype, status=status)
                raise DnsNotFound(qname, rdtype, status=status)
        if value == "NXDOMAIN":
            raise DnsNotFound(qname, rdtype, status=status)
        if value == "BOGUS":
            raise DnsBogus(qname, rdtype, "static bogus")
        if value in ("SERVFAIL", "TIMEOUT"):
            raise DnsTempFail(qname, rdtype, str(value).lower())
        assert isinstance(value, list)
        if not value:
            raise DnsNoData(qname, rdtype, status=status)
        return value, qname, status

    def _typed(self, rdtype: str, values: list[object]) -> list[Any]:
        out: list[Any] = []
        for v in values:
            if rdtype == "MX":
                pref, host = cast(tuple[int, str], v)
                out.append(MxRecord(int(pref), _norm(str(host))))
            elif rdtype == "TXT":
                out.append(
                    "".join(v) if isinstance(v, Iterable) and not isinstance(v, str) else str(v)
                )
            elif rdtype in ("PTR", "CNAME"):
                out.append(_norm(str(v)))
            elif rdtype == "TLSA":
                if isinstance(v, TlsaRecord):
                    out.append(v)
                else:
                    u, s, m, data = cast(tuple[int, int, int, str | bytes], v)
                    raw = bytes.fromhex(data) if isinstance(data, str) else bytes(data)
                    out.append(TlsaRecord(int(u), int(s), int(m), raw))
            else:
                out.append(str(v))
        return out

    async def answer(self, name: str, rdtype: str) -> Answer:
        qname = reverse_name(name) if rdtype == "PTR" else name
        values, owner, status = self._lookup(qname, rdtype)
        records = self._typed(rdtype, values)
        return Answer(_norm(qname), rdtype, tuple(records), 86400, status, owner)

    async def mx(self, name: str) -> list[MxRecord]:
        return list((await self.answer(name, "MX")).records)

    async def txt(self, name: str) -> list[str]:
        return list((await self.answer(name, "TXT")).records)

    async def a(self, name: str) -> list[str]:
        return list((await self.answer(name, "A")).records)

    async def aaaa(self, name: str) -> list[str]:
        return list((await self.answer(name, "AAAA")).records)

    async def ptr(self, ip: str) -> list[str]:
        return list((await self.answer(ip, "PTR")).records)

    async def tlsa(self, name: str) -> list[TlsaRecord]:
        return list((await self.answer(name, "TLSA")).records)
