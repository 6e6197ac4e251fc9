"""The SMTP client and the transaction: per-recipient outcomes, one DATA for all
recipients, MAIL/DATA replies applied to all, 421, SMTPUTF8, EHLO name, source address,
the attempt deadline (RFC 5321 sections 3.3, 4.2, 4.5.3.2)."""

from __future__ import annotations

from relay.delivery.client import enhanced_code, rcpt_reply, reply_of
from relay.delivery.courier import Courier
from relay.model import DeliveryJob, RecipientState, SmtpReply
from tests.delivery.mxlab import MxLab, Recorder

D = "d.lab.test"
DATA = b"Subject: t\r\n\r\nline one\r\n.leading dot\r\n"


def job(*rcpts: str, mail_from: str = "alice@sender.test") -> DeliveryJob:
    return DeliveryJob("Q1", D, mail_from, rcpts, DATA, message_id="<m@x>")


async def deliver(lab: MxLab, j: DeliveryJob, **cfg: object):
    courier = Courier(lab.config(**cfg), lab.resolver())
    try:
        return await courier.deliver(j)
    finally:
        await courier.close()


async def test_two_recipients_one_transaction_one_data(lab: MxLab) -> None:
    srv = await lab.add_mx(D, "mx.d.lab.test")
    res = await deliver(lab, job(f"a@{D}", f"b@{D}"))
    assert [r.state for r in res.recipients] == [RecipientState.DELIVERED] * 2
    assert srv.recorder.data_commands == 1
    (msg,) = srv.recorder.messages
    assert msg.rcpt_tos == [f"a@{D}", f"b@{D}"]
    assert msg.data == DATA  # dot-stuffing undone by the server: content intact
    assert msg.helo == "relay.lab.test"
    r = res.recipients[0]
    assert r.reply == "250 2.0.0 queued" and r.enhanced == "2.0.0"
    assert r.remote_host == "mx.d.lab.test"


async def test_per_recipient_4xx_and_5xx(lab: MxLab) -> None:
    rec = Recorder(
        rcpt_replies={
            f"full@{D}": "452 4.2.2 mailbox full",
            f"gone@{D}": "550 5.1.1 no such user",
        }
    )
    srv = await lab.add_mx(D, "mx.d.lab.test", recorder=rec)
    res = await deliver(lab, job(f"ok@{D}", f"full@{D}", f"gone@{D}"))
    by = {r.address: r for r in res.recipients}
    assert by[f"ok@{D}"].state is RecipientState.DELIVERED
    assert by[f"full@{D}"].state is RecipientState.DEFERRED
    assert by[f"full@{D}"].enhanced == "4.2.2" and "mailbox full" in by[f"full@{D}"].reply
    assert by[f"gone@{D}"].state is RecipientState.FAILED
    assert by[f"gone@{D}"].reply == "550 5.1.1 no such user"
    assert srv.recorder.messages[0].rcpt_tos == [f"ok@{D}"]


async def test_all_recipients_refused_sends_no_data(lab: MxLab) -> None:
    rec = Recorder(rcpt_replies={f"x@{D}": "550 5.1.1 no", f"y@{D}": "451 4.3.0 later"})
    srv = await lab.add_mx(D, "mx.d.lab.test", recorder=rec)
    res = await deliver(lab, job(f"x@{D}", f"y@{D}"))
    assert [r.state for r in res.recipients] == [RecipientState.FAILED, RecipientState.DEFERRED]
    assert srv.recorder.data_commands == 0


async def test_mail_and_data_replies_apply_to_all(lab: MxLab) -> None:
    srv = await lab.add_mx(D, "mx.d.lab.test", recorder=Recorder(mail_reply="553 5.7.1 sender no"))
    res = await deliver(lab, job(f"a@{D}", f"b@{D}"))
    assert {r.state for r in res.recipients} == {RecipientState.FAILED}
    assert res.recipients[1].reply == "553 5.7.1 sender no"
    srv.recorder.mail_reply = "451 4.7.1 greylisted"
    res = await deliver(lab, job(f"a@{D}", f"b@{D}"))
    assert {r.state for r in res.recipients} == {RecipientState.DEFERRED}
    srv.recorder.mail_reply = None
    srv.recorder.data_reply = "554 5.6.0 content rejected"
    res = await deliver(lab, job(f"a@{D}", f"b@{D}"))
    assert {r.state for r in res.recipients} == {RecipientState.FAILED}
    assert res.recipients[0].enhanced == "5.6.0"
    srv.recorder.data_reply = "452 4.3.1 disk full"
    res = await deliver(lab, job(f"a@{D}", f"b@{D}"))
    assert {r.state for r in res.recipients} == {RecipientState.DEFERRED}


async def test_421_at_rcpt_defers_the_rest(lab: MxLab) -> None:
    rec = Recorder(rcpt_replies={f"b@{D}": "421 4.3.2 shutting down"})
    srv = await lab.add_mx(D, "mx.d.lab.test", recorder=rec)
    res = await deliver(lab, job(f"a@{D}", f"b@{D}", f"c@{D}"))
    assert [r.state for r in res.recipients] == [RecipientState.DEFERRED] * 3
    assert res.recipients[2].reply.startswith("421")
    assert srv.recorder.messages == []


async def test_smtputf8(lab: MxLab) -> None:
    srv = await lab.add_mx(D, "mx.d.lab.test")
    res = await deliver(lab, job(f"jürgen@{D}"))
    assert res.recipients[0].state is RecipientState.DELIVERED
    assert srv.recorder.messages[0].rcpt_tos == [f"jürgen@{D}"]


async def test_source_ip_binding(lab: MxLab) -> None:
    srv = await lab.add_mx(D, "mx.d.lab.test")
    res = await deliver(lab, job(f"a@{D}"), source_ip="127.0.0.77")
    assert res.recipients[0].state is RecipientState.DELIVERED
    assert srv.recorder.messages[0].peer_ip == "127.0.0.77"


async def test_deadline_in_transaction_defers_without_trying_the_next_mx(lab: MxLab) -> None:
    slow = await lab.add_mx(D, "mx1.d.lab.test", recorder=Recorder(delay=3.0), pref=10)
    second = await lab.add_mx(D, "mx2.d.lab.test", pref=20)
    res = await deliver(lab, job(f"a@{D}"), attempt_timeout=0.5)
    r = res.recipients[0]
    assert r.state is RecipientState.DEFERRED and r.enhanced == "4.4.2" and "deadline" in r.reply
    assert slow.connections == 1 and second.connections == 0


def test_reply_parsing() -> None:
    r = reply_of(250, "2.0.0 first line\n2.0.0 second line")
    assert r == SmtpReply(250, "2.0.0 first line 2.0.0 second line")
    assert enhanced_code(r) == "2.0.0"
    assert enhanced_code(SmtpReply(550, "no enhanced code")) == ""
    assert enhanced_code(SmtpReply(550, "4.1.1 class does not match the code")) == ""


def test_552_at_rcpt_is_taken_as_452() -> None:
    """RFC 5321 4.5.3.1.10: 552 "too many recipients" at RCPT is temporary."""
    r = rcpt_reply(552, "5.5.3 Too many recipients")
    assert (r.code, enhanced_code(r)) == (452, "4.5.3")
    assert r.message.startswith("4.5.3 Too many recipients (552 at RCPT taken as 452")
    assert rcpt_reply(552, "too many").code == 452
    assert rcpt_reply(550, "5.1.1 no such user") == SmtpReply(550, "5.1.1 no such user")
    assert rcpt_reply(452, "4.5.3 later") == SmtpReply(452, "4.5.3 later")


async def test_552_at_rcpt_defers_but_552_at_data_fails(lab: MxLab) -> None:
    rec = Recorder(rcpt_replies={f"many@{D}": "552 5.5.3 Too many recipients"})
    await lab.add_mx(D, "mx.d.lab.test", recorder=rec)
    res = await deliver(lab, job(f"ok@{D}", f"many@{D}"))
    by = {r.address: r for r in res.recipients}
    assert by[f"ok@{D}"].state is RecipientState.DELIVERED
    assert by[f"many@{D}"].state is RecipientState.DEFERRED
    assert by[f"many@{D}"].enhanced == "4.5.3"
    rec.rcpt_replies.clear()
    rec.data_reply = "552 5.3.4 message too big"  # at DATA, 552 stays permanent
    res = await deliver(lab, job(f"ok@{D}"))
    assert res.recipients[0].state is RecipientState.FAILED
