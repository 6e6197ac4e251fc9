"""Receiving MTAs for tests and the lab: an aiosmtpd server on a loopback address that
records every transaction (envelope, bytes, TLS in use) and can be scripted to refuse.
With ``dsn=True`` it offers the DSN extension (RFC 3461) and records the parameters it
got (aiosmtpd itself refuses them): RET and ENVID of MAIL, NOTIFY and ORCPT per RCPT.

Runs in the caller's event loop (no thread), so a test can start and stop it directly.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls_version: str | None
    peer: str
    dsn_mail: tuple[str, ...] = ()  # RET=/ENVID= as sent (dsn=True only)
    dsn_rcpt: tuple[tuple[str, ...], ...] = ()  # NOTIFY=/ORCPT= per recipient, as sent


@dataclass
class _Script:
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: str | None = None  # reply to DATA (default 250)
    mail_reply: str | None = None


class _Handler:
    def __init__(self, mta: LabMta) -> None:
        self.mta = mta

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mta.script.mail_reply:
            return self.mta.script.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.mta.script.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.mta.script.data_reply:
            return self.mta.script.data_reply
        tls = None
        ssl_obj = session.ssl
        if ssl_obj is not None:
            tls = ssl_obj.get("version") if isinstance(ssl_obj, dict) else None
        if tls is None and server.transport is not None:
            obj = server.transport.get_extra_info("ssl_object")
            tls = obj.version() if obj is not None else None
        content = envelope.original_content or b""
        dsn_mail: tuple[str, ...] = ()
        dsn_rcpt: tuple[tuple[str, ...], ...] = ()
        if isinstance(server, _DsnSmtp):
            dsn_mail = server.dsn_mail
            dsn_rcpt = tuple(server.dsn_rcpt.get(a, ()) for a in envelope.rcpt_tos)
        self.mta.messages.append(
            Received(
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=content,
                tls_version=tls,
                peer=str(session.peer[0]) if session.peer else "",
                dsn_mail=dsn_mail,
                dsn_rcpt=dsn_rcpt,
            )
        )
        self.mta.arrived.set()
        return "250 2.0.0 Ok: stored"


def _split_dsn(arg: str, keys: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The command argument without the DSN parameters named, and those parameters."""
    kept, found = [], []
    for i, word in enumerate(arg.split(" ")):
        if i and word.split("=", 1)[0].upper() in keys:
            found.append(word)
        else:
            kept.append(word)
    return " ".join(kept), tuple(found)


class _DsnSmtp(SMTP):
    """aiosmtpd with the DSN extension offered: its parameters are taken off the
    commands (and kept) before aiosmtpd, which knows none of them, reads the rest."""

    dsn_mail: tuple[str, ...] = ()
    dsn_rcpt: dict[str, tuple[str, ...]]

    async def smtp_EHLO(self, arg: str) -> None:
        self.dsn_rcpt = {}
        await super().smtp_EHLO(arg)

    async def smtp_MAIL(self, arg: str) -> None:
        arg, self.dsn_mail = _split_dsn(arg, ("RET", "ENVID"))
        self.dsn_rcpt = {}
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        arg, found = _split_dsn(arg, ("NOTIFY", "ORCPT"))
        address = arg.partition(":")[2].strip().split(" ")[0].strip("<>")
        self.dsn_rcpt[address] = found
        await super().smtp_RCPT(arg)


class _DsnHandler(_Handler):
    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]]  # before the last, "250 HELP"


class LabMta:
    """An aiosmtpd receiving MTA on host:port. ``tls_context`` offers STARTTLS."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls_context: ssl.SSLContext | None = None,
        hostname: str = "mx.lab.test",
        dsn: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.hostname = hostname
        self.dsn = dsn
        self.messages: list[Received] = []
        self.arrived = asyncio.Event()
        self.script = _Script()
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._protocols: list[SMTP] = []

    def refuse_rcpt(self, address: str, reply: str) -> None:
        self.script.rcpt_replies[address.lower()] = reply

    def _factory(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {
            "hostname": self.hostname,
            "enable_SMTPUTF8": True,
            "decode_data": False,
        }
        if self.tls_context is not None:
            kwargs["tls_context"] = self.tls_context
            kwargs["require_starttls"] = False
        if self.dsn:
            proto: SMTP = _DsnSmtp(_DsnHandler(self), **kwargs)
        else:
            proto = SMTP(_Handler(self), **kwargs)
        self._protocols.append(proto)
        return proto

    async def start(self) -> LabMta:
        loop = asyncio.get_running_loop()
        factory: Callable[[], SMTP] = self._factory
        self._server = await loop.create_server(factory, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for proto in self._protocols:
                if proto.transport is not None:
                    proto.transport.close()
            self._protocols.clear()
            await self._server.wait_closed()
            self._server = None

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.messages

    async def __aenter__(self) -> LabMta:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
