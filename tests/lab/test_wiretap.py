"""The outbound SMTP transcript (relay.delivery.wiretap) the lab shows per cell: what the
relay's session wrote and read, in order, also across pipelined transactions (whose reads
swap aiosmtplib's data_received for a while), and nothing when no tap is set."""

from __future__ import annotations

import ssl

import trustme

from relay.delivery.client import SmtpSession
from relay.delivery.wiretap import WIRE_TAP
from relay.lab.attacks import InjectionMta
from relay.lab.runner import Wire


async def _session_to(mta: InjectionMta, two: bool) -> None:
    session = await SmtpSession.open(
        mx_host="mx.tap.lab.test", ip=mta.host, port=mta.port, helo="relay.lab.test",
        tls_context=None, require_tls=False, connect_timeout=5, command_timeout=5,
    )  # fmt: skip
    try:
        msg = b"Subject: t\r\n\r\nbody\r\n"
        await session.send("a@sender.lab.test", ["x@tap.lab.test"], msg)
        if two:  # the connection is reused for a second pipelined transaction
            await session.send("a@sender.lab.test", ["y@tap.lab.test"], msg)
    finally:
        await session.quit()


def _mta() -> InjectionMta:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mx.tap.lab.test").configure_cert(ctx)
    return InjectionMta("127.0.0.1", 0, tls_context=ctx)  # offers PIPELINING


async def test_transcript_of_pipelined_transactions() -> None:
    wire = Wire()
    token = WIRE_TAP.set(wire)
    try:
        async with _mta() as mta:
            await _session_to(mta, two=True)
    finally:
        WIRE_TAP.reset(token)
    lines = list(wire.of("mx.tap.lab.test"))
    assert lines[0].startswith("*: connect to mx.tap.lab.test[127.0.0.1]:")
    assert lines[1].startswith("S: 220 ") and lines[2] == "C: EHLO relay.lab.test"
    assert "S: 250-PIPELINING" in lines
    # both transactions: the pipelined commands, their replies, the content as one line
    for rcpt in ("x", "y"):
        i = lines.index(f"C: RCPT TO:<{rcpt}@tap.lab.test>")
        assert lines[i + 1] == "C: DATA"
        rest = lines[i + 2 :]
        assert rest[:3] == ["S: 250 2.1.0 Ok", "S: 250 2.1.5 Ok", rest[2]]
        assert rest[2].startswith("S: 354") and rest[3].startswith("C: (message content, ")
        assert rest[4].startswith("S: 250 2.0.0")
    assert lines[-2:] == ["C: QUIT", lines[-1]] and lines[-1].startswith("S: 221")
    assert not any("body" in x for x in lines)  # the content itself is not copied


async def test_nothing_is_recorded_without_a_tap() -> None:
    wire = Wire()
    async with _mta() as mta:
        await _session_to(mta, two=False)
        assert mta.messages
    assert wire.lines == {}
