"""Issue 3 end to end: authentication verdicts, ARC sealing and SRS through running relays.

Lab DNS with SPF, DKIM, DMARC and ARC key records; clients bind 127.0.0.x source addresses
so SPF sees them; the next hop records the exact bytes, which dkimpy verifies.
"""

from __future__ import annotations

import asyncio
import email
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest

from relay.app import RelayApp
from relay.auth.arc import ArcSealer
from relay.auth.dkim import DkimSigner
from relay.auth.types import ArcCv, ArcResult
from relay.commands.keygen import generate
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from relay.model import RecipientState, StsMode, TlsPolicy
from relay.queue.spool import Spool
from tests.labutil import base_doc, message, send, write_config

SENDER_IP = "127.0.0.5"


class AuthLab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.zone = Zone()
        self.dns = LabDnsServer(self.zone).start()
        self.keys: dict[str, bytes] = {}
        self.port = 0
        self.apps: list[RelayApp] = []
        self.mtas: list[LabMta] = []
        z = self.zone
        z.add("sender.test", "TXT", f"v=spf1 ip4:{SENDER_IP} -all")
        z.add("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")
        z.add("sender.test", "MX", (10, "mx.sender.test"))
        z.add("mx.sender.test", "A", "127.0.0.4")
        z.add("dest.test", "MX", (10, "mx.dest.test"))
        z.add("mx.dest.test", "A", "127.0.0.2")
        z.add("lists2.lab.test", "MX", (10, "relay2.lab.test"))
        z.add("relay2.lab.test", "A", "127.0.0.3")
        self.dkim_key = self.publish("s1", "sender.test")

    def publish(self, selector: str, domain: str) -> bytes:
        key = generate("rsa", 2048)
        self.zone.add(f"{selector}._domainkey.{domain}", "TXT", key.record())
        return key.private_pem

    def txt(self, name: bytes, timeout: int = 5) -> bytes | None:
        recs = self.zone.records.get(name.decode().rstrip(".").lower(), [])
        vals = [v for t, v in recs if t == "TXT"]
        return str(vals[0]).encode() if vals else None

    async def mta(self, ip: str) -> LabMta:
        m = await LabMta(ip, self.port).start()
        self.port = m.port
        self.mtas.append(m)
        return m

    async def relay(self, name: str, listen: str, **over: dict[str, Any]) -> RelayApp:
        work = self.tmp / name
        work.mkdir()
        key = work / "arc.pem"
        key.write_bytes(self.publish("arc", f"{name}.lab.test"))
        doc = base_doc(work, self.dns.address, self.port, **over)
        doc["server"].update({"listen": [listen], "hostname": f"{name}.lab.test"})
        doc["auth"] = {"enabled": True, "crypto_workers": 0}
        doc["arc"] = {
            "enabled": True,
            "domain": f"{name}.lab.test",
            "selector": "arc",
            "private_key": str(key),
            **over.get("arc", {}),
        }
        doc["srs"] = {
            "enabled": True,
            "domain": "srs.lab.test",
            "secret": "s3cret",
            **over.get("srs", {}),
        }
        app = RelayApp(write_config(work / "config.toml", doc), poll_interval=0.05)
        await app.start()
        self.apps.append(app)
        return app

    def signed(self, **kw: str) -> bytes:
        return DkimSigner("sender.test", "s1", self.dkim_key).sign(message(**kw))

    async def close(self) -> None:
        for app in self.apps:
            await app.stop(grace=2)
        for m in self.mtas:
            await m.stop()
        self.dns.stop()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[AuthLab]:
    lab = AuthLab(tmp_path)
    yield lab
    await lab.close()


def headers(data: bytes, name: str) -> list[str]:
    return email.message_from_bytes(data).get_all(name) or []


async def test_signed_message_relayed_with_verdict_seal_and_srs(lab: AuthLab) -> None:
    mx = await lab.mta("127.0.0.2")
    app = await lab.relay(
        "relay1", "127.0.0.1:0", aliases={"info@lists.lab.test": ["bob@dest.test"]}
    )
    host, port = app.bound[0]
    forged = b"Authentication-Results: relay1.lab.test; dmarc=pass header.from=evil.test\r\n"
    data = forged + lab.signed(frm="alice@sender.test", to="info@lists.lab.test")
    errors, _ = await send(
        host, port, "alice@sender.test", ["info@lists.lab.test"], data, source=SENDER_IP
    )
    assert errors == {}
    [got] = await mx.wait_for(1)
    ar = [h for h in headers(got.data, "Authentication-Results") if "relay1.lab.test" in h]
    assert len(ar) == 1, ar  # the forged one claiming our authserv-id is gone
    text = " ".join(ar[0].split())
    assert "spf=pass" in text and "smtp.mailfrom=alice@sender.test" in text
    assert "dkim=pass" in text and "header.d=sender.test" in text and "header.s=s1" in text
    assert "dmarc=pass" in text and "header.from=sender.test" in text
    assert "arc=none" in text
    assert [" ".join(h.split()).startswith("i=1;") for h in headers(got.data, "ARC-Seal")] == [True]
    cv, _results, reason = dkim.arc_verify(got.data, dnsfunc=lab.txt)
    assert cv == dkim.CV_Pass, reason
    # SRS: the forwarded copy's reverse-path is ours, and reverses to the sender
    assert got.mail_from.startswith("SRS0=") and got.mail_from.endswith("@srs.lab.test")
    assert got.mail_from.split("=", 4)[3:] == ["sender.test", "alice@srs.lab.test"]


async def test_spoofed_p_reject_message_refused(lab: AuthLab) -> None:
    mx = await lab.mta("127.0.0.2")
    app = await lab.relay(
        "relay1", "127.0.0.1:0", aliases={"info@lists.lab.test": ["bob@dest.test"]}
    )
    host, port = app.bound[0]
    spoof = message(frm="ceo@sender.test", to="info@lists.lab.test")
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(
            host, port, "ceo@sender.test", ["info@lists.lab.test"], spoof, source="127.0.0.6"
        )
    assert exc.value.code == 550 and "5.7.1" in exc.value.message
    assert mx.messages == []


async def test_two_relays_chain_i1_and_i2_verify(lab: AuthLab) -> None:
    mx = await lab.mta("127.0.0.2")
    await lab.relay(
        "relay2",
        f"127.0.0.3:{lab.port}",
        relay={"local_domains": ["lists2.lab.test"]},
        aliases={"x@lists2.lab.test": ["bob@dest.test"]},
        srs={"domain": "srs2.lab.test"},
    )
    app1 = await lab.relay(
        "relay1", "127.0.0.1:0", aliases={"info@lists.lab.test": ["x@lists2.lab.test"]}
    )
    host, port = app1.bound[0]
    data = lab.signed(frm="alice@sender.test", to="info@lists.lab.test")
    await send(host, port, "alice@sender.test", ["info@lists.lab.test"], data, source=SENDER_IP)
    [got] = await mx.wait_for(1)
    seals = sorted(" ".join(h.split())[:4] for h in headers(got.data, "ARC-Seal"))
    assert seals == ["i=1;", "i=2;"]
    cv, _results, reason = dkim.arc_verify(got.data, dnsfunc=lab.txt)
    assert cv == dkim.CV_Pass, reason
    ar2 = [h for h in headers(got.data, "Authentication-Results") if "relay2.lab.test" in h]
    assert "arc=pass" in " ".join(ar2[0].split())
    # relay2 rewrote relay1's SRS0 reverse-path into SRS1 in its own SRS domain (libsrs2)
    assert got.mail_from.startswith("SRS1=") and got.mail_from.endswith("@srs2.lab.test")
    assert "=srs.lab.test==" in got.mail_from  # names the first forwarder's SRS domain


async def test_srs_bounce_round_trip_and_forged_srs_refused(lab: AuthLab) -> None:
    mx = await lab.mta("127.0.0.2")
    sender_mx = await lab.mta("127.0.0.4")
    app = await lab.relay(
        "relay1", "127.0.0.1:0", aliases={"info@lists.lab.test": ["bob@dest.test"]}
    )
    host, port = app.bound[0]
    data = lab.signed(frm="alice@sender.test", to="info@lists.lab.test")
    await send(host, port, "alice@sender.test", ["info@lists.lab.test"], data, source=SENDER_IP)
    [fwd] = await mx.wait_for(1)
    srs_address = fwd.mail_from
    # the next hop bounces to the SRS address later: the relay takes it back
    bounce = message(
        frm="MAILER-DAEMON@dest.test", to=srs_address, subject="bounce", msgid="<b1@dest.test>"
    )
    errors, _ = await send(host, port, "", [srs_address], bounce, source="127.0.0.7")
    assert errors == {}
    [back] = await sender_mx.wait_for(1)
    assert back.rcpt_tos == ("alice@sender.test",) and back.mail_from == ""
    forged = "SRS0=XXXX=AB=sender.test=alice@srs.lab.test"
    client = aiosmtplib.SMTP(hostname=host, port=port, source_address=("127.0.0.7", 0))
    async with client:
        await client.ehlo()
        await client.mail("")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
            await client.rcpt(forged)
        assert exc.value.code == 550


async def test_dsn_for_forwarded_mail_goes_to_the_original_sender(lab: AuthLab) -> None:
    mx = await lab.mta("127.0.0.2")
    sender_mx = await lab.mta("127.0.0.4")
    mx.refuse_rcpt("bob@dest.test", "550 5.1.1 no such user")
    app = await lab.relay(
        "relay1", "127.0.0.1:0", aliases={"info@lists.lab.test": ["bob@dest.test"]}
    )
    host, port = app.bound[0]
    data = lab.signed(frm="alice@sender.test", to="info@lists.lab.test")
    await send(host, port, "alice@sender.test", ["info@lists.lab.test"], data, source=SENDER_IP)
    [dsn] = await sender_mx.wait_for(1)
    assert dsn.rcpt_tos == ("alice@sender.test",) and dsn.mail_from == ""
    assert b"Final-Recipient: rfc822; bob@dest.test" in dsn.data
    assert b"Original-Recipient: rfc822; info@lists.lab.test" in dsn.data


async def test_replayed_trusted_seal_stops_earning_the_dmarc_override(lab: AuthLab) -> None:
    """threats.md row 22: one message sealed by a trusted list, replayed to 100 recipients
    in turn, earns the override for [arc] override_max_recipients (50) of them only; a
    relay that does not trust the sealer never overrides."""
    mx = await lab.mta("127.0.0.2")
    list_key = lab.publish("arc", "list.lab.test")
    lab.zone.add("list.lab.test", "TXT", "v=spf1 ip4:127.0.0.7 -all")
    users = {f"u{i}@lists.lab.test": [f"u{i}@dest.test"] for i in range(100)}
    app = await lab.relay(
        "relay1", "127.0.0.1:0", aliases=users, arc={"trusted_sealers": ["list.lab.test"]}
    )
    host, port = app.bound[0]
    # the list broke the author's DKIM signature (footer) and sealed what it saw
    post = lab.signed(frm="ceo@sender.test", to="all@list.lab.test") + b"-- \r\nfooter\r\n"
    ar = "list.lab.test; dkim=pass header.d=sender.test; dmarc=pass header.from=sender.test"
    sealed = ArcSealer("list.lab.test", "arc", list_key, "list.lab.test").seal(
        post, ar, ArcResult(ArcCv.NONE)
    )
    rcpts = list(users)

    async def replay(batch: list[str]) -> int:
        try:
            await send(host, port, "bounces@list.lab.test", batch, sealed, source="127.0.0.7")
        except aiosmtplib.SMTPDataError as exc:
            assert exc.code == 550 and "ARC override refused" in exc.message, exc.message
            return 0
        return len(batch)

    accepted = [await replay(rcpts[i : i + 20]) for i in range(0, 100, 20)]
    assert accepted == [20, 20, 0, 0, 0]  # 40 carried; 40 + 20 would pass the 50
    assert await replay(rcpts[40:50]) == 10  # exactly up to the limit
    assert await replay(rcpts[50:51]) == 0
    got = await mx.wait_for(3)
    assert sorted(len(m.rcpt_tos) for m in got) == [10, 20, 20]
    for m in got:
        ar_headers = " ".join(headers(m.data, "Authentication-Results"))
        assert "policy.override=trusted_forwarder" in " ".join(ar_headers.split())

    # the same copy at a relay that does not trust the list: refused, no override
    other = await lab.relay("relay2", "127.0.0.1:0", aliases=users)
    ohost, oport = other.bound[0]
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(ohost, oport, "bounces@list.lab.test", rcpts[:1], sealed, source="127.0.0.7")
    assert exc.value.code == 550 and "ARC override refused" not in exc.value.message


class _EnforcePolicies:
    """Every recipient domain publishes MTA-STS enforce for its MX (a policy manager
    whose cache holds an enforce policy; the rest of the relay is real)."""

    async def get_policy(self, domain: str) -> TlsPolicy:
        return TlsPolicy(domain, StsMode.ENFORCE, ("mx.dest.test",), 86400, "id1")


class _EnforceRelay(RelayApp):
    def _build_policy_manager(self) -> Any:
        return _EnforcePolicies()


async def test_untrusted_tls_required_no_does_not_relax_enforce(lab: AuthLab) -> None:
    """RFC 8689 section 5, delivery.tls_required_no = "trusted" (the default): over SMTP,
    an untrusted sender's "TLS-Required: No" leaves enforce in force (the MX offers no
    STARTTLS, so nothing is sent), while a trusted client's is honoured."""
    mx = await lab.mta("127.0.0.2")  # no STARTTLS
    work = lab.tmp / "enforce"
    work.mkdir()
    doc = base_doc(
        work, lab.dns.address, lab.port, aliases={"info@lists.lab.test": ["x@dest.test"]}
    )
    doc["mta_sts"] = {"enabled": True}
    app = _EnforceRelay(write_config(work / "config.toml", doc), poll_interval=0.05)
    await app.start()
    lab.apps.append(app)
    host, port = app.bound[0]
    body = b"TLS-Required: No\r\n" + message(to="info@lists.lab.test", msgid="<u@sender.test>")
    errors, _ = await send(host, port, "a@sender.test", ["info@lists.lab.test"], body, "127.0.0.9")
    assert errors == {}
    spool = Spool(app.store)

    async def states() -> list[tuple[str, RecipientState, str]]:
        return [
            (r.address, r.state, r.last_reply) for m in await spool.list() for r in m.recipients
        ]

    async with asyncio.timeout(10):
        while not any(s is RecipientState.DEFERRED for _, s, _ in await states()):
            await asyncio.sleep(0.05)
    [(address, _, reply)] = await states()
    assert address == "x@dest.test" and "starttls-not-supported" in reply
    assert mx.messages == []  # nothing left in clear text
    # the same field from a trusted client (127.0.0.1) is honoured: delivered in clear
    trusted = b"TLS-Required: No\r\n" + message(to="y@dest.test", msgid="<t@sender.test>")
    errors, _ = await send(host, port, "a@sender.test", ["y@dest.test"], trusted)
    assert errors == {}
    [got] = await mx.wait_for(1)
    assert got.rcpt_tos == ("y@dest.test",) and got.tls_version is None
