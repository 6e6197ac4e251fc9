"""Attacker-side receiving MTAs for the downgrade lab (threats row 6; RFC 3207 section
4.2; RFC 8461 section 7.2).

- ``InjectionMta``: a small SMTP server that answers ``STARTTLS`` with its ``220`` reply
  AND plaintext injected after it, in one write (one TCP segment on loopback): by
  default ``250 injected``, the shape of the "STARTTLS response injection" bugs (a
  man in the middle appends replies that a careless client reads as if they came
  inside TLS). RFC 3207 4.2 says the client must discard what it learnt before TLS;
  aiosmtplib (>= 5.1.2) discards buffered bytes at STARTTLS. The server then completes
  TLS normally and detects a desynchronised client: after TLS it holds its reply to
  EHLO for a moment, and a client that sends its next command before that reply (it
  took the injected line for it) is counted in ``desynced``.
- ``legacy_tls_context``: a server context speaking only TLS 1.0/1.1, for an MX that a
  verifying sender must refuse (RFC 8461 7.2: TLS 1.2 or newer).
  ``legacy_tls_supported()`` says whether this OpenSSL can still do it (OpenSSL 3
  needs ``@SECLEVEL=0``; builds without TLS 1.0/1.1 cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import warnings

from relay.lab.mta import Received
from relay.lab.tcpserver import LabServer

DEFAULT_INJECTION = b"250 injected\r\n"
DESYNC_WAIT = 0.2  # seconds the EHLO reply after TLS is held back
MAX_LINE = 4096
MAX_DATA = 10 * 1024 * 1024


def legacy_tls_context(certfile: str | None = None, keyfile: str | None = None) -> ssl.SSLContext:
    """Server context limited to TLS 1.0 and 1.1 (load a certificate into it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def legacy_tls_supported() -> bool:
    """True when this OpenSSL completes a TLS 1.1 handshake (in memory, no socket)."""
    import trustme

    ca = trustme.CA()
    server = legacy_tls_context()
    ca.issue_cert("legacy.lab.test").configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="legacy.lab.test")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done_c = done_s = False
    try:
        for _ in range(10):
            for obj, flag in ((c, "c"), (s, "s")):
                try:
                    obj.do_handshake()
                    if flag == "c":
                        done_c = True
                    else:
                        done_s = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if done_c and done_s:
                return c.version() in ("TLSv1", "TLSv1.1")
    except ssl.SSLError:
        return False
    return False


class InjectionMta(LabServer):
    """SMTP server on host:port that injects plaintext after its STARTTLS ``220``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_context: ssl.SSLContext,
        hostname: str = "mx.lab.test",
        injection: bytes = DEFAULT_INJECTION,
    ) -> None:
        super().__init__((host, port))
        self.tls_context = tls_context
        self.hostname = hostname
        self.injection = injection
        self.messages: list[Received] = []
        self.connections = 0
        self.injected = 0  # STARTTLS replies that carried the injection
        self.desynced = 0  # clients that acted on the injected reply

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._session(reader, writer)
        except (
            OSError,
            ValueError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the top of a connection handler
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, text: bytes) -> None:
        writer.write(text)
        await writer.drain()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        await self._reply(writer, f"220 {self.hostname} ESMTP lab\r\n".encode())
        tls: str | None = None
        mail_from = ""
        rcpts: list[str] = []
        while True:
            line = await reader.readuntil(b"\n")
            if len(line) > MAX_LINE:
                return
            cmd = line.decode("latin-1").strip()
            verb = cmd.split(" ", 1)[0].upper()
            arg = cmd[len(verb) :].strip()
            if verb in ("EHLO", "HELO"):
                if tls is not None and self.injection:
                    # a client that took the injected line for this reply sends on now
                    with contextlib.suppress(TimeoutError):
                        early = await asyncio.wait_for(reader.readuntil(b"\n"), DESYNC_WAIT)
                        self.desynced += 1
                        await self._reply(writer, b"554 5.5.0 desynchronised client\r\n")
                        del early
                        return
                caps = [self.hostname, "PIPELINING", "8BITMIME", "SIZE 10485760"]
                if tls is None:
                    caps.append("STARTTLS")
                text = "".join(f"250-{c}\r\n" for c in caps[:-1]) + f"250 {caps[-1]}\r\n"
                await self._reply(writer, text.encode())
            elif verb == "STARTTLS" and tls is None:
                self.injected += 1 if self.injection else 0
                writer.write(b"220 2.0.0 Ready to start TLS\r\n" + self.injection)
                await writer.drain()
                await writer.start_tls(self.tls_context)
                obj = writer.get_extra_info("ssl_object")
                tls = obj.version() if obj is not None else "TLS"
                mail_from, rcpts = "", []
            elif verb == "MAIL":
                mail_from = arg.split(":", 1)[1].strip().split(" ", 1)[0].strip("<>")
                rcpts = []
                await self._reply(writer, b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                rcpts.append(arg.split(":", 1)[1].strip().split(" ", 1)[0].strip("<>"))
                await self._reply(writer, b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                await self._reply(writer, b"354 End data with <CR><LF>.<CR><LF>\r\n")
                data = await self._read_data(reader)
                self.messages.append(
                    Received(mail_from, tuple(rcpts), data, tls, str(peer[0]) if peer else "")
                )
                await self._reply(writer, b"250 2.0.0 Ok: stored\r\n")
            elif verb in ("RSET", "NOOP"):
                mail_from, rcpts = ("", []) if verb == "RSET" else (mail_from, rcpts)
                await self._reply(writer, b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                await self._reply(writer, b"221 2.0.0 Bye\r\n")
                return
            else:
                await self._reply(writer, b"500 5.5.2 command not recognised\r\n")

    async def _read_data(self, reader: asyncio.StreamReader) -> bytes:
        out = bytearray()
        while True:
            line = await reader.readuntil(b"\n")
            if line in (b".\r\n", b".\n"):
                return bytes(out)
            if line.startswith(b"."):
                line = line[1:]
            out += line
            if len(out) > MAX_DATA:
                raise ValueError("message too big")
