"""Threats row 10, end to end: a receiving MTA that answers 552 "too many recipients"
after N RCPTs. RFC 5321 section 4.5.3.1.10: the client SHOULD treat that 552 as
temporary, so the first N are delivered, the rest deferred (452 4.5.3, the reason in the
queue) and delivered on the next attempt; nothing bounces."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from relay.app import RelayApp
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.model import RecipientState
from relay.queue.spool import Spool
from tests.labutil import base_doc, message, send, write_config

MX_IP = "127.0.0.81"
LIMIT = 3


class Limited:
    """aiosmtpd handler: at most LIMIT recipients per transaction, then 552 (RFC 821)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, ...]] = []
        self.refused: list[str] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= LIMIT:
            self.refused.append(address)
            return "552 5.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(tuple(envelope.rcpt_tos))
        return "250 2.0.0 queued"


async def test_552_too_many_recipients_defers_the_rest_and_sends_them_next(
    tmp_path: Path,
) -> None:
    handler = Limited()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="mx.many.test", decode_data=False), MX_IP, 0
    )
    port = server.sockets[0].getsockname()[1]
    zone = Zone()
    zone.add("many.test", "MX", (10, "mx.many.test"))
    zone.add("mx.many.test", "A", MX_IP)
    dns = LabDnsServer(zone).start()
    app: RelayApp | None = None
    rcpts = [f"u{i}@many.test" for i in range(5)]
    try:
        doc = base_doc(tmp_path, dns.address, port)
        doc["delivery"].update({"retry_first": 1, "retry_jitter": 0})
        app = RelayApp(write_config(tmp_path / "config.toml", doc), poll_interval=0.05)
        await app.start()
        host, rport = app.bound[0]
        errors, _ = await send(host, rport, "alice@sender.test", rcpts, message(to=rcpts[0]))
        assert errors == {}
        spool = Spool(app.store)

        async def states() -> dict[str, Any]:
            return {r.address: r for m in await spool.list() for r in m.recipients}

        # first attempt: LIMIT delivered in one transaction, the rest deferred, not failed
        async with asyncio.timeout(10):
            while True:
                rows = await states()
                held = {
                    a: r
                    for a, r in rows.items()
                    if r.state is not RecipientState.DELIVERED and r.attempts
                }
                if handler.messages and held:
                    break
                await asyncio.sleep(0.02)
        assert handler.messages == [tuple(rcpts[:LIMIT])]
        assert set(held) == set(rcpts[LIMIT:])
        for r in held.values():
            assert r.state is RecipientState.DEFERRED, r
            assert r.last_reply.startswith("452 4.5.3 Too many recipients"), r.last_reply
            assert "RFC 5321 4.5.3.1.10" in r.last_reply

        # the next attempt (retry_first = 1 s) delivers the rest; the queue empties
        async with asyncio.timeout(10):
            while len(handler.messages) < 2 or any(
                r.state is not RecipientState.DELIVERED for r in (await states()).values()
            ):
                await asyncio.sleep(0.05)
        assert handler.messages == [tuple(rcpts[:LIMIT]), tuple(rcpts[LIMIT:])]
        assert handler.refused == rcpts[LIMIT:]
    finally:
        if app is not None:
            await app.stop(grace=2)
        server.close()
        dns.stop()
