"""RFC 2920 PIPELINING in the outbound client: [RSET] MAIL, RCPTs and DATA in one write,
replies read in order, content only after 354 with a recipient accepted, a lone "." when
DATA got 354 without one (section 3.1), the deferred RSET of a pooled connection, and the
old one-command-per-write path for servers without PIPELINING.

``RawMx`` is a small SMTP server of our own on 127.0.0.x that records every chunk it
reads, so the tests can see what arrived in one segment."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from relay.delivery.client import ConnectionLost, SmtpSession
from relay.delivery.courier import Courier
from relay.model import DeliveryJob, RecipientState
from tests.delivery.mxlab import MxLab, Recorder

D = "d.lab.test"
DATA = b"Subject: t\r\n\r\nline one\r\n.leading dot\r\n"
STUFFED = b"Subject: t\r\n\r\nline one\r\n..leading dot\r\n.\r\n"
SIZE = f"SIZE={len(DATA)}"


async def open_session(host: str, port: int) -> SmtpSession:
    return await SmtpSession.open(
        mx_host="mx.d.lab.test",
        ip=host,
        port=port,
        helo="relay.lab.test",
        tls_context=None,
        require_tls=False,
        connect_timeout=2.0,
        command_timeout=2.0,
    )


def commands(*rcpts: str, rset: bool = False, mail_from: str = "alice@sender.test") -> bytes:
    lines = ["RSET"] if rset else []
    lines.append(f"MAIL FROM:<{mail_from}> {SIZE}")
    lines += [f"RCPT TO:<{r}>" for r in rcpts]
    lines.append("DATA")
    return "".join(f"{line}\r\n" for line in lines).encode()


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def job(*rcpts: str, qid: str = "Q1") -> DeliveryJob:
    return DeliveryJob(qid, D, "alice@sender.test", rcpts, DATA, message_id=f"<{qid}@x>")


# ---------------------------------------------------------------------- one write


async def test_mail_rcpts_and_data_arrive_in_one_segment(raw_factory: Any) -> None:
    mx = await raw_factory()
    s = await open_session(mx.ip, mx.port)
    try:
        assert s.pipelining
        tx = await s.send("alice@sender.test", [f"a@{D}", f"b@{D}", f"c@{D}"], DATA)
    finally:
        await s.quit()
    assert tx.data_sent and tx.usable
    assert [r.code for _, r in tx.replies] == [250, 250, 250]
    assert tx.replies[0][1].message == "2.0.0 queued"
    (conn,) = mx.chunks
    # EHLO, then one chunk with every command up to DATA, then the content, then QUIT
    assert conn[1] == commands(f"a@{D}", f"b@{D}", f"c@{D}")
    assert conn[2] == STUFFED
    (msg,) = mx.stored
    assert msg.rcpts == [f"a@{D}", f"b@{D}", f"c@{D}"] and msg.data == DATA


@pytest.mark.parametrize("trickle", ["turn", "ms"])
async def test_replies_trickling_in_one_by_one_are_all_read(raw_factory: Any, trickle: str) -> None:
    """Each reply in its own segment, the next arriving while the previous one still
    waits to be picked up: none may be lost."""
    mx = await raw_factory(trickle=trickle, rcpt_replies={f"b@{D}": "550 5.1.1 no such user"})
    s = await open_session(mx.ip, mx.port)
    try:
        rcpts = [f"r{i}@{D}" for i in range(8)] + [f"b@{D}"]
        tx = await asyncio.wait_for(s.send("alice@sender.test", rcpts, DATA), 3)
    finally:
        await s.quit()
    assert tx.data_sent
    assert [r.code for _, r in tx.replies] == [250] * 8 + [550]
    assert mx.stored[0].rcpts == rcpts[:8]


async def test_replies_arriving_before_the_previous_is_picked_up(raw_factory: Any) -> None:
    """The timing a socket cannot stage reliably: the next reply arrives while the
    previous one, parsed, still waits for the reading task (aiosmtplib alone drops it).
    The test speaks for the server on the client's protocol."""
    mx = await raw_factory()
    s = await open_session(mx.ip, mx.port)
    mx.mute = True
    task = asyncio.create_task(s.send("alice@sender.test", [f"a@{D}", f"b@{D}"], DATA))
    await until(lambda: len(mx.chunks[0]) >= 2)
    protocol = s._smtp.protocol
    assert protocol is not None
    for reply in (b"250 2.1.0 ok", b"250 2.1.5 ok", b"550 5.1.1 no", b"354 go"):
        protocol.data_received(reply + b"\r\n")
    await until(lambda: len(mx.chunks[0]) >= 3 or task.done())
    assert mx.chunks[0][2] == STUFFED
    protocol.data_received(b"250 2.0.0 queued\r\n")
    tx = await asyncio.wait_for(task, 2)
    assert [str(r) for _, r in tx.replies] == ["250 2.0.0 queued", "550 5.1.1 no"]
    assert tx.data_sent and tx.usable
    await s.quit()


async def test_mixed_rcpt_outcomes_one_data(lab: MxLab, raw_factory: Any) -> None:
    """aiosmtpd told to advertise PIPELINING: per-recipient replies, one DATA."""

    class PipeRecorder(Recorder):
        async def handle_EHLO(
            self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
        ) -> list[str]:
            session.host_name = hostname
            return [*responses[:-1], "250-PIPELINING", responses[-1]]

    rec = PipeRecorder(rcpt_replies={f"gone@{D}": "550 5.1.1 no such user"})
    srv = await lab.add_server("mx.d.lab.test", cert="none", recorder=rec)
    s = await open_session(srv.ip, srv.port)
    try:
        assert s.pipelining
        tx = await s.send("alice@sender.test", [f"gone@{D}", f"ok@{D}"], DATA)
        tx2 = await s.send("alice@sender.test", [f"ok@{D}"], DATA)  # still in step
    finally:
        await s.quit()
    assert dict(tx.replies)[f"gone@{D}"].message == "5.1.1 no such user"
    assert dict(tx.replies)[f"ok@{D}"].code == 250 and tx.data_sent and tx.usable
    assert tx2.data_sent
    assert rec.data_commands == 2
    assert [m.rcpt_tos for m in rec.messages] == [[f"ok@{D}"], [f"ok@{D}"]]
    assert rec.messages[0].data == DATA


async def test_all_rcpts_refused_and_data_354_sends_a_lone_dot(raw_factory: Any) -> None:
    mx = await raw_factory(
        data_354_without_rcpt=True,
        rcpt_replies={f"x@{D}": "550 5.1.1 no", f"y@{D}": "451 4.3.0 later"},
    )
    s = await open_session(mx.ip, mx.port)
    try:
        tx = await s.send("alice@sender.test", [f"x@{D}", f"y@{D}"], DATA)
        assert not tx.data_sent and tx.usable
        assert [str(r) for _, r in tx.replies] == ["550 5.1.1 no", "451 4.3.0 later"]
        tx2 = await s.send("alice@sender.test", [f"z@{D}"], DATA)  # connection in step
    finally:
        await s.quit()
    assert tx2.data_sent and tx2.replies[0][1].code == 250
    conn = mx.chunks[0]
    assert conn[1] == commands(f"x@{D}", f"y@{D}") and conn[2] == b".\r\n"
    assert conn[3] == commands(f"z@{D}")  # no RSET needed after the dot
    assert mx.dots_without_rcpt == 1
    assert [m.rcpts for m in mx.stored] == [[f"z@{D}"]]


async def test_all_rcpts_refused_and_data_refused(raw_factory: Any) -> None:
    mx = await raw_factory(rcpt_replies={f"x@{D}": "550 5.1.1 no"})
    s = await open_session(mx.ip, mx.port)
    try:
        tx = await s.send("alice@sender.test", [f"x@{D}"], DATA)
        assert str(tx.replies[0][1]) == "550 5.1.1 no" and not tx.data_sent and tx.usable
        tx2 = await s.send("alice@sender.test", [f"z@{D}"], DATA)
    finally:
        await s.quit()
    assert tx2.data_sent
    conn = mx.chunks[0]
    assert conn[1] == commands(f"x@{D}")
    assert conn[2] == commands(f"z@{D}", rset=True)  # the envelope is dropped first
    assert mx.dots_without_rcpt == 0 and len(mx.stored) == 1


async def test_mail_refused_gives_every_recipient_the_mail_reply(raw_factory: Any) -> None:
    mx = await raw_factory(mail_reply="553 5.7.1 sender refused")
    s = await open_session(mx.ip, mx.port)
    try:
        tx = await s.send("alice@sender.test", [f"a@{D}", f"b@{D}"], DATA)
        assert [str(r) for _, r in tx.replies] == ["553 5.7.1 sender refused"] * 2
        assert not tx.data_sent and tx.usable
        mx.mail_reply = "250 2.1.0 ok"
        tx2 = await s.send("alice@sender.test", [f"a@{D}"], DATA)
    finally:
        await s.quit()
    assert tx2.data_sent and mx.connections == 1
    assert [m.rcpts for m in mx.stored] == [[f"a@{D}"]]


async def test_mail_421_raises_connection_lost(raw_factory: Any) -> None:
    mx = await raw_factory(on_command={"MAIL": "421 4.3.2 going down"})
    s = await open_session(mx.ip, mx.port)
    with pytest.raises(ConnectionLost) as info:
        await s.send("alice@sender.test", [f"a@{D}"], DATA)
    assert info.value.reply is not None and info.value.reply.code == 421
    assert not s.connected and mx.stored == []


async def test_without_pipelining_one_command_per_write(raw_factory: Any) -> None:
    mx = await raw_factory(pipelining=False)
    s = await open_session(mx.ip, mx.port)
    try:
        assert not s.pipelining
        tx = await s.send("alice@sender.test", [f"a@{D}", f"b@{D}"], DATA)
        s.pending_rset = True  # what the courier asks of a reused connection
        tx2 = await s.send("alice@sender.test", [f"a@{D}"], DATA)
    finally:
        await s.quit()
    assert tx.data_sent and tx2.data_sent
    lines = [c.decode() for c in mx.chunks[0][1:]]
    assert lines[:5] == [
        f"MAIL FROM:<alice@sender.test> {SIZE}\r\n",
        f"RCPT TO:<a@{D}>\r\n",
        f"RCPT TO:<b@{D}>\r\n",
        "DATA\r\n",
        STUFFED.decode(),
    ]
    assert lines[5:7] == ["RSET\r\n", f"MAIL FROM:<alice@sender.test> {SIZE}\r\n"]
    assert len(mx.stored) == 2


# ---------------------------------------------------------------------- connection lost


async def test_drop_after_first_rcpt_defers_everyone(raw_factory: Any) -> None:
    mx = await raw_factory(on_command={f"RCPT TO:<b@{D}>": "close"})
    s = await open_session(mx.ip, mx.port)
    tx = await s.send("alice@sender.test", [f"a@{D}", f"b@{D}", f"c@{D}"], DATA)
    assert not tx.data_sent and not tx.usable and not s.connected
    for _, reply in tx.replies:
        assert reply.code == 451 and reply.message.startswith("4.4.2")
        assert "connection lost at RCPT" in reply.message
    assert mx.stored == []


async def test_drop_at_data_defers_the_accepted(raw_factory: Any) -> None:
    mx = await raw_factory(
        on_command={"DATA": "close"}, rcpt_replies={f"x@{D}": "550 5.1.1 no such user"}
    )
    s = await open_session(mx.ip, mx.port)
    tx = await s.send("alice@sender.test", [f"a@{D}", f"x@{D}"], DATA)
    replies = dict(tx.replies)
    assert replies[f"a@{D}"].code == 451 and "during DATA" in replies[f"a@{D}"].message
    assert str(replies[f"x@{D}"]) == "550 5.1.1 no such user"
    assert not tx.data_sent and not tx.usable


async def test_421_at_rcpt_applies_to_the_rest_and_the_accepted(raw_factory: Any) -> None:
    mx = await raw_factory(on_command={f"RCPT TO:<b@{D}>": "421 4.3.2 shutting down"})
    s = await open_session(mx.ip, mx.port)
    tx = await s.send("alice@sender.test", [f"a@{D}", f"b@{D}", f"c@{D}"], DATA)
    assert [str(r) for _, r in tx.replies] == ["421 4.3.2 shutting down"] * 3
    assert not tx.usable and mx.stored == []


async def test_drop_before_mail_raises_connection_lost(raw_factory: Any) -> None:
    mx = await raw_factory(on_command={"MAIL": "close"})
    s = await open_session(mx.ip, mx.port)
    with pytest.raises(ConnectionLost):
        await s.send("alice@sender.test", [f"a@{D}"], DATA)
    assert not s.connected


async def test_refused_rset_raises_connection_lost_without_content(raw_factory: Any) -> None:
    mx = await raw_factory(on_command={"RSET": "421 4.4.2 idle too long"})
    s = await open_session(mx.ip, mx.port)
    s.pending_rset = True
    with pytest.raises(ConnectionLost) as info:
        await s.send("alice@sender.test", [f"a@{D}"], DATA)
    assert "RSET" in info.value.detail
    assert not s.connected
    await asyncio.sleep(0.01)
    assert mx.chunks[0][1] == commands(f"a@{D}", rset=True)
    assert all(STUFFED not in c for c in mx.chunks[0]) and mx.stored == []


# ---------------------------------------------------------------------- the courier


async def test_reuse_sends_rset_in_the_same_write(lab: MxLab, raw_factory: Any) -> None:
    mx = await raw_factory(port=lab.port)
    lab.zone.add(D, "MX", (10, "mx.d.lab.test"))
    lab.zone.set("mx.d.lab.test", "A", [mx.ip])
    courier = Courier(lab.config(), lab.resolver())
    try:
        r1 = await courier.deliver(job(f"a@{D}", qid="Q1"))
        r2 = await courier.deliver(job(f"b@{D}", f"c@{D}", qid="Q2"))
    finally:
        await courier.close()
    assert r1.recipients[0].state is RecipientState.DELIVERED
    assert [r.state for r in r2.recipients] == [RecipientState.DELIVERED] * 2
    (conn,) = mx.chunks
    assert conn[1] == commands(f"a@{D}")
    assert conn[3] == commands(f"b@{D}", f"c@{D}", rset=True)
    assert [m.rcpts for m in mx.stored] == [[f"a@{D}"], [f"b@{D}", f"c@{D}"]]


@pytest.mark.parametrize("action", ["close", "421 4.4.2 idle timeout"])
async def test_reused_connection_dead_at_rset_is_retried_once(
    lab: MxLab, raw_factory: Any, action: str
) -> None:
    """The server dropped the idle connection (we learn it only from the pipelined RSET):
    the message goes out on a new connection, exactly once, not counted as a failure."""
    mx = await raw_factory(port=lab.port)
    lab.zone.add(D, "MX", (10, "mx.d.lab.test"))
    lab.zone.set("mx.d.lab.test", "A", [mx.ip])
    courier = Courier(lab.config(), lab.resolver())
    try:
        await courier.deliver(job(f"a@{D}", qid="Q1"))
        mx.on_command["RSET"] = action
        r2 = await courier.deliver(job(f"b@{D}", qid="Q2"))
        r3 = await courier.deliver(job(f"c@{D}", qid="Q3"))  # the new connection pooled
    finally:
        await courier.close()
    assert r2.recipients[0].state is RecipientState.DELIVERED
    assert r3.recipients[0].state is RecipientState.DELIVERED
    assert mx.connections == 2
    assert [m.rcpts for m in mx.stored] == [[f"a@{D}"], [f"b@{D}"], [f"c@{D}"]]
    assert mx.chunks[1][1] == commands(f"b@{D}")
    assert mx.chunks[1][3] == commands(f"c@{D}", rset=True)
    assert not courier.is_dead(D)


def test_early_reply_kept_under_uvloop() -> None:
    """uvloop's TCP transport keeps the protocol's data_received bound at set_protocol:
    the pipelined reply reader must still see bytes that arrive while a parsed reply
    awaits pickup (the state is set up by hand; the bytes come over the real socket)."""
    import uvloop

    from relay.delivery.client import _Replies

    async def scenario() -> bytes:
        got_ehlo = asyncio.Event()
        writers: list[asyncio.StreamWriter] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            writer.write(b"220 mx ready\r\n")
            await reader.readline()
            writer.write(b"250-mx\r\n250 PIPELINING\r\n")
            got_ehlo.set()
            await reader.read()  # until the client closes

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            s = await open_session("127.0.0.1", port)
            await got_ehlo.wait()
            protocol = s._smtp.protocol
            assert protocol is not None
            async with _Replies(s._smtp, protocol, 2):
                # a parsed reply awaits pickup: aiosmtplib's own handler drops new bytes
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                protocol._response_waiter = done  # type: ignore[assignment]
                writers[0].write(b"250 2.1.5 early\r\n")
                for _ in range(50):
                    await asyncio.sleep(0.01)
                    if protocol._buffer:
                        break
                kept = bytes(protocol._buffer)
            s.close()
            return kept
        finally:
            for w in writers:
                w.close()
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == b"250 2.1.5 early\r\n"


async def test_552_to_a_pipelined_rcpt_is_temporary(raw_factory: Any) -> None:
    mx = await raw_factory(rcpt_replies={f"b@{D}": "552 5.5.3 Too many recipients"})
    s = await open_session(mx.ip, mx.port)
    try:
        assert s.pipelining
        tx = await s.send("alice@sender.test", [f"a@{D}", f"b@{D}"], DATA)
    finally:
        await s.quit()
    assert [(a, r.code) for a, r in tx.replies] == [(f"a@{D}", 250), (f"b@{D}", 452)]
    assert tx.data_sent and [m.rcpts for m in mx.stored] == [[f"a@{D}"]]


async def test_a_silent_server_times_out_each_read_and_the_session_is_left_closed(
    raw_factory: Any,
) -> None:
    """A server that takes the pipelined commands and never answers costs the command
    timeout, no more: the reply read raises the timeout, the connection is given up and
    nothing was stored."""
    mx = await raw_factory()
    s = await SmtpSession.open(
        mx_host="mx.d.lab.test",
        ip=mx.ip,
        port=mx.port,
        helo="relay.lab.test",
        tls_context=None,
        require_tls=False,
        connect_timeout=2.0,
        command_timeout=0.3,
    )
    mx.mute = True
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionLost, match="timeout"):
            await asyncio.wait_for(s.send("alice@sender.test", [f"a@{D}"], DATA), 3)
    finally:
        await s.quit()
    assert 0.25 <= time.monotonic() - started < 2.0
    protocol = s._smtp.protocol
    assert protocol is None or protocol._response_pending is False
    assert mx.stored == []
