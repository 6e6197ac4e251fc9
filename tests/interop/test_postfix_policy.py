"""Debian's Postfix asks ``relay policy-server`` for its TLS policy
(``smtp_tls_policy_maps = socketmap:inet:...:postfix``) and delivers as the answers say:

    aiosmtplib --> Postfix (127.0.0.91) --MX via the lab DNS--> mx.enforced.test (127.0.0.93:25)
                                                   \\------> relay lab strip (127.0.0.94:25)
                                                                  --> the same MX
    relay policy-server (127.0.0.96, a subprocess) <-- socketmap -- Postfix
        --TXT via the lab DNS, policy over HTTPS--> policy host (127.0.0.95, trustme)

- ``enforced.test``: MTA-STS enforce, MX reached directly: the policy server answers
  ``secure match=mx.enforced.test``; Postfix verifies the certificate against the test CA
  (``smtp_tls_CAfile``) and delivers over TLS;
- ``stripped.test``: enforce, MX behind ``relay lab strip``: Postfix refuses to send in
  clear ("TLS is required, but was not offered"), the mail stays deferred in its queue
  (``postqueue -p`` shows it) and the MX receives nothing;
- ``plain.test``: no policy (NOTFOUND), behind the same stripper: Postfix's own level
  ``may`` delivers in clear, which shows the stripper works and the refusal above is the
  policy's doing.

How Postfix finds the MX hosts (the honest route): Postfix does real MX and A lookups
(``smtp_dns_support_level = enabled``, no transport_maps, no relayhost), so the policy
lookup key is the bare recipient domain exactly as in production (a transport next hop
``[host]:port`` or ``domain:port`` would be the key instead, and MTA-STS would never be
asked). Its resolver reads /etc/resolv.conf, which names the lab DNS server on
127.0.0.92:53 only inside a private mount namespace around ``postfix start``
(relay.lab.postfix ``resolv_conf``): the machine's resolv.conf is never changed. The MX
and the stripper listen on port 25 of their own loopback addresses (root is allowed here).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from relay.lab.policyhost import PolicyHost, Site
from relay.lab.postfix import POSTFIX, PostfixInstance, PostfixSpec, available, free_port
from tests.interop.postfix_lab import shared_tempdir, start_postfix, stop_postfix
from tests.lab.test_lab_cli import Running
from tests.labutil import write_config

pytestmark = [pytest.mark.postfix, pytest.mark.slow, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]
PF_IP = "127.0.0.91"
DNS_IP = "127.0.0.92"
MX_IP = "127.0.0.93"
STRIP_IP = "127.0.0.94"
POLICY_IP = "127.0.0.95"
PS_IP = "127.0.0.96"
DOMAINS = ("enforced.test", "stripped.test", "plain.test")
STS = ("enforced.test", "stripped.test")


def _policy(domain: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: mx.{domain}\nmax_age: 86400\n"


def _zone() -> Zone:
    zone = Zone()
    for d in DOMAINS:
        zone.add(d, "MX", (10, f"mx.{d}"))
        zone.add(f"mx.{d}", "A", MX_IP if d == "enforced.test" else STRIP_IP)
    for d in STS:
        zone.add(f"_mta-sts.{d}", "TXT", "v=STSv1; id=pf1;")
        zone.add(f"mta-sts.{d}", "A", POLICY_IP)
    return zone


class PolicyServerProcess:
    """``relay policy-server`` as a subprocess; its JSON log lines go to a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, where: str) -> None:
        self.proc, self.log, self.where = proc, log, where

    @classmethod
    async def start(cls, config: Path, log: Path) -> PolicyServerProcess:
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "policy-server", "--config", str(config),
                "--listen", f"{PS_IP}:0",
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        if not line:
            await proc.wait()
            pytest.fail(f"relay policy-server exited: {log.read_text()}")
        return cls(proc, log, line.strip())

    def port(self) -> int:
        m = re.search(rf"{re.escape(PS_IP)}:(\d+)", self.where)
        assert m, self.where
        return int(m.group(1))

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 15)
        assert self.proc.returncode is not None
        return self.proc.returncode

    def answers(self) -> list[tuple[str, str]]:
        out = []
        for line in self.log.read_text().splitlines():
            with_json = line.strip()
            if with_json.startswith("{"):
                ev = json.loads(with_json)
                if ev.get("event") == "policy_answer":
                    out.append((ev["key"], ev["reply"]))
        return out


def _postqueue(pf: PostfixInstance) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    postqueue = str(Path(POSTFIX).with_name("postqueue"))
    done = subprocess.run(
        [postqueue, "-c", str(pf.config_dir), "-p"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    return done.stdout + done.stderr


async def _wait_log(pf: PostfixInstance, pattern: str, timeout: float) -> re.Match[str]:
    async with asyncio.timeout(timeout):
        while True:
            m = re.search(pattern, pf.log_text())
            if m:
                return m
            await asyncio.sleep(0.1)


async def test_postfix_delivers_by_the_policy_servers_answers(tmp_path: Path) -> None:
    assert available(), "needs the postfix package and root (.ci/run has both)"
    base = shared_tempdir("pf-policy-")
    ca = trustme.CA()
    ca_file = base / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o644)
    resolv = base / "resolv.conf"
    resolv.write_text(f"nameserver {DNS_IP}\noptions attempts:1 timeout:2\n")
    resolv.chmod(0o644)

    dns = LabDnsServer(_zone(), host=DNS_IP, port=53).start()
    ph_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*[f"mta-sts.{d}" for d in STS]).configure_cert(ph_ctx)
    policy_host = PolicyHost(
        ph_ctx, (POLICY_IP, 0), sites={f"mta-sts.{d}": Site(_policy(d)) for d in STS}
    )
    await policy_host.start()
    mx_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*[f"mx.{d}" for d in DOMAINS]).configure_cert(mx_ctx)
    mx = await LabMta(MX_IP, 25, tls_context=mx_ctx, hostname="mx.lab.test").start()
    strip = await Running.start(
        "lab", "strip", "--listen", f"{STRIP_IP}:25", "--upstream", f"{MX_IP}:25"
    )
    config = write_config(
        tmp_path / "config.toml",
        {
            "storage": {"path": str(tmp_path / "relay.sqlite3")},
            "dns": {"nameservers": [f"{DNS_IP}:53"], "timeout": 2},
            "delivery": {"ca_file": str(ca_file)},
            "mta_sts": {"https_port": policy_host.port, "fetch_timeout": 5},
            "http": {"allow_private_addresses": True},
            "logging": {"level": "info", "format": "json"},
        },
    ).path
    ps = await PolicyServerProcess.start(config, tmp_path / "policy-server.log")
    pf: PostfixInstance | None = None
    try:
        port = free_port(PF_IP)
        pf = await start_postfix(
            PostfixSpec(
                listen=(PF_IP, port),
                nexthop=(MX_IP, 25),  # unused: relayhost and transport_maps are cleared
                hostname="postfix.lab.test",
                relay_domains=DOMAINS,
                smtp_tls_security_level="may",
                smtp_tls_ca_file=ca_file,
                resolv_conf=resolv,
                extra={
                    "smtp_dns_support_level": "enabled",
                    "smtp_host_lookup": "dns",
                    "relayhost": "",
                    "transport_maps": "",
                    "smtp_tls_policy_maps": f"socketmap:inet:{PS_IP}:{ps.port()}:postfix",
                    "smtp_connect_timeout": "5s",
                    "smtp_tls_loglevel": "1",
                },
            ),
            name="policypf",
        )
        async with aiosmtplib.SMTP(hostname=PF_IP, port=port, timeout=15) as client:
            for d in DOMAINS:
                data = f"From: a@sender.test\r\nTo: bob@{d}\r\nSubject: to {d}\r\n\r\nhi\r\n"
                await client.sendmail("a@sender.test", [f"bob@{d}"], data)

        try:
            got = await mx.wait_for(2, timeout=60)
        except TimeoutError:
            pytest.fail(f"MX got {mx.messages!r}\n{pf.log_text()[-4000:]}")
        deferred = await _wait_log(
            pf, r"to=<bob@stripped\.test>.*status=deferred \((.*)\)", timeout=30
        )
        await asyncio.sleep(0.5)  # a late delivery to the MX would show now
        queue = await asyncio.to_thread(_postqueue, pf)
        log = pf.log_text()
        cache = subprocess.run(
            [sys.executable, "-m", "relay", "sts", "cache", "--config", str(config), "--json"],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
    finally:
        if pf is not None:
            await stop_postfix(pf)
        rc = await ps.stop()
        strip_rc, strip_out = await strip.terminate()
        await mx.stop()
        await policy_host.stop()
        dns.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert rc == 0 and strip_rc == 0

    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    # enforce, MX reached directly: verified TLS, as the policy server said
    assert set(by_rcpt) == {"bob@enforced.test", "bob@plain.test"}, by_rcpt
    assert by_rcpt["bob@enforced.test"].tls_version is not None
    assert re.search(r"Verified TLS connection established to mx\.enforced\.test\[", log), log
    # no policy, behind the stripper: Postfix's own "may", in clear
    assert by_rcpt["bob@plain.test"].tls_version is None
    # enforce behind the stripper: never sent, deferred, still in Postfix's queue
    assert "TLS is required, but was not offered by host mx.stripped.test" in deferred.group(1)
    assert "bob@stripped.test" in queue and "bob@enforced.test" not in queue, queue
    assert "bob@plain.test" not in queue, queue

    # what Postfix asked and what it was told: the bare recipient domain as the key
    answers = dict(ps.answers())
    assert answers["enforced.test"] == (
        "OK secure match=mx.enforced.test servername=hostname protocols=>=TLSv1.2"
    ), answers
    assert answers["stripped.test"].startswith("OK secure match=mx.stripped.test "), answers
    assert answers["plain.test"] == "NOTFOUND ", answers
    assert re.search(r"(\d+) connections, (\d+) rewritten", strip_out), strip_out

    # the answers came from the relay's own MTA-STS cache (the store `relay serve` uses)
    assert cache.returncode == 0, cache.stderr
    cached = {row["domain"]: row for row in json.loads(cache.stdout)}
    assert set(cached) == set(STS) and all(r["mode"] == "enforce" for r in cached.values())
