"""``RawMx``: a small scriptable SMTP server of our own on 127.0.0.x that offers
PIPELINING and records every chunk it reads, so the tests can see what arrived in one
segment (tests/delivery/test_client_pipelining.py, test_deliver_many.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Stored:
    mail_from: str
    rcpts: list[str]
    data: bytes


@dataclass
class RawMx:
    """A scriptable SMTP server: records chunks read, answers each complete command line
    (the replies to one read go out in one write, as Postfix does, or one at a time with
    ``trickle``)."""

    ip: str
    port: int
    pipelining: bool = True
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str = "250 2.1.0 ok"
    data_354_without_rcpt: bool = False
    trickle: str = ""  # "turn": one reply per loop turn, "ms": one every 2 ms
    # what to do when a line starting with the key arrives: "close" (no reply) or a reply
    # after which the server closes
    on_command: dict[str, str] = field(default_factory=dict)
    on_command_once: bool = True
    mute: bool = False  # answer nothing after EHLO (the test speaks for the server)
    chunks: list[list[bytes]] = field(default_factory=list)  # per connection
    stored: list[Stored] = field(default_factory=list)
    dots_without_rcpt: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> RawMx:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _RawConn(self), host=self.ip, port=self.port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    @property
    def connections(self) -> int:
        return len(self.chunks)


class _RawConn(asyncio.Protocol):
    def __init__(self, mx: RawMx) -> None:
        self.mx = mx
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.in_data = False
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.mx.chunks.append(self.chunks)
        transport.write(b"220 raw.lab.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buf += data
        out: list[bytes] = []
        close = False
        while not close:
            if self.in_data:
                if self.buf.startswith(b".\r\n"):
                    end, body = 3, b""
                else:
                    at = self.buf.find(b"\r\n.\r\n")
                    if at < 0:
                        break
                    end, body = at + 5, self.buf[: at + 2]
                self.buf = self.buf[end:]
                self.in_data = False
                if self.rcpts:
                    assert self.mail_from is not None
                    unstuffed = body.replace(b"\r\n..", b"\r\n.")
                    self.mx.stored.append(Stored(self.mail_from, self.rcpts, unstuffed))
                    out.append(b"250 2.0.0 queued")
                else:
                    self.mx.dots_without_rcpt += 1
                    out.append(b"554 5.5.1 no valid recipients")
                self._reset()
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            self.buf = rest
            reply, close = self._command(line.decode())
            if reply:
                out.append(reply.encode())
        self._write(out, close)

    def _write(self, replies: list[bytes], close: bool) -> None:
        assert self.transport is not None
        transport = self.transport
        if not self.mx.trickle:
            if replies:
                transport.write(b"".join(r + b"\r\n" for r in replies))
            if close:
                transport.close()
            return
        loop = asyncio.get_running_loop()
        if self.mx.trickle == "turn":  # one reply per turn of the event loop

            def one(rest: list[bytes]) -> None:
                if rest:
                    transport.write(rest[0] + b"\r\n")
                    loop.call_soon(one, rest[1:])
                elif close:
                    transport.close()

            one(replies)
            return
        for i, r in enumerate(replies):
            loop.call_later(0.002 * i, transport.write, r + b"\r\n")
        if close:
            loop.call_later(0.002 * len(replies), transport.close)

    def _reset(self) -> None:
        self.mail_from = None
        self.rcpts = []

    def _command(self, line: str) -> tuple[str, bool]:
        mx = self.mx
        for prefix, action in list(mx.on_command.items()):
            if line.upper().startswith(prefix.upper()):
                if mx.on_command_once:
                    del mx.on_command[prefix]
                return ("" if action == "close" else action), True
        verb = line[:4].upper()
        if mx.mute and verb not in ("EHLO", "QUIT"):
            return "", False
        if verb == "EHLO":
            caps = ["raw.lab.test", "SIZE 10000000", "8BITMIME"]
            if mx.pipelining:
                caps.insert(1, "PIPELINING")
            lines = [f"250-{c}" for c in caps[:-1]] + [f"250 {caps[-1]}"]
            return "\r\n".join(lines), False
        if verb == "RSET":
            self._reset()
            return "250 2.0.0 ok", False
        if verb == "MAIL":
            if self.mail_from is not None:
                return "503 5.5.1 nested MAIL command", False
            if mx.mail_reply.startswith("250"):
                self.mail_from = line.split(":", 1)[1].split(">")[0].lstrip("<")
            return mx.mail_reply, False
        if verb == "RCPT":
            if self.mail_from is None:
                return "503 5.5.1 need MAIL command", False
            addr = line.split(":", 1)[1].strip().strip("<>")
            reply = mx.rcpt_replies.get(addr, "250 2.1.5 ok")
            if reply.startswith("250"):
                self.rcpts.append(addr)
            return reply, False
        if verb == "DATA":
            if self.mail_from is None:
                return "503 5.5.1 need RCPT command", False
            if not self.rcpts and not mx.data_354_without_rcpt:
                return "554 5.5.1 no valid recipients", False
            self.in_data = True
            return "354 go ahead", False
        if verb == "QUIT":
            return "221 2.0.0 bye", True
        return "502 5.5.2 what", False
