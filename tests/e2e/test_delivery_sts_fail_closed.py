"""End to end: MTA-STS fails closed when the policy cache cannot be read (RFC 8461 5).

    relay (in-process, real store) --SMTP--> StripProxy 127.0.0.72 (the attacker: it
        rewrites STARTTLS away) --> LabMta 127.0.0.71 (offers STARTTLS, good certificate)

``enforced.test`` has an ``enforce`` policy in the relay's durable cache; the attacker
also blocks the policy host (nothing listens on mta-sts.enforced.test). Then reads of
the cache fail with a real SQLite error (the cache table is gone from under the relay:
the read raises ``sqlite3.OperationalError`` inside ``Store.read`` -> ``StoreError``).
The old code read that as "no policy" and sent the message in clear through the
stripper. Now the recipient stays queued, deferred with 4.7.0 and the reason, and the
attacker's listener never sees a connection, let alone MAIL/RCPT/DATA.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import trustme

from relay.app import RelayApp
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from relay.lab.postfix import free_port
from relay.lab.strip import StripProxy
from relay.model import RecipientState
from relay.mtasts.cache import CachedPolicy, PolicyCache
from relay.mtasts.policy import parse_policy
from relay.queue.spool import Spool
from tests.labutil import base_doc, message, send, write_config

MX_IP = "127.0.0.71"
STRIP_IP = "127.0.0.72"
POLICY_IP = "127.0.0.73"  # nothing listens there: the attacker blocks the policy host
POLICY = "version: STSv1\nmode: enforce\nmx: mx.enforced.test\nmax_age: 86400\n"


class RecordingStrip(StripProxy):
    """The lab's STARTTLS stripper, keeping every byte the relay sends through it."""

    def __init__(self, upstream: tuple[str, int], listen: tuple[str, int]) -> None:
        super().__init__(upstream, listen)
        self.from_client = bytearray()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        real_read = reader.readuntil

        async def readuntil(separator: bytes = b"\n") -> bytes:
            line = await real_read(separator)
            self.from_client.extend(line)
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign]
        await super()._handle(reader, writer)


async def test_unreadable_cache_under_enforce_keeps_the_message_queued(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.enforced.test").configure_cert(ctx)
    mta = await LabMta(MX_IP, 0, tls_context=ctx, hostname="mx.enforced.test").start()
    strip = await RecordingStrip((MX_IP, mta.port), (STRIP_IP, mta.port)).start()
    zone = Zone()
    zone.add("enforced.test", "MX", (10, "mx.enforced.test"))
    zone.add("mx.enforced.test", "A", STRIP_IP)
    zone.add("_mta-sts.enforced.test", "TXT", "v=STSv1; id=e1;")
    zone.add("mta-sts.enforced.test", "A", POLICY_IP)
    dns = LabDnsServer(zone).start()
    app: RelayApp | None = None
    try:
        doc = base_doc(
            tmp_path,
            dns.address,
            mta.port,
            mta_sts={"enabled": True, "https_port": free_port(POLICY_IP), "fetch_timeout": 2},
            http={"allow_private_addresses": True},
        )
        doc["delivery"]["ca_file"] = str(ca_file)
        app = RelayApp(write_config(tmp_path / "config.toml", doc), poll_interval=0.05)
        await app.start()
        # the enforce policy learnt on an earlier contact, in the durable cache
        cache = PolicyCache(app.store)
        now = app.clock()
        pol = parse_policy(POLICY)
        await cache.put(CachedPolicy("enforced.test", "e1", pol, now, now, now + 86400))
        assert (await cache.get("enforced.test")) is not None
        # the fault: every read of the policy cache now fails inside SQLite
        await app.store.write(
            lambda c: c.execute("ALTER TABLE mtasts_policy RENAME TO mtasts_policy_gone")
        )

        host, port = app.bound[0]
        errors, _ = await send(
            host, port, "alice@sender.test", ["bob@enforced.test"], message(to="bob@enforced.test")
        )
        assert errors == {}
        spool = Spool(app.store)
        async with asyncio.timeout(15):
            while True:
                rows = [r for m in await spool.list() for r in m.recipients]
                if rows and rows[0].state is RecipientState.DEFERRED and rows[0].attempts:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a late delivery through the stripper would show now
        (row,) = rows
        assert row.address == "bob@enforced.test"
        reply = row.last_reply
        assert reply.startswith("451 4.7.0 TLS policy of enforced.test unavailable"), reply
        assert "no such table: mtasts_policy" in reply, reply  # the reason, named
        # nothing reached the attacker: no connection, no MAIL/RCPT/DATA byte
        assert strip.connections == 0 and bytes(strip.from_client) == b""
        for verb in (b"MAIL", b"RCPT", b"DATA"):
            assert verb not in bytes(strip.from_client)
        assert mta.messages == [] and mta.connections == 0
    finally:
        if app is not None:
            await app.stop(grace=2)
        await strip.stop()
        await mta.stop()
        dns.stop()
