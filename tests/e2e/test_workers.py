"""Two worker processes share the listen socket and the store: every message accepted is
delivered exactly once (new mail is claimed in flight by the worker that accepted it; only
the leader loads from the store)."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.e2e.test_crash import free_port, wait_listening
from tests.labutil import base_doc, message, write_config

pytestmark = pytest.mark.slow


async def test_two_workers_deliver_each_message_once(tmp_path: Path) -> None:
    zone = Zone()
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    with LabDnsServer(zone) as dns:
        async with LabMta("127.0.0.2", 0) as mx:
            doc = base_doc(tmp_path, dns.address, mx.port)
            port = free_port()
            doc["server"].update({"listen": [f"127.0.0.1:{port}"], "workers": 2})
            cfg = tmp_path / "config.toml"
            write_config(cfg, doc)
            proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                stdout=(tmp_path / "relay.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            try:
                await wait_listening(port)
                children = subprocess.run(
                    ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
                ).stdout.split()
                assert len(children) == 2  # two workers
                sem = asyncio.Semaphore(10)

                async def one(i: int) -> None:
                    async with sem:
                        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
                        async with client:
                            await client.sendmail(
                                "a@sender.test",
                                ["b@dest.test"],
                                message(msgid=f"<w{i}@sender.test>"),
                            )

                await asyncio.gather(*(one(i) for i in range(150)))
                await mx.wait_for(150, timeout=30)
                await asyncio.sleep(1.0)  # would a second copy still arrive?
                ids = collections.Counter(
                    m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in mx.messages
                )
                assert len(ids) == 150 and max(ids.values()) == 1
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
