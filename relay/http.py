"""Safe outbound HTTPS for MTA-STS policy fetches (RFC 8461 section 3.3) and TLS-RPT
report uploads (RFC 8460 section 5.3.2).

What this module owns, and why:

- Names are resolved through OUR resolver (``relay.dns.addresses``), never the system's,
  so a lab or a test points every fetch at its own DNS.
- Resolved addresses are checked before connecting (server-side request forgery, threats
  row 19): loopback, private (RFC 1918, CGNAT), link-local, unique-local, reserved and
  any other non-global address is refused unless ``allow_private`` (``[http]
  allow_private_addresses``, set by labs). The cloud metadata addresses
  (169.254.169.254, fd00:ec2::254), unspecified and multicast addresses are refused
  always. Addresses that are refused are dropped; the rest are tried in order.
- The connection goes to the checked IP, while SNI, the ``Host`` header and certificate
  verification use the URL's host name (httpcore's ``sni_hostname`` extension). There
  is no connection reuse, so one pooled connection can never serve another name.
- Trust: the system's roots plus an extra CA file (``[delivery] ca_file``); TLS 1.2+.
- Redirects are never followed ("HTTP 3xx redirects MUST NOT be followed", RFC 8461
  3.3); a 3xx raises ``redirect``. Statuses outside ``ok_status`` raise ``status``.
- One total deadline covers resolution, connection, TLS and the whole body.
- Bodies are streamed with a hard cap; a bigger body is REFUSED (``too-large``), never
  truncated. Content-Encoding is not requested (``identity``); any decoding done by
  httpx still counts against the cap, so a compressed bomb is refused too.

Every failure is one exception type, ``HttpFetchError``, whose ``kind`` says what
failed (``HttpErrorKind``).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import ssl
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from relay.config import Config
from relay.dns import Resolver, addresses
from relay.errors import DnsError, DnsTempFail, RelayError

log = structlog.get_logger("relay.http")

USER_AGENT = "relay/0.1"
DEFAULT_MAX_BYTES = 64 * 1024

# Refused even when private addresses are allowed: they are never a policy host.
_METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
}


class HttpErrorKind(enum.StrEnum):
    DNS = "dns"  # the host name did not resolve (detail says NXDOMAIN / temporary)
    REFUSED_ADDRESS = "refused-address"  # every address was refused (SSRF guard)
    TLS_CERTIFICATE = "tls-certificate"  # the certificate did not verify (name, CA, dates)
    TLS_OTHER = "tls-other"  # handshake or other TLS failure
    TIMEOUT = "timeout"  # the total deadline passed
    CONNECT = "connect"  # TCP connection failed or was reset
    REDIRECT = "redirect"  # a 3xx answer: never followed
    TOO_LARGE = "too-large"  # the body is over the cap
    STATUS = "status"  # a status outside the accepted ones
    PROTOCOL = "protocol"  # a malformed HTTP answer
    URL = "url"  # the URL itself is unusable (not https, no host)


class HttpFetchError(RelayError):
    """An HTTPS request failed. ``kind`` names the failure; ``status`` is set for
    ``status``/``redirect``; ``temporary`` is True for a DNS temporary failure."""

    def __init__(
        self,
        kind: HttpErrorKind,
        message: str,
        *,
        status: int = 0,
        temporary: bool = False,
    ) -> None:
        self.kind = kind
        self.message = message
        self.status = status
        self.temporary = temporary
        super().__init__(f"{kind}: {message}")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    content_type: str  # media type only, lower case, parameters removed ("" when absent)
    body: bytes
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order
    peer_ip: str  # the address actually connected to

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


def media_type(content_type: str | None) -> str:
    """'Text/Plain; charset=utf-8' -> 'text/plain'."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def content_type_is(response: HttpResponse, expected: str) -> bool:
    """True when the response's media type (parameters ignored) equals expected."""
    return response.content_type == media_type(expected)


def address_refusal(ip: str, *, allow_private: bool) -> str | None:
    """Why ip may not be connected to, or None when it may."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr in _METADATA:
        return "cloud metadata address"
    if addr.is_unspecified:
        return "unspecified address"
    if addr.is_multicast:
        return "multicast address"
    if allow_private:
        return None
    if addr.is_loopback:
        return "loopback address"
    if addr.is_link_local:
        return "link-local address"
    if addr.is_private:
        return "private address"
    if not addr.is_global:
        return "non-global address"
    return None


def make_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifying client context: system roots plus ca_file, TLS 1.2 or newer."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 16:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _map_transport_error(exc: httpx.HTTPError, where: str) -> HttpFetchError:
    """Translate httpx/httpcore/ssl exceptions once, at the boundary."""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            reason = e.verify_message or str(e)
            return HttpFetchError(HttpErrorKind.TLS_CERTIFICATE, f"{where}: {reason}")
    for e in _chain(exc):
        if isinstance(e, ssl.SSLError):
            return HttpFetchError(HttpErrorKind.TLS_OTHER, f"{where}: {e}")
    if isinstance(exc, httpx.TimeoutException):
        return HttpFetchError(HttpErrorKind.TIMEOUT, f"{where}: {type(exc).__name__}")
    if isinstance(exc, httpx.ConnectError):
        return HttpFetchError(HttpErrorKind.CONNECT, f"{where}: {exc or type(exc).__name__}")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.DecodingError):
        return HttpFetchError(HttpErrorKind.PROTOCOL, f"{where}: {exc or type(exc).__name__}")
    return HttpFetchError(HttpErrorKind.CONNECT, f"{where}: {type(exc).__name__}: {exc}")


class SafeHttpClient:
    """HTTPS GET/POST with the rules in the module docstring. One instance may be shared;
    every request opens its own connection."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        ca_file: Path | None = None,
        allow_private: bool = False,
        timeout: float = 60.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.resolver = resolver
        self.allow_private = allow_private
        self.timeout = timeout
        self.user_agent = user_agent
        self._ssl = make_ssl_context(ca_file)
        self.requests = 0  # counters
        self.refused = 0

    @classmethod
    def from_config(
        cls, config: Config, resolver: Resolver, *, timeout: float | None = None
    ) -> SafeHttpClient:
        """``[delivery] ca_file``, ``[http] allow_private_addresses`` and, by default,
        ``[mta_sts] fetch_timeout``."""
        return cls(
            resolver,
            ca_file=config.delivery.ca_file,
            allow_private=config.http.allow_private_addresses,
            timeout=config.mta_sts.fetch_timeout if timeout is None else timeout,
        )

    async def get(
        self,
        url: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        port: int | None = None,
        ok_status: Container[int] = (200,),
        timeout: float | None = None,
        accept: str = "*/*",
    ) -> HttpResponse:
        """GET url; port overrides the URL's port. Raises HttpFetchError."""
        return await self._request(
            "GET", url, None, "", max_bytes, port, ok_status, timeout, accept
        )

    async def post(
        self,
        url: str,
        body: bytes,
        content_type: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        port: int | None = None,
        ok_status: Container[int] = range(200, 300),
        timeout: float | None = None,
    ) -> HttpResponse:
        """POST body to url; max_bytes caps the response body. Raises HttpFetchError."""
        return await self._request(
            "POST", url, body, content_type, max_bytes, port, ok_status, timeout, "*/*"
        )

    # ------------------------------------------------------------------ internals

    async def _request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        content_type: str,
        max_bytes: int,
        port: int | None,
        ok_status: Container[int],
        timeout: float | None,
        accept: str,
    ) -> HttpResponse:
        self.requests += 1
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise HttpFetchError(HttpErrorKind.URL, f"invalid URL {url!r}: {exc}") from None
        if parsed.scheme != "https":
            raise HttpFetchError(HttpErrorKind.URL, f"only https URLs are fetched: {url!r}")
        try:
            host = parsed.raw_host.decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            raise HttpFetchError(HttpErrorKind.URL, f"bad host in {url!r}") from None
        if not host:
            raise HttpFetchError(HttpErrorKind.URL, f"no host in {url!r}")
        real_port = port or parsed.port or 443
        deadline = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(deadline):
                ips = await self._resolve(host)
                last: HttpFetchError | None = None
                for ip in ips:
                    try:
                        return await self._attempt(
                            method, parsed, host, ip, real_port, body, content_type,
                            max_bytes, ok_status, accept, deadline,
                        )  # fmt: skip
                    except HttpFetchError as exc:
                        if exc.kind is not HttpErrorKind.CONNECT:
                            raise
                        last = exc
                assert last is not None
                raise last
        except TimeoutError:
            raise HttpFetchError(
                HttpErrorKind.TIMEOUT, f"{method} {url}: no complete answer within {deadline}s"
            ) from None

    async def _resolve(self, host: str) -> list[str]:
        try:
            ipaddress.ip_address(host.strip("[]"))
            candidates = [host.strip("[]")]
        except ValueError:
            try:
                candidates = await addresses(self.resolver, host)
            except DnsError as exc:
                raise HttpFetchError(
                    HttpErrorKind.DNS, str(exc), temporary=isinstance(exc, DnsTempFail)
                ) from None
        allowed: list[str] = []
        reasons: list[str] = []
        for ip in candidates:
            why = address_refusal(ip, allow_private=self.allow_private)
            if why is None:
                allowed.append(ip)
            else:
                reasons.append(f"{ip} ({why})")
        if reasons:
            self.refused += len(reasons)
            log.warning("http_address_refused", host=host, refused=reasons)
        if not allowed:
            raise HttpFetchError(
                HttpErrorKind.REFUSED_ADDRESS, f"{host}: refused {', '.join(reasons)}"
            )
        return allowed

    async def _attempt(
        self,
        method: str,
        parsed: httpx.URL,
        host: str,
        ip: str,
        port: int,
        body: bytes | None,
        content_type: str,
        max_bytes: int,
        ok_status: Container[int],
        accept: str,
        deadline: float,
    ) -> HttpResponse:
        where = f"{method} https://{host}:{port}{parsed.raw_path.decode('ascii', 'replace')}"
        headers = {
            "Host": host if port == 443 else f"{host}:{port}",
            "User-Agent": self.user_agent,
            "Accept": accept,
            "Accept-Encoding": "identity",
            "Connection": "close",
        }
        if body is not None:
            headers["Content-Type"] = content_type
        target = parsed.copy_with(host=ip, port=port)
        async with httpx.AsyncClient(
            verify=self._ssl,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(deadline),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
        ) as client:
            request = client.build_request(
                method, target, headers=headers, content=body, extensions={"sni_hostname": host}
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _map_transport_error(exc, where) from None
            try:
                return await self._read(response, where, ip, max_bytes, ok_status)
            except httpx.HTTPError as exc:
                raise _map_transport_error(exc, where) from None
            finally:
                await response.aclose()

    async def _read(
        self,
        response: httpx.Response,
        where: str,
        ip: str,
        max_bytes: int,
        ok_status: Container[int],
    ) -> HttpResponse:
        status = response.status_code
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            raise HttpFetchError(
                HttpErrorKind.REDIRECT,
                f"{where}: HTTP {status} redirect to {location!r} not followed",
                status=status,
            )
        if status not in ok_status:
            raise HttpFetchError(HttpErrorKind.STATUS, f"{where}: HTTP {status}", status=status)
        length = response.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > max_bytes:
            raise HttpFetchError(
                HttpErrorKind.TOO_LARGE,
                f"{where}: Content-Length {int(length)} is over the {max_bytes}-byte limit",
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise HttpFetchError(
                    HttpErrorKind.TOO_LARGE, f"{where}: body over the {max_bytes}-byte limit"
                )
            chunks.append(chunk)
        return HttpResponse(
            status=status,
            content_type=media_type(response.headers.get("content-type")),
            body=b"".join(chunks),
            headers=tuple((k.lower(), v) for k, v in response.headers.multi_items()),
            peer_ip=ip,
        )
