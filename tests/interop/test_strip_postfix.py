"""``relay lab strip`` between our relay and a REAL Postfix receiving over STARTTLS.

    relay (127.0.0.1) --SMTP--> relay lab strip (127.0.0.62, a subprocess)
        --SMTP, STARTTLS rewritten to XXXXXXXA--> Postfix "mx" (127.0.0.61, trustme cert)
        --SMTP--> LabMta sink (127.0.0.64)

Three recipient domains, all served by that Postfix:
- ``plain.test``: no MTA-STS policy, MX behind the stripper: the relay falls back to
  clear text (what every opportunistic sender does);
- ``enforced.test``: MTA-STS ``enforce`` (policy host 127.0.0.63), MX behind the
  stripper: the relay refuses to send in clear and defers with 4.7.5;
- ``direct.test``: ``enforce`` and no stripper: delivered over verified TLS, which shows
  the refusal above is the stripper's doing, not Postfix's TLS set-up.
Postfix's own Received header and log say whether each session used TLS.
"""

from __future__ import annotations

import asyncio
import email
import re
import shutil
import ssl
from pathlib import Path

import pytest
import trustme

from relay.app import RelayApp
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from relay.lab.policyhost import PolicyHost, Site
from relay.lab.postfix import PostfixSpec, free_port
from relay.model import RecipientState
from relay.queue.spool import Spool
from tests.interop.postfix_lab import shared_tempdir, start_postfix, stop_postfix
from tests.lab.test_lab_cli import Running
from tests.labutil import base_doc, message, send, write_config

pytestmark = [pytest.mark.postfix, pytest.mark.slow, pytest.mark.timeout(120)]

PF_IP = "127.0.0.61"
STRIP_IP = "127.0.0.62"
POLICY_IP = "127.0.0.63"
SINK_IP = "127.0.0.64"
DOMAINS = ("plain.test", "enforced.test", "direct.test")


def _policy(domain: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: mx.{domain}\nmax_age: 86400\n"


async def test_strip_proxy_in_front_of_postfix_with_and_without_enforce(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    certs = shared_tempdir("pf-strip-certs-")
    leaf = ca.issue_cert(*[f"mx.{d}" for d in DOMAINS])
    cert, key = certs / "mx.crt", certs / "mx.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    cert.chmod(0o644)
    key.chmod(0o600)

    port = free_port(PF_IP)
    zone = Zone()
    for d in DOMAINS:
        zone.add(d, "MX", (10, f"mx.{d}"))
        zone.add(f"mx.{d}", "A", PF_IP if d == "direct.test" else STRIP_IP)
    for d in ("enforced.test", "direct.test"):
        zone.add(f"_mta-sts.{d}", "TXT", "v=STSv1; id=strip1;")
        zone.add(f"mta-sts.{d}", "A", POLICY_IP)
    dns = LabDnsServer(zone).start()
    ph_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mta-sts.enforced.test", "mta-sts.direct.test").configure_cert(ph_ctx)
    policy_host = PolicyHost(
        ph_ctx, (POLICY_IP, 0), sites={f"mta-sts.{d}": Site(_policy(d)) for d in DOMAINS[1:]}
    )
    await policy_host.start()
    sink = await LabMta(SINK_IP, 0, hostname="sink.lab.test").start()
    pf = None
    strip: Running | None = None
    app: RelayApp | None = None
    try:
        pf = await start_postfix(
            PostfixSpec(
                listen=(PF_IP, port),
                nexthop=(SINK_IP, sink.port),
                hostname="mx.postfix.test",
                relay_domains=DOMAINS,
                mynetworks=("127.0.0.64/32",),
                tls_cert=cert,
                tls_key=key,
                smtp_tls_security_level="none",
            ),
            name="stripmx",
        )
        strip = await Running.start(
            "lab", "strip", "--listen", f"{STRIP_IP}:{port}", "--upstream", f"{PF_IP}:{port}"
        )
        doc = base_doc(
            tmp_path,
            dns.address,
            port,
            mta_sts={"enabled": True, "https_port": policy_host.port, "fetch_timeout": 5},
            http={"allow_private_addresses": True},
        )
        doc["delivery"].update({"ca_file": str(ca_file), "connect_timeout": 5})
        app = RelayApp(write_config(tmp_path / "config.toml", doc), poll_interval=0.05)
        await app.start()
        host, rport = app.bound[0]
        for d in DOMAINS:
            data = message(subject=f"to {d}", to=f"bob@{d}", msgid=f"<strip.{d}@sender.test>")
            errors, _ = await send(host, rport, "alice@sender.test", [f"bob@{d}"], data)
            assert errors == {}

        try:
            got = await sink.wait_for(2, timeout=60)
        except TimeoutError:
            pytest.fail("sink got " + repr(sink.messages) + "\n" + pf.log_text()[-3000:])
        spool = Spool(app.store)
        async with asyncio.timeout(20):
            while True:
                held = {
                    r.address: r
                    for m in await spool.list()
                    for r in m.recipients
                    if r.state is RecipientState.DEFERRED and r.attempts
                }
                if "bob@enforced.test" in held:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a late delivery to the sink would show now

        # enforce + stripper: never sent in clear, deferred with 4.7.5
        assert {m.rcpt_tos for m in sink.messages} == {("bob@plain.test",), ("bob@direct.test",)}
        reply = held["bob@enforced.test"].last_reply
        assert "4.7.5" in reply and "starttls-not-supported" in reply, reply

        by_rcpt = {m.rcpt_tos[0]: email.message_from_bytes(m.data) for m in got}
        # no policy + stripper: clear-text fallback, Postfix saw plain ESMTP
        plain_hop = " ".join(str(by_rcpt["bob@plain.test"].get_all("Received")[0]).split())
        assert "by mx.postfix.test (Postfix)" in plain_hop and "with ESMTP id" in plain_hop
        assert "using TLS" not in plain_hop, plain_hop
        # enforce without stripper: verified TLS to the same Postfix
        direct_hop = " ".join(str(by_rcpt["bob@direct.test"].get_all("Received")[0]).split())
        assert "using TLSv1." in direct_hop and "with ESMTPS" in direct_hop, direct_hop

        log = pf.log_text()
        assert log.count("TLS connection established from") == 1, log[-3000:]
    finally:
        if app is not None:
            await app.stop(grace=2)
        strip_out = ""
        if strip is not None:
            rc, strip_out = await strip.terminate()
            assert rc == 0
        if pf is not None:
            await stop_postfix(pf)
        await sink.stop()
        await policy_host.stop()
        dns.stop()
        shutil.rmtree(certs, ignore_errors=True)
    # both stripped sessions (plain.test delivered, enforced.test refused) were rewritten
    m = re.search(r"(\d+) connections, (\d+) rewritten", strip_out)
    assert m and int(m.group(1)) >= 2 and int(m.group(2)) >= 2, strip_out
