"""Lab for delivery tests: the real lab DNS server, a trustme CA, and receiving MTAs
(aiosmtpd) on 127.0.0.2, .3, ... all on one ephemeral port (``[delivery] port``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP

from relay.config import Config, DeliveryConfig, ServerConfig
from relay.dns import DnspythonResolver
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.model import TlsOutcome
from tests.labutil import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    conn: int  # id of the SMTP connection that carried it
    tls_version: str | None
    helo: str = ""
    peer_ip: str = ""


@dataclass
class Recorder:
    """aiosmtpd handler: records messages; rcpt_replies maps an address to its reply."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    data_commands: int = 0
    delay: float = 0.0
    fail_mail_on_reuse: bool = False  # 421 to a second MAIL on one connection
    mails_per_conn: dict[int, int] = field(default_factory=dict)
    active: int = 0
    max_active: int = 0

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        seen = self.mails_per_conn.get(id(server), 0)
        self.mails_per_conn[id(server)] = seen + 1
        if self.fail_mail_on_reuse and seen:
            return "421 4.3.2 closing this connection"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_commands += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        if self.data_reply:
            return self.data_reply
        tls = None
        if session.ssl and session.ssl.get("ssl_object") is not None:
            tls = session.ssl["ssl_object"].version()
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                id(server),
                tls,
                session.host_name or "",
                session.peer[0] if session.peer else "",
            )
        )
        return "250 2.0.0 queued"


class MxServer:
    """One receiving MTA on (ip, port)."""

    def __init__(
        self, ip: str, port: int, name: str, tls: ssl.SSLContext | None, recorder: Recorder
    ) -> None:
        self.ip = ip
        self.port = port
        self.name = name
        self.tls = tls
        self.recorder = recorder
        self.connections = 0
        self._server: asyncio.Server | None = None

    def _factory(self) -> SMTP:
        outer = self

        class CountingSMTP(SMTP):  # type: ignore[misc]
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if self._original_transport is None and self.transport is None:
                    outer.connections += 1
                super().connection_made(transport)

        return CountingSMTP(
            self.recorder,
            hostname=self.name,
            tls_context=self.tls,
            require_starttls=False,
            enable_SMTPUTF8=True,
            decode_data=False,
        )

    async def start(self) -> MxServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host=self.ip, port=self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


class MxLab:
    """Lab DNS + CA + MX servers; ``close()`` stops everything."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()  # not trusted by the relay
        self.ca_file = tmp / "lab-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.zone = Zone()
        self.dns = self._dns_server()
        self.port = free_port()
        self.servers: list[MxServer] = []
        self._next_ip = 2
        self.outcomes: list[TlsOutcome] = []
        self.closers: list[Any] = []

    def _dns_server(self) -> LabDnsServer:
        # UDP gets an ephemeral port and TCP must bind the same one: retry on a clash
        for _ in range(10):
            try:
                return LabDnsServer(self.zone).start()
            except OSError:
                continue
        return LabDnsServer(self.zone).start()

    def next_ip(self) -> str:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        return ip

    def server_tls(self, name: str, cert: str) -> ssl.SSLContext | None:
        """cert: good | expired | wrong-name | unknown-ca | tls11 | none."""
        if cert == "none":
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        now = dt.datetime.now(dt.UTC)
        if cert == "good":
            leaf = self.ca.issue_cert(name)
        elif cert == "expired":
            leaf = self.ca.issue_cert(
                name, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
            )
        elif cert == "wrong-name":
            leaf = self.ca.issue_cert("somewhere-else.lab.test")
        elif cert == "unknown-ca":
            leaf = self.other_ca.issue_cert(name)
        elif cert == "tls11":
            leaf = self.ca.issue_cert(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ssl.TLSVersion.TLSv1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        else:
            raise ValueError(cert)
        leaf.configure_cert(ctx)
        return ctx

    async def add_server(
        self, name: str, cert: str = "good", ip: str | None = None, recorder: Recorder | None = None
    ) -> MxServer:
        ip = ip or self.next_ip()
        srv = MxServer(ip, self.port, name, self.server_tls(name, cert), recorder or Recorder())
        await srv.start()
        self.servers.append(srv)
        return srv

    async def add_mx(
        self, domain: str, name: str, cert: str = "good", pref: int = 10, **kw: Any
    ) -> MxServer:
        """A receiving MTA for ``domain`` at MX ``name`` (A record to its address)."""
        srv = await self.add_server(name, cert, **kw)
        self.zone.add(domain, "MX", (pref, name))
        self.zone.set(name, "A", [srv.ip])
        return srv

    def config(self, **delivery: Any) -> Config:
        opts: dict[str, Any] = {
            "port": self.port,
            "ca_file": self.ca_file,
            "connect_timeout": 2.0,
            "attempt_timeout": 10.0,
        }
        opts.update(delivery)
        return Config(
            path=self.tmp / "config.toml",
            server=ServerConfig(hostname="relay.lab.test"),
            delivery=DeliveryConfig(**opts),
        )

    def resolver(self, timeout: float = 3.0, tries: int = 2) -> DnspythonResolver:
        return DnspythonResolver([self.dns.address], timeout=timeout, tries=tries)

    def sink(self, outcome: TlsOutcome) -> None:
        self.outcomes.append(outcome)

    async def close(self) -> None:
        for c in self.closers:
            await c()
        for s in self.servers:
            await s.stop()
        # both dnslib servers poll for shutdown every 0.5 s: stop them side by side
        servers = [self.dns._udp.server, self.dns._tcp.server]
        await asyncio.gather(*(asyncio.to_thread(s.shutdown) for s in servers))
        for s in servers:
            s.server_close()
