"""Live probe of one MX: EHLO, STARTTLS offered, TLS version, certificate valid for the
MX name (chain and expiry are checked by the TLS handshake), REQUIRETLS advertised."""

from __future__ import annotations

import asyncio
import ssl
import time

from relay.check import ERROR, OK, WARN, Finding

EXPIRY_WARN_DAYS = 14


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
        if version in ("TLSv1", "TLSv1.1"):
            out.append(Finding(a, "probe.old_tls", WARN, f"{host}: {version}", "offer TLS 1.2+"))
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
