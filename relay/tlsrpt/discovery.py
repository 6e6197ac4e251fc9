"""TLS-RPT policy discovery (RFC 8460 section 3): the ``_smtp._tls.<domain>`` TXT record.

Grammar (section 3)::

    tlsrpt-record    = tlsrpt-version 1*(field-delim tlsrpt-field) [field-delim]
    field-delim      = *WSP ";" *WSP
    tlsrpt-field     = tlsrpt-rua / tlsrpt-extension
    tlsrpt-version   = %s"v=TLSRPTv1"
    tlsrpt-rua       = %s"rua=" tlsrpt-uri *(*WSP "," *WSP tlsrpt-uri)

Records that do not begin with ``v=TLSRPTv1`` are discarded; unless exactly one
remains, the domain does not take reports. Unknown fields are ignored. Only ``mailto:``
and ``https:`` URIs are used; others are dropped. At most ``MAX_RUA`` URIs per domain
are kept (server-side request forgery and amplification guard, threats row 19).
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from dataclasses import dataclass

import structlog

from relay.dns import Resolver
from relay.errors import DnsNoData, DnsNotFound

log = structlog.get_logger("relay.tlsrpt.discovery")

MAX_RUA = 5
VERSION = "v=TLSRPTv1"

_FIELD_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)$")
_ADDR_RE = re.compile(r"^[^\s@<>()\[\],;:\"\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


class RuaScheme(enum.StrEnum):
    MAILTO = "mailto"
    HTTPS = "https"


@dataclass(frozen=True, slots=True)
class Rua:
    """One report destination: ``uri`` is the address (mailto) or the full URL (https)."""

    scheme: RuaScheme
    uri: str

    def __str__(self) -> str:
        return f"mailto:{self.uri}" if self.scheme is RuaScheme.MAILTO else self.uri


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    domain: str
    rua: tuple[Rua, ...]
    raw: str = ""


class RecordError(ValueError):
    """The TXT record is not a valid TLSRPT record."""


def _parse_uri(text: str) -> Rua | None:
    low = text.lower()
    if low.startswith("mailto:"):
        addr = urllib.parse.unquote(text[7:].split("?", 1)[0]).strip()
        if not _ADDR_RE.match(addr):
            return None
        return Rua(RuaScheme.MAILTO, addr)
    if low.startswith("https://"):
        try:
            parts = urllib.parse.urlsplit(text)
        except ValueError:
            return None
        if not parts.hostname:
            return None
        return Rua(RuaScheme.HTTPS, text)
    return None


def parse_record(txt: str, domain: str = "") -> TlsRptRecord:
    """Parse one TXT string that starts with ``v=TLSRPTv1``. Raises RecordError."""
    parts = [p.strip(" \t") for p in txt.split(";")]
    if not parts or parts[0] != VERSION:
        raise RecordError(f"does not begin with {VERSION}")
    if parts and parts[-1] == "":
        parts.pop()
    rua_field: str | None = None
    for part in parts[1:]:
        if part == "":
            raise RecordError("empty field")
        if part.startswith("rua="):
            if rua_field is not None:
                raise RecordError("rua given twice")
            rua_field = part[4:]
            continue
        if not _FIELD_RE.match(part):
            raise RecordError(f"malformed field {part!r}")
    if rua_field is None:
        raise RecordError("no rua field")
    uris = [u.strip(" \t") for u in rua_field.split(",")]
    if not uris or any(not u for u in uris):
        raise RecordError("empty URI in rua")
    out: list[Rua] = []
    for u in uris:
        rua = _parse_uri(u)
        if rua is None:
            log.warning("tlsrpt_rua_ignored", domain=domain, uri=u[:200])
            continue
        if rua not in out:
            out.append(rua)
    if not out:
        raise RecordError("no usable mailto: or https: URI in rua")
    if len(out) > MAX_RUA:
        log.warning("tlsrpt_rua_capped", domain=domain, given=len(out), kept=MAX_RUA)
        out = out[:MAX_RUA]
    return TlsRptRecord(domain=domain, rua=tuple(out), raw=txt)


def select_record(txts: list[str], domain: str = "") -> TlsRptRecord | None:
    """From every TXT string at the name, the one TLSRPT record, or None (section 3:
    none or several records mean no reporting; so does an invalid one)."""
    candidates = [t for t in txts if t.startswith(VERSION)]
    candidates = [t for t in candidates if len(t) == len(VERSION) or t[len(VERSION)] in "; \t"]
    if len(candidates) != 1:
        if candidates:
            log.info("tlsrpt_record_ambiguous", domain=domain, records=len(candidates))
        return None
    try:
        return parse_record(candidates[0], domain)
    except RecordError as exc:
        log.info("tlsrpt_record_invalid", domain=domain, error=str(exc))
        return None


def record_name(domain: str) -> str:
    return f"_smtp._tls.{domain.rstrip('.').lower()}"


async def discover(resolver: Resolver, domain: str) -> TlsRptRecord | None:
    """The domain's TLSRPT record, or None when it publishes none (NXDOMAIN, no TXT, no
    or several valid records). A temporary DNS failure raises DnsTempFail."""
    try:
        txts = await resolver.txt(record_name(domain))
    except (DnsNotFound, DnsNoData):
        return None
    return select_record(txts, domain.rstrip(".").lower())
