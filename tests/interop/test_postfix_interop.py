"""Interop with a real Postfix (Debian package): Postfix submits to the relay, and the
relay delivers to Postfix over STARTTLS.

    aiosmtplib --SMTP--> Postfix "out" (127.0.0.32) --SMTP+STARTTLS--> relay (127.0.0.31)
        --MX lookup on the lab DNS, SMTP+STARTTLS--> Postfix "mx" (127.0.0.33, trustme cert)
        --SMTP--> LabMta recording sink (127.0.0.34)

The sink sees the exact bytes, so the test reads the trace headers: Postfix "mx" says it
received the message from our relay over TLS, our relay says it received it from Postfix
"out" over TLS, and the body arrives intact.
"""

from __future__ import annotations

import asyncio
import email
import shutil
from email.message import Message
from pathlib import Path

import pytest
import trustme

from relay.app import RelayApp
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from relay.lab.postfix import PostfixInstance, PostfixSpec, free_port
from tests.interop.postfix_lab import shared_tempdir, start_postfix, stop_postfix, write_cert
from tests.labutil import base_doc, message, send, write_config

pytestmark = [pytest.mark.postfix, pytest.mark.slow, pytest.mark.timeout(120)]

RELAY_IP = "127.0.0.31"
PF_OUT_IP = "127.0.0.32"
PF_MX_IP = "127.0.0.33"
SINK_IP = "127.0.0.34"


def _received(msg: Message) -> list[str]:
    return [" ".join(str(h).split()) for h in msg.get_all("Received", [])]


async def test_postfix_to_relay_to_postfix_over_starttls(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    certs = shared_tempdir("pf-certs-")
    mx_cert, mx_key = write_cert(ca, "mx.dest.test", certs)
    relay_cert, relay_key = write_cert(ca, "relay.lab.test", tmp_path)

    zone = Zone()
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", PF_MX_IP)
    dns = LabDnsServer(zone).start()
    sink = await LabMta(SINK_IP, 0, hostname="sink.lab.test").start()
    app: RelayApp | None = None
    instances: list[PostfixInstance] = []
    try:
        # The receiving MX: Postfix with STARTTLS, relaying dest.test on to the sink.
        mx_port = free_port(PF_MX_IP)
        pf_mx = await start_postfix(
            PostfixSpec(
                listen=(PF_MX_IP, mx_port),
                nexthop=(SINK_IP, sink.port),
                hostname="mx.dest.test",
                relay_domains=("dest.test",),
                mynetworks=("127.0.0.1/32",),
                tls_cert=mx_cert,
                tls_key=mx_key,
                smtp_tls_security_level="none",
            ),
            name="mx",
        )
        instances.append(pf_mx)

        # Our relay: trusted Postfix "out", STARTTLS offered, delivers on the MX's port.
        relay_port = free_port(RELAY_IP)
        doc = base_doc(tmp_path, dns.address, mx_port)
        doc["server"].update(
            {
                "listen": [f"{RELAY_IP}:{relay_port}"],
                "tls_cert": str(relay_cert),
                "tls_key": str(relay_key),
            }
        )
        doc["relay"]["trusted_networks"] = ["127.0.0.0/8"]
        doc["delivery"]["ca_file"] = str(ca_file)
        app = RelayApp(write_config(tmp_path / "config.toml", doc), poll_interval=0.05)
        await app.start()

        # The submitting Postfix: everything to our relay, STARTTLS when offered.
        out_port = free_port(PF_OUT_IP)
        pf_out = await start_postfix(
            PostfixSpec(
                listen=(PF_OUT_IP, out_port),
                nexthop=(RELAY_IP, relay_port),
                hostname="out.sender.test",
                smtp_tls_security_level="may",
            ),
            name="out",
        )
        instances.append(pf_out)

        body = "interop body line\r\n.leading dot line\r\nlast line"
        data = message(subject="interop", body=body, to="bob@dest.test", msgid="<io1@sender.test>")
        errors, reply = await send(
            PF_OUT_IP, out_port, "alice@sender.test", ["bob@dest.test"], data
        )
        assert errors == {} and reply.startswith("2.0.0 Ok: queued"), (errors, reply)

        try:
            got = await sink.wait_for(1, timeout=60)
        except TimeoutError:
            pytest.fail(
                "nothing reached the sink\n--- out ---\n"
                + pf_out.log_text()[-3000:]
                + "\n--- mx ---\n"
                + pf_mx.log_text()[-3000:]
            )
        await asyncio.sleep(0.2)  # a duplicate would arrive now
        assert len(sink.messages) == 1
        rec = got[0]
        assert rec.mail_from == "alice@sender.test"
        assert rec.rcpt_tos == ("bob@dest.test",)
        msg = email.message_from_bytes(rec.data)
        assert msg["Message-ID"] == "<io1@sender.test>"
        assert msg["Subject"] == "interop"
        assert rec.data.endswith(body.encode() + b"\r\n")

        hops = _received(msg)
        # Newest first: Postfix mx (from our relay), our relay (from Postfix out),
        # Postfix out (from the test client).
        assert len(hops) == 3, hops
        mx_hop, relay_hop, out_hop = hops
        assert "by mx.dest.test (Postfix)" in mx_hop, mx_hop
        assert "from relay.lab.test" in mx_hop, mx_hop  # our EHLO name
        assert "(using TLSv1.3 with cipher" in mx_hop, mx_hop
        assert "with ESMTPS" in mx_hop, mx_hop
        assert "by relay.lab.test (relay)" in relay_hop, relay_hop
        assert "from out.sender.test" in relay_hop, relay_hop
        assert "(using TLSv1.3 with cipher" in relay_hop and "with ESMTPS" in relay_hop, relay_hop
        assert "by out.sender.test (Postfix)" in out_hop, out_hop

        # Postfix's own log agrees: the relay's TLS session, and delivered.
        out_log = pf_out.log_text()
        assert f"Trusted TLS connection established to {RELAY_IP}" in out_log or (
            f"TLS connection established to {RELAY_IP}" in out_log
        ), out_log[-2000:]
        assert "status=sent" in out_log
        mx_log = pf_mx.log_text()
        assert "TLS connection established from" in mx_log, mx_log[-2000:]
        assert "status=sent" in mx_log
    finally:
        if app is not None:
            await app.stop(grace=2)
        for pf in instances:
            await stop_postfix(pf)
        await sink.stop()
        dns.stop()
        shutil.rmtree(certs, ignore_errors=True)


def test_benchmark_runs_both_systems_without_loss(tmp_path: Path) -> None:
    """bench/run.py end to end with a tiny load: both systems accept and deliver every
    message exactly once, and the JSON report has the figures the docs quote."""
    import json

    from bench.run import main as bench_main

    out = tmp_path / "bench.json"
    code = bench_main(
        ["--messages", "60", "--warmup", "10", "--clients", "5", "--distinct", "5"]
        + ["--relay-log-level", "warning", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert code == 0, report
    for name in ("relay", "postfix"):
        r = report["results"][name]
        assert (r["accepted"], r["delivered"], r["failed"], r["duplicates"]) == (60, 60, 0, 0)
        assert r["delivered_per_s"] > 0 and r["cpu_ms_per_msg"] > 0
        assert r["latency_ms"]["p99"] >= r["latency_ms"]["p50"] > 0
        assert r["peak_rss_mib"] > 0
    assert report["results"]["postfix"]["peak_processes"] > 3  # master, qmgr, smtpd, ...
    assert report["ratio_delivered"] > 0
