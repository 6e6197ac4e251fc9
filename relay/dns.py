"""DNS for everything in relay: a Resolver protocol and its aiodns implementation.

Results are typed; failures are split into NXDOMAIN (DnsNotFound), no records of the
type (DnsNoData) and temporary failure (DnsTempFail: SERVFAIL, timeout, refused), since
mail routing treats each differently (RFC 5321 section 5.1). dkimpy and every other
consumer get names resolved only through this module, never through their own resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

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

    async def mx(self, name: str) -> list[MxRecord]:
        recs = await self._query(name, "MX")
        return [
            MxRecord(int(getattr(r.data, "priority")), _norm(str(getattr(r.data, "exchange"))))  # noqa: B009
            for r in recs
        ]

    async def txt(self, name: str) -> list[str]:
        recs = await self._query(name, "TXT")
        out = []
        for r in recs:
            data = getattr(r.data, "data")  # noqa: B009
            out.append(data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data))
        return out

    async def a(self, name: str) -> list[str]:
        return [str(getattr(r.data, "addr")) for r in await self._query(name, "A")]  # noqa: B009

    async def aaaa(self, name: str) -> list[str]:
        return [str(getattr(r.data, "addr")) for r in await self._query(name, "AAAA")]  # noqa: B009

    async def ptr(self, ip: str) -> list[str]:
        recs = await self._query(reverse_name(ip), "PTR")
        return [_norm(str(getattr(r.data, "dname"))) for r in recs]  # noqa: B009


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
