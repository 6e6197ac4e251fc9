"""`relay serve` on uvloop (`[server] event_loop = "uvloop"`): a real subprocess takes a
message over STARTTLS (aiosmtpd's TLS upgrade on uvloop's transports) and relays it over
STARTTLS (aiosmtplib) to an MX found through the lab DNS server (dnspython on uvloop), then
stops on SIGTERM; with one process and with two workers."""

from __future__ import annotations

import json
import signal
import ssl
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.e2e.test_crash import free_port, start_relay, wait_listening
from tests.labutil import base_doc, message, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", [1, 2])
async def test_uvloop_relays_over_starttls_both_ways(tmp_path: Path, workers: int) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    relay_cert = ca.issue_cert("relay.lab.test", "127.0.0.1")
    cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
    relay_cert.cert_chain_pems[0].write_to_path(str(cert))
    relay_cert.private_key_pem.write_to_path(str(key))
    mx_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.dest.test").configure_cert(mx_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    zone = Zone()
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    relay_port = free_port()
    with LabDnsServer(zone) as dns:
        async with LabMta("127.0.0.2", 0, tls_context=mx_ctx, hostname="mx.dest.test") as mx:
            doc = base_doc(tmp_path, dns.address, mx.port)
            doc["server"].update(
                {
                    "listen": [f"127.0.0.1:{relay_port}"],
                    "tls_cert": str(cert),
                    "tls_key": str(key),
                    "event_loop": "uvloop",
                    "workers": workers,
                }
            )
            doc["delivery"]["ca_file"] = str(ca_file)
            doc["logging"]["level"] = "info"
            cfg = tmp_path / "config.toml"
            write_config(cfg, doc)
            log = tmp_path / "relay.log"
            proc = start_relay(cfg, log)
            try:
                await wait_listening(relay_port)
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=relay_port,
                    start_tls=True,
                    tls_context=client_ctx,
                    timeout=10,
                )
                async with client:
                    assert client.is_connected and client.get_transport_info("sslcontext")
                    errors, reply = await client.sendmail(
                        "alice@sender.test", ["bob@dest.test"], message()
                    )
                assert errors == {} and "queued as" in reply
                [got] = await mx.wait_for(1, timeout=20)
                assert got.rcpt_tos == ("bob@dest.test",)
                assert got.tls_version in ("TLSv1.2", "TLSv1.3")  # outbound STARTTLS
                received = got.data.split(b"\r\n\r\n")[0]
                assert b"with ESMTPS" in received  # inbound was over TLS
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    started = [
        line
        for line in log.read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "started"
    ]
    assert len(started) == workers
    assert all(json.loads(line)["event_loop"] == "uvloop" for line in started)
