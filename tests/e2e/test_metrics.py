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
from tests.labutil import base_doc, message, send, write_config

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
                rcpts = {
                    (dict(k[1])["result"], dict(k[1])["domain_class"]): v
                    for k, v in got.items()
                    if k[0] == "relay_delivery_recipients_total" and v
                }
                # gone@ (550), and its DSN to sender.test, a domain that does not exist
                assert rcpts == {
                    ("delivered", "opportunistic"): 8,
                    ("failed", "opportunistic"): 1,
                    ("failed", "unrouted"): 1,
                }
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


POLICY_IP = "127.0.0.8"
STS = "version: STSv1\nmode: testing\nmx: mx.one.test\nmax_age: 86400\n"


def _dns_expected(zone: Zone) -> dict[tuple[str, str], int]:
    """(type, outcome) of every query the lab server answered, from its zone (no CNAMEs,
    no failures set in this lab): the counts the relay's resolver must show."""
    out: dict[tuple[str, str], int] = {}
    with zone.lock:
        for name, qtype in zone.queries:
            recs = zone.records.get(name)
            outcome = (
                "nxdomain"
                if recs is None
                else "ok"
                if any(t == qtype for t, _ in recs)
                else "nodata"
            )
            out[qtype, outcome] = out.get((qtype, outcome), 0) + 1
    return out


async def test_metrics_of_dns_auth_arc_mtasts_and_lists(tmp_path: Path) -> None:
    """A relayed message (SPF fail, DKIM and DMARC pass, sealed) to an MTA-STS domain and
    a post to a list of three members through `relay serve` with two workers: the DNS
    counts are what the lab DNS server answered, one verdict per method and message,
    one ARC seal, one policy fetch (one policy cached), one post and three copies."""
    import ssl

    import trustme

    from relay.auth.dkim import DkimSigner
    from relay.cli import main as cli
    from relay.lab.policyhost import PolicyHost, Site
    from tests.lists.listlab import AUTHOR_IP, LIST, MEMBER_IPS, ListLab, post

    lab = ListLab(tmp_path)
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mta-sts.one.test").configure_cert(ctx)
    lab.zone.add("_mta-sts.one.test", "TXT", "v=STSv1; id=p1;")
    lab.zone.add("mta-sts.one.test", "A", POLICY_IP)
    policy_host = await PolicyHost(
        ctx, (POLICY_IP, 0), sites={"mta-sts.one.test": Site(STS)}
    ).start()
    mtas: dict[str, LabMta] = {}
    mx_port = 0
    for dom, ip in MEMBER_IPS.items():
        mtas[dom] = await LabMta(ip, mx_port, hostname=f"mx.{dom}").start()
        mx_port = mtas[dom].port
    port, http = free_port(), free_port()
    doc = lab.doc(mx_port, smtp_port=port, http_port=http)
    doc["server"]["workers"] = 2
    doc["dns"]["timeout"] = 10  # no retry by the resolver the lab server would count twice
    doc["mta_sts"] = {"enabled": True, "https_port": policy_host.port, "fetch_timeout": 5}
    doc["http"] = {"allow_private_addresses": True}
    doc["delivery"]["ca_file"] = str(ca_file)
    cfg = tmp_path / "config.toml"
    write_config(cfg, doc)
    members = ["b@one.test", "c@two.test", "d@three.test"]
    assert cli(["list", "add", LIST, *members, "--config", str(cfg)]) == 0
    with lab.zone.lock:
        lab.zone.queries.clear()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
        stdout=(tmp_path / "relay.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_listening(port)
        await _wait_children(proc.pid, 2)
        signer = DkimSigner("author.test", "s1", lab.author_key)
        # relayed (127.0.0.1 is trusted; SPF fails, DKIM aligns): sealed, to one.test
        relayed = signer.sign(message(frm="alice@author.test", to="bob@one.test"))
        await send("127.0.0.1", port, "alice@author.test", ["bob@one.test"], relayed)
        await mtas["one.test"].wait_for(1, timeout=30)
        # the post (SPF and DKIM pass): one copy to each member, not sealed at intake
        signed = signer.sign(post("alice@author.test", LIST))
        await send("127.0.0.1", port, "alice@author.test", [LIST], signed, source=AUTHOR_IP)
        async with asyncio.timeout(30):
            while sum(len(m.messages) for m in mtas.values()) < 4:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{http}/metrics")
        assert status == 200
        got = _samples(text)

        def value(name: str, **labels: str) -> float:
            return got.get((name, tuple(sorted(labels.items()))), 0.0)

        auth = {
            (dict(k[1])["method"], dict(k[1])["result"]): v
            for k, v in got.items()
            if k[0] == "relay_auth_verdicts_total" and v
        }
        assert auth == {
            ("spf", "fail"): 1,
            ("spf", "pass"): 1,
            ("dkim", "pass"): 2,
            ("dmarc", "pass"): 2,
            ("arc", "none"): 2,
        }
        assert value("relay_arc_seals_total") == 1
        assert value("relay_arc_seal_cpu_seconds_count") == 1
        assert 0 < value("relay_arc_seal_cpu_seconds_sum") < 1
        sealed = [m.data for m in mtas["one.test"].messages if b"Subject: hello" in m.data]
        assert len(sealed) == 1 and sealed[0].startswith(b"ARC-Seal:")
        fetches = {
            dict(k[1])["outcome"]: v for k, v in got.items() if k[0] == "relay_mtasts_fetches_total"
        }
        assert fetches == {
            "ok": 1,
            "sts-policy-fetch-error": 0,
            "sts-policy-invalid": 0,
            "sts-webpki-invalid": 0,
        }
        assert [s.status for s in policy_host.served] == [200]
        assert value("relay_mtasts_cached_policies") == 1
        assert value("relay_list_posts_total", outcome="distributed", list=LIST) == 1
        assert value("relay_list_copies_total", list=LIST) == 3
        # one.test has an MTA-STS policy (testing): its two recipients; the others not
        assert (
            value("relay_delivery_recipients_total", result="delivered", domain_class="mta-sts")
            == 2
        )
        assert (
            value(
                "relay_delivery_recipients_total", result="delivered", domain_class="opportunistic"
            )
            == 2
        )
        dns_seen = {
            (dict(k[1])["type"], dict(k[1])["outcome"]): int(v)
            for k, v in got.items()
            if k[0] == "relay_dns_queries_total" and v
        }
        expected = _dns_expected(lab.zone)
        assert dns_seen == expected, (dns_seen, expected)
        # the MX of each member domain asked at least once (a worker's cache may ask again)
        assert expected["MX", "ok"] >= 3 and ("TXT", "ok") in expected
        # no address or domain from the internet in any label (the list is configured)
        for word in ("author.test", "one.test", "two.test", "bob@"):
            assert word not in text, word
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for m in mtas.values():
            await m.stop()
        await policy_host.stop()
        lab.close()
