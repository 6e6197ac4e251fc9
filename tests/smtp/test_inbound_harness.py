"""Helpers for the inbound SMTP tests (no tests here): config, a recording submit
function, a server on loopback and a raw-socket client."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from relay.config import Config, HostPort, parse_config
from relay.model import ConnInfo, Envelope
from relay.smtp.rules import RelayRules
from relay.smtp.server import SmtpServer

UNTRUSTED = "127.0.0.2"  # only 127.0.0.1/32 is trusted in these tests


def make_config(tmp_path: Path, server: dict[str, Any] | None = None, **sections: Any) -> Config:
    doc: dict[str, Any] = {
        "server": {"hostname": "mx.test", **(server or {})},
        "relay": {"trusted_networks": ["127.0.0.1/32"], "local_domains": ["example.org"]},
        "aliases": {
            "info@example.org": ["alice@example.com", "bob@example.net"],
            "postmaster@example.org": ["admin@example.com"],
        },
        "storage": {"path": str(tmp_path / "relay.sqlite3")},
    }
    doc.update(sections)
    cfg = parse_config(doc, tmp_path / "config.toml")
    return dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, listen=(HostPort("127.0.0.1", 0),))
    )


class Recorder:
    """A submit function that records what it is given."""

    def __init__(self, behaviour: Callable[[bytes], Awaitable[str]] | None = None) -> None:
        self.calls: list[tuple[ConnInfo, Envelope, bytes]] = []
        self.behaviour = behaviour

    async def __call__(self, conn: ConnInfo, env: Envelope, data: bytes) -> str:
        self.calls.append((conn, env, data))
        if self.behaviour is not None:
            return await self.behaviour(data)
        return f"2.0.0 Ok: queued as Q{len(self.calls)}"


@asynccontextmanager
async def running(
    config: Config, recorder: Recorder | None = None, **kwargs: Any
) -> AsyncIterator[tuple[SmtpServer, Recorder, int]]:
    rec = recorder or Recorder()
    kwargs.setdefault("free_space", lambda: 10**12)
    server = SmtpServer(config, rec, RelayRules(config), **kwargs)
    await server.start()
    try:
        yield server, rec, server.bound[0][1]
    finally:
        await server.stop(grace=0.5)


class RawClient:
    """Bytes in, replies out: for what well-behaved clients never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, source: str = "127.0.0.1") -> RawClient:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        return cls(r, w)

    async def reply(self, timeout: float = 5.0) -> str:
        """One (possibly multi-line) reply, lines joined with newlines; '' on EOF."""
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    return "\n".join(lines)
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line)
                if len(line) < 4 or line[3] != "-":
                    return "\n".join(lines)

    async def no_reply(self, wait: float) -> bool:
        """True when nothing arrives within ``wait`` seconds."""
        try:
            async with asyncio.timeout(wait):
                data = await self.reader.read(1)
        except TimeoutError:
            return True
        return data == b""  # EOF is not a reply either, but callers check closed()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def cmd(self, line: str | bytes) -> str:
        data = line if isinstance(line, bytes) else line.encode()
        self.writer.write(data + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (after any remaining output)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(4096):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def greet(self, helo: str = "client.test") -> None:
        banner = await self.reply()
        assert banner.startswith("220 "), banner
        ehlo = await self.cmd(f"EHLO {helo}")
        assert ehlo.startswith("250"), ehlo

    async def start_mail(self, rcpt: str = "info@example.org", sender: str = "a@b.test") -> None:
        assert (await self.cmd(f"MAIL FROM:<{sender}>")).startswith("250 ")
        assert (await self.cmd(f"RCPT TO:<{rcpt}>")).startswith("250 ")
        assert (await self.cmd("DATA")).startswith("354 ")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


MESSAGE = b"From: a@b.test\r\nTo: info@example.org\r\nSubject: t\r\n\r\nhello\r\n"
