"""A small real HTTPS server for tests (asyncio + ssl, HTTP/1.1, one request per connection).

It picks the certificate by SNI and the answer by (Host name, path), so one listener on
127.0.0.x can stand in for many ``mta-sts.<domain>`` policy hosts or report collectors.
Used by the tests of relay.http and relay.mtasts.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import trustme


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "text/plain"
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False
    endless: bool = False  # chunked body that never ends
    delay: float = 0.0  # before the status line


@dataclass
class Seen:
    method: str
    path: str
    host: str
    sni: str | None
    headers: dict[str, str]
    body: bytes


class HttpsServer:
    """``certs`` maps an SNI name to the (CA, name-on-certificate) that serves it."""

    def __init__(self, ca: trustme.CA, host: str = "127.0.0.1") -> None:
        self.ca = ca
        self.host = host
        self.port = 0
        self.routes: dict[tuple[str, str], Answer] = {}
        self.seen: list[Seen] = []
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._server: asyncio.Server | None = None
        self._default = self._context(ca, "default.invalid")
        self._default.sni_callback = self._pick
        self._sni: dict[int, str | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)
        return ctx

    def cert_for(self, sni: str, ca: trustme.CA | None = None, *names: str) -> None:
        """Serve sni with a certificate from ca (default: the server's CA) for names
        (default: sni itself)."""
        ctx = self._context(ca or self.ca, *(names or (sni,)))
        ctx.sni_callback = self._pick
        self._contexts[sni.lower()] = ctx

    def route(self, host: str, path: str, answer: Answer) -> None:
        self.routes[(host.lower(), path)] = answer
        if host.lower() not in self._contexts:
            self.cert_for(host)

    def _pick(self, sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self._sni[id(sock)] = name
        if name and name.lower() in self._contexts:
            sock.context = self._contexts[name.lower()]

    async def start(self) -> HttpsServer:
        self._server = await asyncio.start_server(
            self._handle, self.host, 0, ssl=self._default, ssl_handshake_timeout=5
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HttpsServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        host = headers.get("host", "").split(":")[0].lower()
        sslobj = writer.get_extra_info("ssl_object")
        sni = self._sni.pop(id(sslobj), None) if sslobj is not None else None
        self.seen.append(Seen(method, path, host, sni, headers, body))
        ans = self.routes.get((host, path), Answer(404, b"not found\n"))
        if ans.delay:
            await asyncio.sleep(ans.delay)
        out = [f"HTTP/1.1 {ans.status} X"]
        if ans.content_type is not None:
            out.append(f"Content-Type: {ans.content_type}")
        out += [f"{k}: {v}" for k, v in ans.headers]
        out.append("Connection: close")
        if ans.chunked or ans.endless:
            out.append("Transfer-Encoding: chunked")
        elif not any(k.lower() == "content-length" for k, _ in ans.headers):
            out.append(f"Content-Length: {len(ans.body)}")
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        if ans.endless:
            chunk = b"a" * 4096
            while True:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        elif ans.chunked:
            for i in range(0, len(ans.body), 4096):
                part = ans.body[i : i + 4096]
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(ans.body)
        await writer.drain()
