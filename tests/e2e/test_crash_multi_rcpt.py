"""threats.md row 24: kill -9 during a multi-recipient delivery sends no delivered recipient
again.

A real `relay serve` and three messages, each to one recipient at a.test and one at b.test
(two transactions per message, one per domain). a.test's MTA accepts at once; b.test's MTA
stalls in DATA. Once a.test has every message, the relay is killed with SIGKILL while the
b.test transactions are in flight. After a restart (b.test now answering) every b.test
recipient arrives and no a.test recipient arrives a second time: each domain's outcome is
durable as soon as it is known, not when the whole message is done.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta, _Handler
from tests.e2e.test_crash import free_port, wait_listening
from tests.e2e.test_crash_dsn import start
from tests.labutil import base_doc, message, send, write_config

pytestmark = pytest.mark.slow


class StallingMta(LabMta):
    """While ``stalled``, DATA never gets its reply (and nothing is recorded)."""

    stalled = True
    stalls = 0

    def _factory(self) -> SMTP:
        proto = super()._factory()
        mta = self

        class Stall(_Handler):
            async def handle_DATA(self, server: SMTP, session: Session, env: Envelope) -> str:
                if mta.stalled:
                    mta.stalls += 1
                    await asyncio.Event().wait()  # until the connection is torn down
                return await super().handle_DATA(server, session, env)

        stall = Stall(self)
        proto.event_handler = stall
        proto._handle_hooks["DATA"] = stall.handle_DATA  # aiosmtpd binds hooks at init
        return proto


def delivered(store: Path, domain: str) -> int:
    conn = sqlite3.connect(store)
    try:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM queue_recipients WHERE state='delivered' AND address LIKE ?",
                (f"%@{domain}",),
            ).fetchone()[0]
        )
    finally:
        conn.close()


def ids(mta: LabMta) -> collections.Counter[bytes]:
    return collections.Counter(
        m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in mta.messages
    )


async def test_kill_9_mid_delivery_resends_only_the_one_in_flight(tmp_path: Path) -> None:
    zone = Zone()
    zone.add("a.test", "MX", (10, "mx.a.test"))
    zone.add("mx.a.test", "A", "127.0.0.2")
    zone.add("b.test", "MX", (10, "mx.b.test"))
    zone.add("mx.b.test", "A", "127.0.0.3")
    relay_port = free_port()
    n = 3
    with LabDnsServer(zone) as dns:
        async with LabMta("127.0.0.2", 0, hostname="mx.a.test") as mx_a:
            async with StallingMta("127.0.0.3", mx_a.port, hostname="mx.b.test") as mx_b:
                doc = base_doc(tmp_path, dns.address, mx_a.port)
                doc["server"].update({"listen": [f"127.0.0.1:{relay_port}"], "workers": 1})
                cfg = tmp_path / "config.toml"
                write_config(cfg, doc)
                store = Path(doc["storage"]["path"])
                log = tmp_path / "relay.log"
                proc = start(cfg, log)
                try:
                    await wait_listening(relay_port)
                    for i in range(n):
                        errors, _ = await send(
                            "127.0.0.1",
                            relay_port,
                            "alice@sender.test",
                            [f"x{i}@a.test", f"y{i}@b.test"],
                            message(msgid=f"<m{i}@sender.test>"),
                        )
                        assert errors == {}
                    await mx_a.wait_for(n, timeout=20)
                    deadline = time.monotonic() + 10  # a.test durable, b.test all in DATA
                    while (
                        delivered(store, "a.test") < n or mx_b.stalls < n
                    ) and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    assert mx_b.stalls == n and mx_b.messages == []  # b.test in flight
                    proc.send_signal(signal.SIGKILL)
                    assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL

                    mx_b.stalled = False
                    proc = start(cfg, log)
                    await wait_listening(relay_port)
                    await mx_b.wait_for(n, timeout=20)
                    deadline = time.monotonic() + 1.5  # would a.test get a second copy?
                    while time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    want = {f"<m{i}@sender.test>".encode() for i in range(n)}
                    assert ids(mx_b) == collections.Counter(want)
                    assert ids(mx_a) == collections.Counter(want), "a.test was sent again"
                    proc.send_signal(signal.SIGTERM)
                    assert await asyncio.to_thread(proc.wait, 20) == 0
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
