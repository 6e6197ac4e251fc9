"""MTA-STS discovery and policy fetch (RFC 8461 sections 3.1 and 3.3).

- ``discover``: the TXT records of ``_mta-sts.<domain>`` through our resolver (which
  follows CNAMEs and joins each record's strings without spaces); exactly one record
  beginning ``v=STSv1`` must remain, and it must parse.
- ``fetch_policy``: ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` through
  ``relay.http.SafeHttpClient`` (our resolver, SSRF guard, certificate valid for
  ``mta-sts.<domain>``, no redirects, total timeout, 64 KiB cap that refuses bigger
  bodies), 200 only, ``text/plain`` only (3.2: "senders SHOULD validate that the media
  type is 'text/plain'"), then the strict parser.

Failures carry their RFC 8460 result type: a certificate that does not verify is
``sts-webpki-invalid``; a policy that does not parse is ``sts-policy-invalid``; every
other failure (DNS, address refused, connect, timeout, status, redirect, size, media
type) is ``sts-policy-fetch-error``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import structlog

from relay.dns import Resolver
from relay.errors import DnsError, DnsNoData, DnsNotFound, PolicyError, RelayError
from relay.http import HttpErrorKind, HttpFetchError, SafeHttpClient
from relay.model import TlsResultType
from relay.mtasts.policy import (
    MAX_POLICY_BYTES,
    StsPolicy,
    StsRecord,
    is_sts_record,
    normalise_name,
    parse_policy_bytes,
    select_record,
)

log = structlog.get_logger("relay.mtasts.fetch")

WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"


class DiscoveryStatus(enum.StrEnum):
    FOUND = "found"  # exactly one valid record: ``record`` is set
    NONE = "none"  # no record, several, or an invalid one: the domain has no policy
    ERROR = "error"  # the lookup failed temporarily: nothing is known


@dataclass(frozen=True, slots=True)
class Discovery:
    domain: str
    status: DiscoveryStatus
    record: StsRecord | None = None
    reason: str = ""  # why NONE or ERROR
    txt: tuple[str, ...] = ()  # the TXT records that begin with v=STSv1, as served


class PolicyFetchError(RelayError):
    """The policy could not be had; ``result_type`` is its RFC 8460 result type."""

    def __init__(
        self, result_type: TlsResultType, reason: str, http_kind: HttpErrorKind | None = None
    ) -> None:
        self.result_type = result_type
        self.reason = reason
        self.http_kind = http_kind
        super().__init__(f"{result_type}: {reason}")


def policy_domain(domain: str) -> str:
    """Normalised (lower-case A-label) policy domain; PolicyError if not a host name."""
    return normalise_name(domain)


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}{WELL_KNOWN_PATH}"


async def discover(resolver: Resolver, domain: str) -> Discovery:
    """Look up ``_mta-sts.<domain>`` TXT and select its one STS record (RFC 8461 3.1)."""
    name = f"_mta-sts.{domain}"
    try:
        txts = await resolver.txt(name)
    except (DnsNotFound, DnsNoData) as exc:
        return Discovery(domain, DiscoveryStatus.NONE, reason=f"no TXT record at {name}: {exc}")
    except DnsError as exc:
        return Discovery(domain, DiscoveryStatus.ERROR, reason=f"TXT lookup of {name}: {exc}")
    sts = tuple(t for t in txts if is_sts_record(t))
    try:
        record = select_record(list(txts))
    except PolicyError as exc:
        return Discovery(domain, DiscoveryStatus.NONE, reason=str(exc), txt=sts)
    return Discovery(domain, DiscoveryStatus.FOUND, record=record, txt=sts)


_WEBPKI = {HttpErrorKind.TLS_CERTIFICATE}


async def fetch_policy(
    http: SafeHttpClient,
    domain: str,
    *,
    port: int = 443,
    timeout: float | None = None,
) -> StsPolicy:
    """GET and parse the policy of domain (RFC 8461 3.3). Raises PolicyFetchError."""
    url = policy_url(domain)
    try:
        resp = await http.get(
            url, max_bytes=MAX_POLICY_BYTES, port=port, timeout=timeout, accept="text/plain"
        )
    except HttpFetchError as exc:
        rtype = (
            TlsResultType.STS_WEBPKI_INVALID
            if exc.kind in _WEBPKI
            else TlsResultType.STS_POLICY_FETCH_ERROR
        )
        raise PolicyFetchError(rtype, exc.message, exc.kind) from None
    if resp.content_type != "text/plain":
        raise PolicyFetchError(
            TlsResultType.STS_POLICY_FETCH_ERROR,
            f"{url}: media type {resp.content_type or '(none)'!r}, not text/plain",
        )
    try:
        return parse_policy_bytes(resp.body)
    except PolicyError as exc:
        raise PolicyFetchError(TlsResultType.STS_POLICY_INVALID, f"{url}: {exc}") from None
