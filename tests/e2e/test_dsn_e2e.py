"""The DSN extension (RFC 3461) end to end: a relay in-process, a lab MX that offers DSN
(dsn.test), one that does not (plain.test), and the sender's MX (sender.test) that gets
the DSNs. Each NOTIFY / RET combination that changes what happens is sent once."""

from __future__ import annotations

import asyncio
import email
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.app import RelayApp
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta, Received
from tests.labutil import base_doc, message, write_config

BODY = "the secret body line"


class DsnLab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.zone = Zone()
        self.dns = LabDnsServer(self.zone).start()
        self.mtas: list[LabMta] = []
        self.app: RelayApp | None = None
        for domain, ip in (("dsn.test", "127.0.0.2"), ("plain.test", "127.0.0.3")):
            self.zone.add(domain, "MX", (10, f"mx.{domain}"))
            self.zone.add(f"mx.{domain}", "A", ip)
        self.zone.add("sender.test", "MX", (10, "mx.sender.test"))
        self.zone.add("mx.sender.test", "A", "127.0.0.4")

    async def start(self, **over: dict[str, Any]) -> tuple[LabMta, LabMta, LabMta]:
        port = 0
        made = []
        for ip, dsn in (("127.0.0.2", True), ("127.0.0.3", False), ("127.0.0.4", False)):
            m = await LabMta(ip, port, dsn=dsn).start()
            port = m.port
            made.append(m)
        self.mtas = made
        doc = base_doc(self.tmp, self.dns.address, port, **over)
        doc["relay"]["local_domains"] = ["lists.lab.test"]
        doc["aliases"] = {"info@lists.lab.test": ["bob@dsn.test"]}
        self.app = RelayApp(write_config(self.tmp / "config.toml", doc), poll_interval=0.05)
        await self.app.start()
        return made[0], made[1], made[2]

    async def send(
        self, rcpts: dict[str, list[str]], mail_options: list[str], subject: str = "hi"
    ) -> None:
        assert self.app is not None
        host, port = self.app.bound[0]
        client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
        async with client:
            await client.ehlo()
            assert client.supports_extension("dsn")
            await client.mail("alice@sender.test", options=mail_options)
            for rcpt, opts in rcpts.items():
                await client.rcpt(rcpt, options=opts)
            await client.data(message(subject=subject, body=BODY, to=",".join(rcpts)))

    async def close(self) -> None:
        if self.app is not None:
            await self.app.stop(grace=2)
        for m in self.mtas:
            await m.stop()
        self.dns.stop()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[DsnLab]:
    lab = DsnLab(tmp_path)
    yield lab
    await lab.close()


def _report(dsn: Received) -> tuple[email.message.Message, list[str], bytes]:
    """(the DSN, its delivery-status text, its third part's bytes)."""
    msg = email.message_from_bytes(dsn.data)
    parts = msg.get_payload()
    assert isinstance(parts, list)
    status = parts[1].as_string()
    third = dsn.data.split(b"Content-Description: Undelivered Message", 1)[1]
    return msg, status.splitlines(), third


async def test_parameters_go_on_to_a_next_hop_that_offers_dsn(lab: DsnLab) -> None:
    dsn_mx, _, sender_mx = await lab.start()
    await lab.send(
        {
            "dave@dsn.test": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Dave+2BLists@dsn.test"],
            "erin@dsn.test": ["NOTIFY=DELAY"],
            "fred@dsn.test": [],
        },
        ["RET=HDRS", "ENVID=QQ+2B314"],
    )
    [got] = await dsn_mx.wait_for(1)
    assert got.rcpt_tos == ("dave@dsn.test", "erin@dsn.test", "fred@dsn.test")
    assert set(got.dsn_mail) == {"RET=HDRS", "ENVID=QQ+2B314"}  # xtext as received
    assert set(got.dsn_rcpt[0]) == {"NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Dave+2BLists@dsn.test"}
    assert got.dsn_rcpt[1:] == (("NOTIFY=DELAY",), ())
    await asyncio.sleep(0.5)
    assert sender_mx.messages == []  # the next hop reports success itself


async def test_alias_keeps_orcpt_at_the_address_the_sender_used(lab: DsnLab) -> None:
    dsn_mx, _, _ = await lab.start()
    await lab.send({"info@lists.lab.test": ["NOTIFY=SUCCESS"]}, [])
    [got] = await dsn_mx.wait_for(1)
    assert got.rcpt_tos == ("bob@dsn.test",)
    assert set(got.dsn_rcpt[0]) == {"NOTIFY=SUCCESS", "ORCPT=rfc822;info@lists.lab.test"}


async def test_success_to_a_next_hop_without_dsn_gets_a_relayed_dsn(lab: DsnLab) -> None:
    _, plain_mx, sender_mx = await lab.start()
    await lab.send(
        {"carol@plain.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;carol@plain.test"]},
        ["ENVID=env-1"],
    )
    [got] = await plain_mx.wait_for(1)
    assert got.rcpt_tos == ("carol@plain.test",)  # no DSN offered: nothing passed (else 555)
    [dsn] = await sender_mx.wait_for(1)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ("alice@sender.test",)
    msg, status, third = _report(dsn)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert "Action: relayed" in status and "Status: 2.0.0" in status
    assert "Original-Envelope-Id: env-1" in status
    assert "Original-Recipient: rfc822; carol@plain.test" in status
    assert BODY.encode() not in third  # no RET: headers only


async def test_failure_dsn_honours_notify_and_ret(lab: DsnLab) -> None:
    _, plain_mx, sender_mx = await lab.start()
    for who in ("never", "hdrs", "full", "success-only"):
        plain_mx.refuse_rcpt(f"{who}@plain.test", "550 5.1.1 no such user")
    await lab.send({"never@plain.test": ["NOTIFY=NEVER"]}, [], subject="never")
    await lab.send({"success-only@plain.test": ["NOTIFY=SUCCESS"]}, [], subject="success")
    await lab.send({"hdrs@plain.test": ["NOTIFY=FAILURE"]}, ["RET=HDRS"], subject="hdrs")
    await lab.send({"full@plain.test": []}, ["RET=FULL", "ENVID=e+3Df"], subject="full")
    dsns = await sender_mx.wait_for(2)
    await asyncio.sleep(0.5)
    assert len(sender_mx.messages) == 2  # no DSN for NEVER, nor for SUCCESS alone
    by_rcpt = {}
    for d in dsns:
        _, status, third = _report(d)
        final = next(x for x in status if x.startswith("Final-Recipient:"))
        by_rcpt[final.split("; ")[1]] = (status, third, d.data)
    hdrs_status, hdrs_third, hdrs_data = by_rcpt["hdrs@plain.test"]
    assert "Action: failed" in hdrs_status
    assert b"Content-Type: text/rfc822-headers" in hdrs_data
    assert b"Subject: hdrs" in hdrs_third and BODY.encode() not in hdrs_third
    full_status, full_third, full_data = by_rcpt["full@plain.test"]
    assert "Original-Envelope-Id: e=f" in full_status  # xtext decoded
    assert b"Content-Type: message/rfc822" in full_data
    assert b"Subject: full" in full_third and BODY.encode() in full_third


async def test_delay_dsn_only_for_recipients_that_asked(lab: DsnLab) -> None:
    _, plain_mx, sender_mx = await lab.start(delivery={"delay_warning": 0.000001})
    plain_mx.refuse_rcpt("slow@plain.test", "451 4.2.0 try later")
    plain_mx.refuse_rcpt("quiet@plain.test", "451 4.2.0 try later")
    await lab.send({"quiet@plain.test": ["NOTIFY=FAILURE"]}, [], subject="quiet")
    await asyncio.sleep(0.5)
    assert sender_mx.messages == []  # deferred, and no DELAY asked: no delay DSN
    await lab.send({"slow@plain.test": ["NOTIFY=DELAY,FAILURE"]}, [], subject="slow")
    [dsn] = await sender_mx.wait_for(1)
    msg, status, _ = _report(dsn)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert "Action: delayed" in status and "Final-Recipient: rfc822; slow@plain.test" in status


async def test_bad_dsn_parameters_are_refused_naming_the_parameter(lab: DsnLab) -> None:
    await lab.start()
    assert lab.app is not None
    host, port = lab.app.bound[0]
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    async with client:
        await client.ehlo()
        for opts, name in (
            (["RET=PART"], "RET"),
            (["ENVID=a=b+zz"], None),  # "=" inside a value: bad syntax before DSN looks
            (["ENVID=bad+zz"], "ENVID"),
            (["ENVID=" + "x" * 101], "ENVID"),
        ):
            with pytest.raises(aiosmtplib.SMTPResponseException) as exc:
                await client.mail("alice@sender.test", options=opts)
            assert exc.value.code == 501, (opts, exc.value.message)
            if name:
                assert f"bad {name} parameter" in exc.value.message
        await client.mail("alice@sender.test")
        for opts, name in (
            (["NOTIFY=NEVER,SUCCESS"], "NOTIFY"),
            (["NOTIFY=SOMETIMES"], "NOTIFY"),
            (["ORCPT=carol@plain.test"], "ORCPT"),
            (["ORCPT=rfc822;ca+0Arol@plain.test"], "ORCPT"),
        ):
            with pytest.raises(aiosmtplib.SMTPResponseException) as exc:
                await client.rcpt("carol@plain.test", options=opts)
            assert exc.value.code == 501 and f"bad {name} parameter" in exc.value.message
        resp = await client.rcpt("carol@plain.test", options=["notify=failure,delay"])
        assert resp.code == 250
