"""The harness of the several-nodes tests (issue 14): `relay serve` nodes on one
PostgreSQL (each a subprocess with its own config, node_id and listen port), the lab DNS
zone pointing dest.test at a sink MX on 127.0.0.2, one-message SMTP submissions, a
poll-until helper and direct SQL on the shared database."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncpg
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta, _Handler
from tests.e2e.test_crash import free_port, start_relay, wait_listening
from tests.labutil import base_doc, message, write_config
from tests.pg.pgcluster import PASSWORD

LEASE = 2.0


def mid_of(data: bytes) -> str:
    """The Message-ID header's value of a received message."""
    return data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()


def mids(mx: LabMta) -> list[str]:
    return [mid_of(m.data) for m in mx.messages]


class Sink(LabMta):
    """The receiving MTA of dest.test: ``delay`` seconds before it answers each DATA (so
    deliveries are in flight a while), the first DATA held for ever with ``hold_first``
    (its sender dies before an answer); remembers when each message arrived
    (``arrived_at``: monotonic, the last copy; ``arrivals``: (Message-ID, epoch) each)."""

    def __init__(
        self, host: str, port: int, *, delay: float = 0.0, hold_first: bool = False
    ) -> None:
        super().__init__(host, port, hostname="mx.dest.test")
        self.delay = delay
        self.hold_first = hold_first
        self.holding = False
        self.arrived_at: dict[str, float] = {}
        self.arrivals: list[tuple[str, float]] = []

    def _factory(self) -> SMTP:
        proto = super()._factory()
        mta = self

        class Slow(_Handler):
            async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
                if mta.hold_first and not mta.holding:
                    mta.holding = True
                    await asyncio.sleep(3600)  # the sender dies before an answer
                if mta.delay:
                    await asyncio.sleep(mta.delay)
                mid = mid_of(bytes(envelope.content or b""))
                reply = await super().handle_DATA(server, session, envelope)
                mta.arrived_at[mid] = time.monotonic()
                mta.arrivals.append((mid, time.time()))
                return reply

        handler = Slow(self)
        proto.event_handler = handler
        proto._handle_hooks["DATA"] = handler.handle_DATA  # aiosmtpd binds hooks at init
        return proto


class Node:
    """One `relay serve` process with a config of its own on the shared database."""

    def __init__(self, tmp: Path, name: str, url: str, dns: str, mx_port: int, **over: Any):
        self.name = name
        self.port = free_port()
        doc = base_doc(tmp, dns, mx_port)
        doc["server"].update({"listen": [f"127.0.0.1:{self.port}"], "node_id": name})
        doc["storage"] = {"url": url, "lease": LEASE}
        doc["delivery"].update({"retry_first": 1, "retry_max": 2, "retry_jitter": 0.0})
        for k, v in over.items():
            doc.setdefault(k, {}).update(v)
        self.config = tmp / f"{name}.toml"
        write_config(self.config, doc)
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> Node:
        self.proc = start_relay(self.config, self.log)
        await wait_listening(self.port)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def cli(self, *argv: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "relay", *argv, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout


async def submit(port: int, mid: str, rcpt: str = "bob@dest.test") -> int:
    """Send one message; the code of the reply to DATA (or to the first refusal)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    try:
        async with client:
            await client.sendmail(
                "alice@sender.test", [rcpt], message(msgid=f"<{mid}@sender.test>")
            )
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    return 250


async def until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.05)


async def sql(url: str, query: str, *args: Any) -> list[Any]:
    """Rows of one query on the shared database (the test's own connection)."""
    conn = await asyncpg.connect(url, password=PASSWORD)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@pytest.fixture
def lab_dns() -> Iterator[tuple[str, int]]:
    """The lab DNS server's address and the sink MX's port (dest.test → 127.0.0.2)."""
    zone = Zone()
    mx_port = free_port("127.0.0.2")
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    with LabDnsServer(zone) as dns:
        yield dns.address, mx_port
