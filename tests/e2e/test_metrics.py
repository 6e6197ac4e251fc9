"""/metrics and /health on `relay serve` with two workers: after an end-to-end run the
counters equal what happened (accepted, delivered, bounced, TLS outcomes), summed across
the workers, in text prometheus_client's parser reads."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiosmtplib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.e2e.test_crash import free_port, wait_listening
from tests.e2e.test_workers import _wait_children
from tests.labutil import base_doc, message, write_config

pytestmark = pytest.mark.slow


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_what_happened_across_workers(tmp_path: Path) -> None:
    zone = Zone()
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    with LabDnsServer(zone) as dns:
        async with LabMta("127.0.0.2", 0) as mx:
            mx.refuse_rcpt("gone@dest.test", "550 5.1.1 no such user")
            doc = base_doc(tmp_path, dns.address, mx.port)
            port, http = free_port(), free_port()
            doc["server"].update({"listen": [f"127.0.0.1:{port}"], "workers": 2})
            doc["http_server"] = {"listen": [f"127.0.0.1:{http}"]}
            cfg = tmp_path / "config.toml"
            write_config(cfg, doc)
            proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                stdout=(tmp_path / "relay.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            try:
                await wait_listening(port)
                await _wait_children(proc.pid, 2)
                for _ in range(100):  # the leader's HTTP listener
                    try:
                        if (await asyncio.to_thread(_get, f"http://127.0.0.1:{http}/health"))[0]:
                            break
                    except OSError:
                        await asyncio.sleep(0.1)
                for i in range(8):  # connections spread over both workers
                    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
                    async with client:
                        rcpts = ["b@dest.test"] + (["gone@dest.test"] if i == 0 else [])
                        await client.sendmail(
                            "a@sender.test", rcpts, message(msgid=f"<m{i}@sender.test>")
                        )
                await mx.wait_for(8, timeout=30)
                await asyncio.sleep(1.0)  # the bounce for gone@ is written and tried
                status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{http}/metrics")
                assert status == 200
                got = _samples(text)
                accepted = got[
                    ("relay_smtp_messages_total", (("code", "250"), ("outcome", "accepted")))
                ]
                assert accepted == 8
                assert got[("relay_smtp_sessions_total", ())] >= 8  # + wait_listening's probe
                delivered = got[("relay_delivery_recipients_total", (("result", "delivered"),))]
                failed = got[("relay_delivery_recipients_total", (("result", "failed"),))]
                # gone@ (550), and its DSN to sender.test, a domain that does not exist
                assert failed == 2 and delivered == 8
                assert got[("relay_smtp_accept_seconds_count", ())] == 8
                assert got[("relay_store_commit_seconds_count", ())] >= 8
                tls = {k: v for k, v in got.items() if k[0] == "relay_tls_outcomes_total"}
                assert tls and all(
                    dict(k[1])
                    == {"result": "starttls-not-supported", "policy_type": "no-policy-found"}
                    for k in tls
                )
                for state in ("queued", "inflight", "deferred"):
                    assert got[("relay_queue_recipients", (("state", state),))] == 0
                # no address or domain from the internet in any label
                assert "dest.test" not in text and "sender.test" not in text
                status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{http}/health")
                assert status == 200 and json.loads(body)["status"] == "ok"
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
