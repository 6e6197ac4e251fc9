"""Crash safety: mail acknowledged with 250 survives kill -9 of the relay process.

A real `relay serve` subprocess, a real lab DNS server, a receiving MTA that is down while
messages are accepted. The relay is killed with SIGKILL (once at rest, once in the middle
of a stream of submissions), restarted, the receiver brought up: every message that got
a 250 is delivered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.labutil import base_doc, free_port, message, write_config

pytestmark = pytest.mark.slow


def start_relay(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def wait_listening(port: int, timeout: float = 20) -> None:
    """Until the relay answers with its 220 banner (not just a bound socket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            try:
                banner = await asyncio.wait_for(r.readline(), 2)
            finally:
                w.close()
            if banner.startswith(b"220"):
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("relay did not start")


async def submit(port: int, n: int, tag: str, acked: list[str]) -> None:
    for i in range(n):
        mid = f"<{tag}-{i}@sender.test>"
        try:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5)
            async with client:
                await client.sendmail("alice@sender.test", ["bob@dest.test"], message(msgid=mid))
            acked.append(mid)
        except (aiosmtplib.SMTPException, OSError):
            return  # the relay died under us: this message was not acknowledged


async def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    zone = Zone()
    mx_port = free_port("127.0.0.2")
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    relay_port = free_port()
    with LabDnsServer(zone) as dns:
        doc = base_doc(tmp_path, dns.address, mx_port)
        doc["server"]["listen"] = [f"127.0.0.1:{relay_port}"]
        doc["delivery"].update({"retry_first": 0.5, "retry_max": 1, "retry_jitter": 0.0})
        cfg = tmp_path / "config.toml"
        write_config(cfg, doc)
        log = tmp_path / "relay.log"
        acked: list[str] = []

        proc = start_relay(cfg, log)
        try:
            await wait_listening(relay_port)
            await submit(relay_port, 20, "rest", acked)  # receiver down: all deferred
            assert len(acked) == 20
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

            proc = start_relay(cfg, log)
            await wait_listening(relay_port)
            # The stream is longer than any machine finishes before the kill; the kill
            # comes once 30 of it were acknowledged (by count, not by a sleep that a fast
            # machine outruns), in the middle of the next session.
            stream = asyncio.create_task(submit(relay_port, 100_000, "stream", acked))
            deadline = time.monotonic() + 30
            while len(acked) < 50 and time.monotonic() < deadline and not stream.done():
                await asyncio.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            await asyncio.wait_for(stream, 30)
            assert 50 <= len(acked) < 20 + 100_000, "the kill did not land inside the stream"

            async with LabMta("127.0.0.2", mx_port, hostname="mx.dest.test") as mx:
                proc = start_relay(cfg, log)
                await wait_listening(relay_port)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    got = {
                        m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
                        for m in mx.messages
                    }
                    if set(acked) <= got:
                        break
                    await asyncio.sleep(0.2)
                got = {
                    m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode() for m in mx.messages
                }
                missing = set(acked) - got
                assert not missing, (
                    f"{len(missing)} acknowledged messages lost: {sorted(missing)[:5]}"
                )
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0  # SIGTERM drains and exits 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
