"""Live probe of one MX: EHLO, STARTTLS offered, TLS version, certificate valid for the
MX name (chain and expiry are checked by the TLS handshake), REQUIRETLS advertised."""

from __future__ import annotations

import asyncio
import ssl
import time

from relay.check import ERROR, OK, WARN, Finding
from relay.delivery.tls import opportunistic_context

EXPIRY_WARN_DAYS = 14
OLD_TLS = ("TLSv1", "TLSv1.1")  # deprecated by RFC 8996; OpenSSL 3 refuses them by default


async def _reply(reader: asyncio.StreamReader) -> tuple[int, list[str]]:
    lines: list[str] = []
    while True:
        raw = await reader.readline()
        if not raw:
            raise ConnectionError("connection closed")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line[4:])
        if len(line) < 4 or line[3] != "-":
            return int(line[:3]), lines


async def probe_mx(
    host: str, address: str, port: int, ctx: ssl.SSLContext, timeout: float = 10.0
) -> list[Finding]:
    a = "PROBE"
    try:
        return await asyncio.wait_for(_probe(host, address, port, ctx), timeout)
    except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
        return [
            Finding(
                a,
                "probe.connect",
                ERROR,
                f"{host} ({address}:{port}): {exc}",
                "the MX must accept connections on port 25",
            )
        ]


async def offered_version(host: str, address: str, port: int) -> str:
    """The TLS version the server negotiates after STARTTLS with delivery's
    ``opportunistic_context()`` (every TLS version the library has, SECLEVEL 0 since
    OpenSSL 3 refuses TLS 1.0/1.1 above it, no verification), or "" when that fails too.
    Used once a verifying handshake has failed, to learn which version the server offers."""
    try:
        reader, writer = await asyncio.open_connection(address, port)
    except OSError:
        return ""
    try:
        await _reply(reader)
        writer.write(b"EHLO relay-check.invalid\r\n")
        await _reply(reader)
        writer.write(b"STARTTLS\r\n")
        if (await _reply(reader))[0] != 220:
            return ""
        await writer.start_tls(opportunistic_context(), server_hostname=host)
        sslobj = writer.get_extra_info("ssl_object")
        return str(sslobj.version()) if sslobj is not None else ""
    except (OSError, ConnectionError, ValueError):
        return ""
    finally:
        writer.close()


async def _probe(host: str, address: str, port: int, ctx: ssl.SSLContext) -> list[Finding]:
    a = "PROBE"
    reader, writer = await asyncio.open_connection(address, port)
    try:
        await _reply(reader)
        writer.write(b"EHLO relay-check.invalid\r\n")
        code, ext = await _reply(reader)
        words = {e.split()[0].upper() for e in ext[1:] if e.split()}
        if code != 250:
            return [Finding(a, "probe.ehlo", ERROR, f"{host}: EHLO answered {code}", "")]
        if "STARTTLS" not in words:
            return [
                Finding(
                    a,
                    "probe.no_starttls",
                    ERROR,
                    f"{host} does not offer STARTTLS",
                    "enable STARTTLS: without it mail to you travels in clear",
                )
            ]
        writer.write(b"STARTTLS\r\n")
        code, _ = await _reply(reader)
        if code != 220:
            return [Finding(a, "probe.starttls_refused", ERROR, f"{host}: STARTTLS {code}", "")]
        try:
            await writer.start_tls(ctx, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            return [
                Finding(
                    a,
                    "probe.certificate",
                    ERROR,
                    f"{host}: {exc.verify_message}",
                    "serve a certificate valid for the MX name from a public CA",
                )
            ]
        except (ssl.SSLError, ConnectionResetError) as exc:
            # the handshake a current sender makes (TLS 1.2 or newer) failed (asyncio
            # shows the server's protocol_version alert as a reset); if the server speaks
            # only TLS 1.0/1.1, that is what every such sender meets
            old = await offered_version(host, address, port)
            if old not in OLD_TLS:
                raise
            why = getattr(exc, "reason", None) or type(exc).__name__
            return [
                Finding(
                    a,
                    "probe.old_tls",
                    ERROR,
                    f"{host} offers only {old}: the TLS 1.2+ handshake failed ({why})",
                    "enable TLS 1.2 and 1.3: TLS 1.0 and 1.1 are deprecated (RFC 8996) "
                    "and current senders refuse them, so mail arrives in clear or not at all",
                )
            ]
        sslobj = writer.get_extra_info("ssl_object")
        version = sslobj.version() if sslobj is not None else ""
        out: list[Finding] = []
        cert = sslobj.getpeercert() if sslobj is not None else None
        if cert and cert.get("notAfter"):
            left = ssl.cert_time_to_seconds(str(cert["notAfter"])) - time.time()
            if left < EXPIRY_WARN_DAYS * 86400:
                out.append(
                    Finding(
                        a,
                        "probe.cert_expiring",
                        WARN,
                        f"{host}: certificate expires in {max(0, int(left // 86400))} days",
                        "renew the certificate",
                    )
                )
        writer.write(b"EHLO relay-check.invalid\r\n")
        _code, ext = await _reply(reader)
        words = {e.split()[0].upper() for e in ext[1:] if e.split()}
        if "REQUIRETLS" not in words:
            out.append(
                Finding(
                    a,
                    "probe.no_requiretls",
                    WARN,
                    f"{host}: no REQUIRETLS",
                    "RFC 8689 REQUIRETLS lets senders demand TLS end to end",
                )
            )
        out.insert(0, Finding(a, "probe.ok", OK, f"{host}: STARTTLS, {version}, certificate ok"))
        writer.write(b"QUIT\r\n")
        return out
    finally:
        writer.close()
