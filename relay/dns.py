"""DNS for everything in relay: a Resolver protocol and its aiodns implementation.

Results are typed; failures are split into NXDOMAIN (DnsNotFound), no records of the
type (DnsNoData) and temporary failure (DnsTempFail: SERVFAIL, timeout, refused), since
mail routing treats each differently (RFC 5321 section 5.1). dkimpy and every other
consumer get names resolved only through this module, never through their own resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import aiodns
import pycares

from relay.errors import DnsError, DnsNoData, DnsNotFound, DnsTempFail


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    host: str  # lower case, no trailing dot; "" for the null MX "."


class Resolver(Protocol):
    """What relay needs from DNS. Each method raises a DnsError subclass on failure."""

    async def mx(self, name: str) -> list[MxRecord]: ...

    async def txt(self, name: str) -> list[str]:
        """TXT records of name, each record's strings joined without spaces."""
        ...

    async def a(self, name: str) -> list[str]: ...

    async def aaaa(self, name: str) -> list[str]: ...

    async def ptr(self, ip: str) -> list[str]: ...


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


async def addresses(resolver: Resolver, name: str) -> list[str]:
    """A and AAAA addresses of name (IPv4 first). NoData when neither exists; an
    NXDOMAIN is raised as such; a temporary failure of one family is raised only when
    the other gave nothing."""
    results = await asyncio.gather(resolver.a(name), resolver.aaaa(name), return_exceptions=True)
    out: list[str] = []
    errors: list[BaseException] = []
    for r in results:
        if isinstance(r, BaseException):
            if not isinstance(r, DnsError):
                raise r
            errors.append(r)
        else:
            out.extend(r)
    if out:
        return out
    for e in errors:
        if isinstance(e, DnsTempFail):
            raise e
    for e in errors:
        if isinstance(e, DnsNotFound):
            raise e
    raise DnsNoData(name, "A/AAAA")


class AiodnsResolver:
    """Resolver over aiodns (c-ares), UDP with TCP fallback, through the given nameservers."""

    def __init__(
        self, nameservers: Sequence[str] = (), timeout: float = 5.0, tries: int = 2
    ) -> None:
        kwargs: dict[str, object] = {"timeout": timeout / max(tries, 1), "tries": tries}
        self._resolver = aiodns.DNSResolver(
            nameservers=list(nameservers) or None,
            **kwargs,  # type: ignore[arg-type]
        )
        self.timeout = timeout

    async def _query(self, name: str, rdtype: str) -> list[pycares.DNSRecord]:
        qname = _norm(name)
        if not qname:
            raise DnsNotFound(name, rdtype, "empty name")
        try:
            result = await asyncio.wait_for(
                self._resolver.query_dns(qname, rdtype), timeout=self.timeout + 1
            )
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            detail = exc.args[1] if len(exc.args) > 1 else ""
            if code in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_EBADNAME):
                raise DnsNotFound(qname, rdtype, str(detail)) from None
            if code == pycares.errno.ARES_ENODATA:
                raise DnsNoData(qname, rdtype, str(detail)) from None
            raise DnsTempFail(qname, rdtype, str(detail)) from None
        except TimeoutError:
            raise DnsTempFail(qname, rdtype, "timeout") from None
        except (UnicodeError, ValueError) as exc:  # a name that cannot be encoded
            raise DnsNotFound(qname, rdtype, f"invalid name: {exc}") from None
        want = getattr(pycares, f"QUERY_TYPE_{rdtype}")
        records = [r for r in result.answer if r.type == want]
        if not records:
            raise DnsNoData(qname, rdtype)
        return records

    async def lookup_ttl(self, rdtype: str, name: str) -> tuple[list[Any], int]:
        """The typed answer of one query (as the method of that type gives it) and the
        smallest TTL among its records."""
        if rdtype == "PTR":
            recs = await self._query(reverse_name(name), "PTR")
        else:
            recs = await self._query(name, rdtype)
        ttl = min(int(getattr(r, "ttl", 0)) for r in recs)
        return _convert(rdtype, recs), ttl

    async def mx(self, name: str) -> list[MxRecord]:
        return cast(list[MxRecord], _convert("MX", await self._query(name, "MX")))

    async def txt(self, name: str) -> list[str]:
        return cast(list[str], _convert("TXT", await self._query(name, "TXT")))

    async def a(self, name: str) -> list[str]:
        return cast(list[str], _convert("A", await self._query(name, "A")))

    async def aaaa(self, name: str) -> list[str]:
        return cast(list[str], _convert("AAAA", await self._query(name, "AAAA")))

    async def ptr(self, ip: str) -> list[str]:
        return cast(list[str], _convert("PTR", await self._query(reverse_name(ip), "PTR")))


def _convert(rdtype: str, recs: list[pycares.DNSRecord]) -> list[Any]:
    if rdtype == "MX":
        return [
            MxRecord(int(getattr(r.data, "priority")), _norm(str(getattr(r.data, "exchange"))))  # noqa: B009
            for r in recs
        ]
    if rdtype == "TXT":
        out = []
        for r in recs:
            data = getattr(r.data, "data")  # noqa: B009
            out.append(data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data))
        return out
    if rdtype == "PTR":
        return [_norm(str(getattr(r.data, "dname"))) for r in recs]  # noqa: B009
    return [str(getattr(r.data, "addr")) for r in recs]  # noqa: B009


class CachingResolver:
    """A TTL-bounded cache in front of another Resolver (what a local recursive resolver
    gives Postfix for free), so routing one message does not cost three queries.

    Answers are kept for their records' smallest TTL (when the inner resolver tells it,
    through ``lookup_ttl``; else ``max_ttl``), capped at ``max_ttl``; NXDOMAIN and
    "no records of the type" for ``negative_ttl`` (RFC 2308 caching without the SOA);
    temporary failures (SERVFAIL, timeout) are never kept. Concurrent identical queries
    share one lookup. Callers get their own copy of the list.
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
        self._cache: dict[tuple[str, str], tuple[float, list[Any] | DnsError]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[list[Any]]] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._cache.clear()

    async def _get(self, rdtype: str, name: str) -> list[Any]:
        key = (rdtype, _norm(name))
        entry = self._cache.get(key)
        if entry is not None:
            expires, value = entry
            if self.clock() < expires:
                self.hits += 1
                if isinstance(value, DnsError):
                    raise value.with_traceback(None)
                return list(value)
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
        return list(await asyncio.shield(task))

    def _done(self, key: tuple[str, str], task: asyncio.Task[list[Any]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every caller went away

    async def _fetch_and_store(self, key: tuple[str, str], rdtype: str, name: str) -> list[Any]:
        try:
            value, ttl = await self._fetch(rdtype, name)
        except (DnsNotFound, DnsNoData) as exc:
            if self.negative_ttl > 0:
                self._store(key, exc, self.negative_ttl)
            raise
        ttl = min(ttl, self.max_ttl)
        if ttl > 0:
            self._store(key, value, ttl)
        return value

    def _store(self, key: tuple[str, str], value: list[Any] | DnsError, ttl: float) -> None:
        if len(self._cache) >= self.max_entries:
            now = self.clock()
            for k in [k for k, (exp, _) in self._cache.items() if exp <= now]:
                del self._cache[k]
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[key] = (self.clock() + ttl, value)

    async def _fetch(self, rdtype: str, name: str) -> tuple[list[Any], float]:
        lookup_ttl = getattr(self.inner, "lookup_ttl", None)
        if lookup_ttl is not None:
            value, ttl = await cast(
                Callable[[str, str], Awaitable[tuple[list[Any], int]]], lookup_ttl
            )(rdtype, name)
            return value, float(ttl)
        method = cast(Callable[[str], Awaitable[list[Any]]], getattr(self.inner, rdtype.lower()))
        return await method(name), self.max_ttl

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


class StaticResolver:
    """A dict-backed Resolver for unit tests and the SPF suite.

    ``records`` maps (name, type) to a list of values, or to one of the strings
    "NXDOMAIN", "SERVFAIL", "TIMEOUT". A name with no entry of any type is NXDOMAIN;
    a name with entries of other types only gives NoData. MX values are
    (preference, host) tuples; TXT values are strings (or lists of strings, joined).
    A (name, "CNAME") entry is followed for the other types (8 hops, then DnsTempFail).
    """

    def __init__(self, records: Mapping[tuple[str, str], object] | None = None) -> None:
        self.records: dict[tuple[str, str], object] = {}
        self.queries: list[tuple[str, str]] = []
        for (name, rdtype), value in (records or {}).items():
            self.add(name, rdtype, value)

    def add(self, name: str, rdtype: str, value: object) -> None:
        key = (_norm(name), rdtype.upper())
        if isinstance(value, str) and value in ("NXDOMAIN", "SERVFAIL", "TIMEOUT"):
            self.records[key] = value
            return
        existing = self.records.get(key)
        if isinstance(value, list) or (isinstance(value, tuple) and rdtype.upper() != "MX"):
            items = list(value)
        else:
            items = [value]
        if isinstance(existing, list):
            existing.extend(items)
        else:
            self.records[key] = items

    def _lookup(self, name: str, rdtype: str) -> list[object]:
        qname = _norm(name)
        self.queries.append((qname, rdtype))
        for _hop in range(8):  # follow CNAME entries, as a recursive resolver would
            target = self.records.get((qname, "CNAME"))
            if rdtype == "CNAME" or (qname, rdtype) in self.records:
                break
            if not isinstance(target, list) or not target:
                break
            qname = _norm(str(target[0]))
        else:
            raise DnsTempFail(_norm(name), rdtype, "CNAME chain too long")
        value = self.records.get((qname, rdtype))
        if value is None:
            for t in ("NXDOMAIN", "SERVFAIL", "TIMEOUT"):
                for (n, _), v in self.records.items():
                    if n == qname and v == t:
                        value = v
            if value is None:
                if any(n == qname for (n, _) in self.records):
                    raise DnsNoData(qname, rdtype)
                raise DnsNotFound(qname, rdtype)
        if value == "NXDOMAIN":
            raise DnsNotFound(qname, rdtype)
        if value in ("SERVFAIL", "TIMEOUT"):
            raise DnsTempFail(qname, rdtype, str(value).lower())
        assert isinstance(value, list)
        if not value:
            raise DnsNoData(qname, rdtype)
        return value

    async def mx(self, name: str) -> list[MxRecord]:
        out = []
        for v in self._lookup(name, "MX"):
            pref, host = cast(tuple[int, str], v)
            out.append(MxRecord(int(pref), _norm(str(host))))
        return out

    async def txt(self, name: str) -> list[str]:
        out = []
        for v in self._lookup(name, "TXT"):
            out.append("".join(v) if isinstance(v, Iterable) and not isinstance(v, str) else str(v))
        return out

    async def a(self, name: str) -> list[str]:
        return [str(v) for v in self._lookup(name, "A")]

    async def aaaa(self, name: str) -> list[str]:
        return [str(v) for v in self._lookup(name, "AAAA")]

    async def ptr(self, ip: str) -> list[str]:
        return [_norm(str(v)) for v in self._lookup(reverse_name(ip), "PTR")]
