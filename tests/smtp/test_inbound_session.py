"""Inbound session: extensions, the happy path, syntax and per-message limits."""

from __future__ import annotations

from pathlib import Path

import aiosmtplib
import pytest

from relay.errors import SmtpReplyError
from tests.smtp.test_inbound_harness import MESSAGE, RawClient, Recorder, make_config, running


async def test_ehlo_advertises_extensions_and_not_pipelining(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"max_message_size": 123456})
    async with running(cfg) as (_, _, port):
        c = await RawClient.connect(port)
        banner = await c.reply()
        assert banner.startswith("220 mx.test ")
        ehlo = await c.cmd("EHLO client.test")
        lines = [x[4:] for x in ehlo.splitlines()]
        assert lines[0] == "mx.test"
        assert set(lines[1:]) == {
            "SIZE 123456",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        }
        assert "STARTTLS" not in ehlo and "PIPELINING" not in ehlo and "AUTH" not in ehlo
        assert (await c.cmd("HELO client.test")) == "250 mx.test"
        assert (await c.cmd("QUIT")).startswith("221 2.0.0")
        assert await c.closed()


async def test_message_accepted_with_aiosmtplib(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    async with running(cfg) as (_, rec, port):
        body = MESSAGE + b".leading dot\r\n..two dots\r\n"
        errors, reply = await aiosmtplib.send(
            body,
            sender="Sender@B.Test",
            recipients=["info@Example.ORG", "INFO@example.org"],
            hostname="127.0.0.1",
            port=port,
            local_hostname="client.test",
            start_tls=False,
        )
        assert errors == {}
        assert reply == "2.0.0 Ok: queued as Q1"
        assert len(rec.calls) == 1
        conn, env, data = rec.calls[0]
        assert data == body  # CRLF line ends kept, dot-unstuffed exactly once
        assert env.mail_from == "Sender@b.test"
        assert env.rcpt_tos == ("info@example.org", "INFO@example.org")
        assert conn.peer_ip == "127.0.0.1" and conn.peer_port > 0
        assert conn.local_ip == "127.0.0.1" and conn.local_port == port
        assert conn.helo == "client.test"
        assert conn.trusted is True
        assert conn.tls_version is None and conn.tls_cipher is None


async def test_envelope_flags_null_sender_and_utf8(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path, aliases={"jörg@example.org": ["j@example.com"], "info@example.org": ["x@y.z"]}
    )
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<> BODY=8BITMIME")).startswith("250 2.1.0")
        # non-ASCII recipient without SMTPUTF8 in MAIL: refused
        assert (await c.cmd("RCPT TO:<jörg@example.org>")).startswith("553 5.6.7")
        assert (await c.cmd("RSET")).startswith("250 ")
        assert (await c.cmd("MAIL FROM:<ü@b.test> SMTPUTF8 SIZE=100")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<jörg@example.org>")).startswith("250 2.1.5")
        assert (await c.cmd("DATA")).startswith("354 ")
        assert (await c.cmd(MESSAGE + "ü\r\n.".encode())).startswith("250 2.0.0")
        _, env, data = rec.calls[0]
        assert env.mail_from == "ü@b.test" and env.smtputf8 and not env.body_8bit
        assert env.rcpt_tos == ("jörg@example.org",)
        assert data.endswith("ü\r\n".encode())
        c2 = await RawClient.connect(port)
        await c2.greet()
        await c2.cmd("MAIL FROM:<> BODY=8BITMIME")
        await c2.cmd("RCPT TO:<info@example.org>")
        await c2.cmd("DATA")
        assert (await c2.cmd(MESSAGE + b".")).startswith("250 ")
        assert rec.calls[1][1].mail_from == "" and rec.calls[1][1].body_8bit
        await c.close()
        await c2.close()


@pytest.mark.parametrize(
    "line, code",
    [
        (b"EHLO a\rX-Evil: 1", "501 5.5.2"),
        (b"EHLO a\x00b", "501 5.5.2"),
        (b"MAIL FROM:<a@b.test>\rRSET", "501 5.5.2"),
        (b"MAIL FROM:<a@b.test>\x1b", "501 5.5.2"),
        (b"RCPT TO:<info@example.org>\x7f", "501 5.5.2"),
        (b"EHLO a\tb", "501 5.5.2"),
        (b"EHLO two words", "501 5.5.4"),
        (b"EHLO", "501 5.5.4"),
        (b"MAIL FROM:a@b.test>", "501 5.1.7"),
        (b"MAIL FROM:<a@@b.test>", "501 5.1.7"),
        (b"MAIL FROM:<a@b.test> FOO=1", "555 5.5.4"),
        (b"MAIL FROM:<a@b.test> SIZE=x", "501 5.5.4"),
        (b"MAIL FROM:<a@b.test> BODY=BINARYMIME", "501 5.5.4"),
        (b"MAIL TO:<a@b.test>", "501 5.5.4"),
        (b"XYZZY", "500 5.5.2"),
        (b"\xff\xfe", "500 5.5.2"),
    ],
)
async def test_bad_commands_get_clear_replies(tmp_path: Path, line: bytes, code: str) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        reply = await c.cmd(line)
        assert reply.startswith(code + " "), reply
        assert (await c.cmd("NOOP")).startswith("250 ")  # session still usable
        await c.close()
        assert rec.calls == []


async def test_bare_lf_command_and_sequence_errors(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, _, port):
        c = await RawClient.connect(port)
        await c.reply()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("503 5.5.1")
        c.send(b"EHLO x\n")
        assert (await c.reply()).startswith("500 5.5.2")
        assert (await c.cmd("EHLO client.test")).startswith("250")
        assert (await c.cmd("RCPT TO:<info@example.org>")).startswith("503 5.5.1")
        assert (await c.cmd("DATA")).startswith("503 5.5.1")
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("503 5.5.1")
        assert (await c.cmd("DATA")).startswith("503 5.5.1")
        assert (await c.cmd("RCPT TO:<info@example.org> FOO=1")).startswith("555 ")
        assert (await c.cmd(b"X" * 2000)).startswith("500 5.5.2")
        assert (await c.cmd("NOOP")).startswith("250 ")
        await c.close()


async def test_size_declared_at_mail_and_actual(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"max_message_size": 2000})
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test> SIZE=2001")).startswith("552 5.3.4")
        assert (await c.cmd("MAIL FROM:<a@b.test> SIZE=2000")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<info@example.org>")).startswith("250 ")
        assert (await c.cmd("DATA")).startswith("354 ")
        big = MESSAGE + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n"
        assert (await c.cmd(big + b".")).startswith("552 5.3.4")
        await c.start_mail()
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        assert len(rec.calls) == 1
        await c.close()


async def test_oversize_data_is_not_buffered(tmp_path: Path) -> None:
    """A 10 MB line with no line end and 6 MB of normal lines: bounded memory, one reply."""
    import tracemalloc

    cfg = make_config(tmp_path, {"max_message_size": 1_000_000})
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        tracemalloc.start()
        try:
            chunk = b"a" * 65536
            for _ in range(160):  # 10 MB without CRLF
                c.send(chunk)
                await c.writer.drain()
            c.send(b"\r\n")
            line = b"b" * 998 + b"\r\n"
            for _ in range(100):
                c.send(line * 60)
                await c.writer.drain()
            c.send(b".\r\n")
            reply = await c.reply(timeout=30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert reply.startswith("500 5.5.2"), reply  # the overlong line is reported first
        assert peak < 8_000_000, peak
        assert rec.calls == []
        await c.close()


async def test_line_length_limit(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        ok_line = b"x" * 998 + b"\r\n" + b"." + b"y" * 998 + b"\r\n"  # 1000 and 1001 octets
        assert (await c.cmd(MESSAGE + ok_line + b".")).startswith("250 ")
        await c.start_mail()
        assert (await c.cmd(MESSAGE + b"x" * 1000 + b"\r\n.")).startswith("500 5.5.2")
        assert len(rec.calls) == 1
        await c.close()


async def test_header_block_limit(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"max_header_size": 2048, "max_message_size": 1_000_000})
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(40))
        assert (await c.cmd(headers + b"\r\nbody\r\n.")).startswith("552 5.3.4")
        await c.start_mail()
        # the same bytes in the body are fine
        assert (await c.cmd(b"Subject: x\r\n\r\n" + headers + b".")).startswith("250 ")
        assert len(rec.calls) == 1
        await c.close()


async def test_received_header_loop_limit(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        for count, expect in ((49, "250 "), (50, "554 5.4.6"), (60, "554 5.4.6")):
            await c.start_mail()
            hops = b"".join(
                b"Received: from h%d by h; Mon, 1 Jan 2024\r\n" % i for i in range(count)
            )
            reply = await c.cmd(hops + MESSAGE + b".")
            assert reply.startswith(expect), (count, reply)
        await c.start_mail()
        folded = b"".join(b"received :\r\n\tfrom h%d\r\n" % i for i in range(50))
        assert (await c.cmd(folded + MESSAGE + b".")).startswith("554 5.4.6")
        # "Received:" lines in the body do not count
        await c.start_mail()
        body_hops = b"".join(b"Received: from h%d\r\n" % i for i in range(60))
        assert (await c.cmd(MESSAGE + body_hops + b".")).startswith("250 ")
        assert len(rec.calls) == 2
        await c.close()


async def test_recipient_limit(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"max_recipients": 3})
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        for i in range(3):
            assert (await c.cmd(f"RCPT TO:<r{i}@remote.test>")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<r4@remote.test>")).startswith("452 4.5.3")
        assert (await c.cmd("RCPT TO:<r5@remote.test>")).startswith("452 4.5.3")
        assert (await c.cmd("DATA")).startswith("354 ")
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        assert rec.calls[0][1].rcpt_tos == ("r0@remote.test", "r1@remote.test", "r2@remote.test")
        await c.close()


@pytest.mark.parametrize(
    "exc, expect",
    [
        (
            SmtpReplyError(550, "5.7.1", "DMARC policy rejection"),
            "550 5.7.1 DMARC policy rejection",
        ),
        (SmtpReplyError(451, "4.3.0", "store error"), "451 4.3.0 store error"),
        (SmtpReplyError(452, "4.3.1", "disk full\r\nX"), "452 4.3.1 disk full  X"),
        (SmtpReplyError(250, "2.0.0", "not an error code"), "451 4.3.0 Error: internal error"),
        (RuntimeError("boom\r\n250 fake"), "451 4.3.0 Error: internal error"),
        (OSError(5, "EIO"), "451 4.3.0 Error: internal error"),
    ],
)
async def test_submit_failures_never_give_250(tmp_path: Path, exc: Exception, expect: str) -> None:
    async def fail(_: bytes) -> str:
        raise exc

    async with running(make_config(tmp_path), Recorder(fail)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        reply = await c.cmd(MESSAGE + b".")
        assert reply == expect
        assert "Traceback" not in reply and "boom" not in reply
        assert (await c.cmd("NOOP")).startswith("250 ")  # one reply only, session alive
        assert len(rec.calls) == 1
        await c.close()


async def test_low_disk_refuses_mail(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"max_message_size": 10_000, "min_free_space": 50_000})
    free = [49_999]
    async with running(cfg, free_space=lambda: free[0]) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("452 4.3.1")
        free[0] = 55_000
        assert (await c.cmd("MAIL FROM:<a@b.test> SIZE=6000")).startswith("452 4.3.1")
        assert (await c.cmd("MAIL FROM:<a@b.test> SIZE=4000")).startswith("250 ")
        await c.close()


async def test_default_disk_check_uses_the_store_directory(tmp_path: Path) -> None:
    from relay.smtp.limits import disk_free

    assert disk_free(tmp_path / "no" / "such" / "dir" / "x.sqlite3") > 0
    cfg = make_config(tmp_path)
    async with running(cfg, free_space=None) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        await c.close()


def test_aiosmtpd_internals_we_build_on() -> None:
    """SmtpSession skips SMTP.__init__ and reuses these; re-check them on any upgrade."""
    import aiosmtpd
    from aiosmtpd.smtp import SMTP

    assert aiosmtpd.__version__.startswith("1.4."), aiosmtpd.__version__
    for name in ("connection_made", "connection_lost", "eof_received", "push", "smtp_STARTTLS"):
        assert callable(getattr(SMTP, name))
    import inspect

    src = inspect.getsource(SMTP.connection_made)
    assert "_buffer.clear()" in src  # CVE-2024-34083: pre-TLS input dropped
