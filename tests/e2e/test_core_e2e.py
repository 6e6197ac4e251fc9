"""End to end over loopback: a relay in-process with its real SMTP server, a real lab DNS
server, receiving MTAs on 127.0.0.x with trustme certificates."""

from __future__ import annotations

import asyncio
import email
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest
import trustme

from relay.app import RelayApp
from relay.cli import main as cli_main
from relay.commands.keygen import generate
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from relay.model import RecipientState
from relay.queue.spool import Spool
from tests.labutil import base_doc, message, send, write_config


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.zone = Zone()
        self.dns = LabDnsServer(self.zone).start()
        self.mtas: dict[str, LabMta] = {}
        self.port = 0
        self.app: RelayApp | None = None

    def tls(self, name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(name).configure_cert(ctx)
        return ctx

    async def mta(self, ip: str, name: str, *, tls: bool = True) -> LabMta:
        mta = LabMta(ip, self.port, tls_context=self.tls(name) if tls else None, hostname=name)
        await mta.start()
        self.port = mta.port
        self.mtas[ip] = mta
        return mta

    def domain(self, domain: str, mx: str, ip: str) -> None:
        self.zone.add(domain, "MX", (10, mx))
        self.zone.add(mx, "A", ip)

    async def start_relay(self, **over: dict[str, Any]) -> RelayApp:
        doc = base_doc(self.tmp, self.dns.address, self.port, **over)
        doc["delivery"]["ca_file"] = str(self.ca_file)
        config = write_config(self.tmp / "config.toml", doc)
        self.app = RelayApp(config, poll_interval=0.05)
        await self.app.start()
        return self.app

    @property
    def relay_addr(self) -> tuple[str, int]:
        assert self.app is not None
        return self.app.bound[0]

    async def close(self) -> None:
        if self.app is not None:
            await self.app.stop(grace=2)
        for m in self.mtas.values():
            await m.stop()
        self.dns.stop()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    await lab.close()


async def queue_state(lab: Lab) -> list[tuple[str, RecipientState, str]]:
    assert lab.app is not None
    spool = Spool(lab.app.store)
    return [(r.address, r.state, r.last_reply) for m in await spool.list() for r in m.recipients]


async def wait_state(lab: Lab, want: RecipientState, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            states = await queue_state(lab)
            if states and all(s == want for _, s, _ in states):
                return
            await asyncio.sleep(0.05)


async def test_trusted_client_relays_over_opportunistic_tls(lab: Lab) -> None:
    mx = await lab.mta("127.0.0.2", "mx.dest.test")
    lab.domain("dest.test", "mx.dest.test", "127.0.0.2")
    await lab.start_relay()
    host, port = lab.relay_addr
    errors, reply = await send(host, port, "alice@sender.test", ["bob@dest.test"], message())
    assert errors == {} and "queued as" in reply
    [got] = await mx.wait_for(1)
    assert got.rcpt_tos == ("bob@dest.test",) and got.mail_from == "alice@sender.test"
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    assert got.data.startswith(b"Received: from ")
    assert b"by relay.lab.test" in got.data and b"Subject: hello" in got.data
    async with asyncio.timeout(5):
        while await queue_state(lab):
            await asyncio.sleep(0.05)


async def test_alias_forwarded_from_anyone_and_open_relay_refused(lab: Lab) -> None:
    mx1 = await lab.mta("127.0.0.2", "mx.dest.test")
    mx2 = await lab.mta("127.0.0.3", "mx.other.test", tls=False)
    lab.domain("dest.test", "mx.dest.test", "127.0.0.2")
    lab.domain("other.test", "mx.other.test", "127.0.0.3")
    await lab.start_relay(aliases={"info@lists.lab.test": ["x@dest.test", "y@other.test"]})
    host, port = lab.relay_addr
    errors, _ = await send(
        host,
        port,
        "s@sender.test",
        ["info@lists.lab.test"],
        message(to="info@lists.lab.test"),
        source="127.0.0.9",
    )
    assert errors == {}
    [a] = await mx1.wait_for(1)
    [b] = await mx2.wait_for(1)
    assert a.rcpt_tos == ("x@dest.test",) and b.rcpt_tos == ("y@other.test",)
    assert a.tls_version is not None and b.tls_version is None  # clear only where no STARTTLS
    # an untrusted client may not relay elsewhere, nor reach unknown local users
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, source_address=("127.0.0.9", 0)
    )
    async with client:
        await client.ehlo()
        await client.mail("s@sender.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as e1:
            await client.rcpt("v@dest.test")
        assert e1.value.code == 554
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as e2:
            await client.rcpt("nobody@lists.lab.test")
        assert e2.value.code == 550
    assert len(mx1.messages) == 1


async def test_tempfail_then_delivered_after_queue_flush(lab: Lab) -> None:
    mx = await lab.mta("127.0.0.2", "mx.dest.test")
    lab.domain("dest.test", "mx.dest.test", "127.0.0.2")
    mx.refuse_rcpt("bob@dest.test", "451 4.2.0 come back later")
    app = await lab.start_relay()
    host, port = lab.relay_addr
    await send(host, port, "alice@sender.test", ["bob@dest.test"], message())
    await wait_state(lab, RecipientState.DEFERRED)
    [(_, _, last)] = await queue_state(lab)
    assert last.startswith("451") and mx.messages == []
    mx.script.rcpt_replies.clear()
    rc = await asyncio.to_thread(cli_main, ["queue", "flush", "--config", str(app.config.path)])
    assert rc == 0
    [got] = await mx.wait_for(1)
    assert got.rcpt_tos == ("bob@dest.test",)


async def test_permanent_failure_and_null_mx_give_one_dsn_each(lab: Lab) -> None:
    mx = await lab.mta("127.0.0.2", "mx.dest.test")
    sender_mx = await lab.mta("127.0.0.4", "mx.sender.test")
    lab.domain("dest.test", "mx.dest.test", "127.0.0.2")
    lab.domain("sender.test", "mx.sender.test", "127.0.0.4")
    lab.zone.add("nullmx.test", "MX", (0, "."))
    mx.refuse_rcpt("gone@dest.test", "550 5.1.1 no such user")
    await lab.start_relay()
    host, port = lab.relay_addr
    await send(
        host,
        port,
        "alice@sender.test",
        ["bob@dest.test", "gone@dest.test"],
        message(msgid="<p1@sender.test>"),
    )
    await send(
        host, port, "alice@sender.test", ["x@nullmx.test"], message(msgid="<p2@sender.test>")
    )
    dsns = await sender_mx.wait_for(2)
    await asyncio.sleep(0.3)
    assert len(sender_mx.messages) == 2  # exactly one DSN per failed message
    assert [m.rcpt_tos for m in mx.messages] == [("bob@dest.test",)]
    by_ref = {(b"p1@" in d.data): d for d in dsns}
    d1, d2 = by_ref[True], by_ref[False]
    for d in (d1, d2):
        assert d.mail_from == ""  # null reverse-path
        assert d.rcpt_tos == ("alice@sender.test",)
        assert b"report-type=delivery-status" in d.data
    assert b"Final-Recipient: rfc822; gone@dest.test" in d1.data
    assert b"Final-Recipient: rfc822; bob@dest.test" not in d1.data
    assert b"Status: 5.1.1" in d1.data
    assert b"Final-Recipient: rfc822; x@nullmx.test" in d2.data and b"Status: 5.1.10" in d2.data


async def test_dsn_is_dkim_signed_by_the_bounce_sender_domain(lab: Lab) -> None:
    """A DSN the relay writes (From MAILER-DAEMON@relay.lab.test) is signed by the
    [[dkim.sign]] key of that domain's parent, lab.test (relay.auth.signer, the one
    signing home); dkimpy verifies it against the lab DNS (before: unsigned)."""
    sender_mx = await lab.mta("127.0.0.4", "mx.sender.test")
    lab.domain("sender.test", "mx.sender.test", "127.0.0.4")
    lab.zone.add("nullmx.test", "MX", (0, "."))
    key = generate("rsa")
    (lab.tmp / "dsn.pem").write_bytes(key.private_pem)
    lab.zone.add("s2026._domainkey.lab.test", "TXT", key.record())
    sign = {"domain": "lab.test", "selector": "s2026", "private_key": str(lab.tmp / "dsn.pem")}
    await lab.start_relay(dkim={"sign": [sign]})
    host, port = lab.relay_addr
    await send(host, port, "alice@sender.test", ["x@nullmx.test"], message())
    [d] = await sender_mx.wait_for(1)
    assert b"Final-Recipient: rfc822; x@nullmx.test" in d.data

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        recs = lab.zone.records.get(name.decode().rstrip(".").lower(), [])
        vals = [str(v) for t, v in recs if t == "TXT"]
        return vals[0].encode() if vals else None

    field = email.message_from_bytes(d.data)["DKIM-Signature"]
    assert field is not None
    sig = dkim.util.parse_tag_value(str(field).encode())
    assert sig[b"d"] == b"lab.test" and sig[b"s"] == b"s2026"
    assert dkim.verify(d.data, dnsfunc=txt)


async def test_dns_servfail_defers(lab: Lab) -> None:
    await lab.mta("127.0.0.2", "mx.dest.test")
    lab.zone.fail("broken.test", "SERVFAIL")
    await lab.start_relay()
    host, port = lab.relay_addr
    await send(host, port, "alice@sender.test", ["bob@broken.test"], message())
    await wait_state(lab, RecipientState.DEFERRED)
    [(_, _, last)] = await queue_state(lab)
    assert "4.4.3" in last
