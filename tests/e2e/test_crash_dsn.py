"""A bounce survives kill -9 between the failure's commit and its DSN.

A real `relay serve`, a real lab DNS server, a receiving MTA that refuses the recipient with
550 and the sender's MTA as the DSN sink. With RELAY_TEST_CRASH_AT=after_fail_commit the
relay SIGKILLs itself right after the failure is durable and before the DSN is queued; the
store then holds the failure owing its DSN. After a restart exactly one DSN reaches the
sender and the queue is empty.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.e2e.test_crash import free_port, wait_listening
from tests.labutil import base_doc, message, send, write_config

pytestmark = pytest.mark.slow


def start(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def rows(store: Path) -> list[tuple[str, str, int]]:
    conn = sqlite3.connect(store)
    try:
        return conn.execute(
            "SELECT address, state, dsn_done FROM queue_recipients ORDER BY address"
        ).fetchall()
    finally:
        conn.close()


async def test_kill_9_between_failure_and_dsn_sends_the_dsn_once(tmp_path: Path) -> None:
    zone = Zone()
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    zone.add("sender.test", "MX", (10, "mx.sender.test"))
    zone.add("mx.sender.test", "A", "127.0.0.3")
    relay_port = free_port()
    with LabDnsServer(zone) as dns:
        async with LabMta("127.0.0.2", 0, hostname="mx.dest.test") as mx:
            mx.refuse_rcpt("gone@dest.test", "550 5.1.1 no such user")
            async with LabMta("127.0.0.3", mx.port, hostname="mx.sender.test") as sink:
                doc = base_doc(tmp_path, dns.address, mx.port)
                doc["server"].update({"listen": [f"127.0.0.1:{relay_port}"], "workers": 1})
                cfg = tmp_path / "config.toml"
                write_config(cfg, doc)
                store = Path(doc["storage"]["path"])
                log = tmp_path / "relay.log"

                proc = start(cfg, log, {"RELAY_TEST_CRASH_AT": "after_fail_commit"})
                try:
                    await wait_listening(relay_port)
                    errors, _ = await send(
                        "127.0.0.1",
                        relay_port,
                        "alice@sender.test",
                        ["gone@dest.test"],
                        message(msgid="<b1@sender.test>"),
                    )
                    assert errors == {}
                    assert await asyncio.to_thread(proc.wait, 20) == -signal.SIGKILL
                    # the failure is durable and owes its DSN; no DSN was queued or sent
                    assert rows(store) == [("gone@dest.test", "failed", 0)]
                    assert sink.messages == []

                    proc = start(cfg, log)
                    await wait_listening(relay_port)
                    await sink.wait_for(1, timeout=20)
                    deadline = time.monotonic() + 1.5  # would a second DSN arrive?
                    while time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    assert len(sink.messages) == 1
                    [dsn] = sink.messages
                    assert dsn.mail_from == "" and dsn.rcpt_tos == ("alice@sender.test",)
                    assert b"Final-Recipient: rfc822; gone@dest.test" in dsn.data
                    assert b"Message-ID: <b1@sender.test>" in dsn.data  # about our message
                    assert rows(store) == []  # the original and the DSN are both done
                    proc.send_signal(signal.SIGTERM)
                    assert await asyncio.to_thread(proc.wait, 20) == 0
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
