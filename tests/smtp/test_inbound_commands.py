"""The command line over a raw socket: 512 octets (RFC 5321 4.5.3.1.4), HELP lists only
what is offered, the submit watchdog (421 4.3.0 when the store writer stalls)."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import trustme

from relay.smtp.server import COMMAND_LIMIT, MAIL_LIMIT, RCPT_LIMIT
from tests.smtp.test_inbound_harness import MESSAGE, RawClient, Recorder, make_config, running

TOO_LONG = "500 5.5.2 Line too long"


def _noop(total: int) -> bytes:
    """A NOOP command line of exactly ``total`` octets with its CRLF."""
    return b"NOOP " + b"x" * (total - 7)


async def test_command_line_of_512_octets_is_accepted_513_refused(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd(_noop(COMMAND_LIMIT))).startswith("250 ")
        reply = await c.cmd(_noop(COMMAND_LIMIT + 1))
        assert reply.startswith(TOO_LONG) and "512" in reply, reply
        # the line was dropped whole: the session goes on in step
        assert (await c.cmd("NOOP")).startswith("250 ")
        await c.close()


async def test_lines_past_the_reader_limit_get_the_same_reply(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd(b"MAIL FROM:<" + b"a" * 5000 + b"@b.test>")).startswith(TOO_LONG)
        await c.start_mail()
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        assert len(rec.calls) == 1
        await c.close()


async def test_mail_and_rcpt_get_the_octets_of_their_extensions(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        params = b" SIZE=1000 BODY=8BITMIME SMTPUTF8"
        head = b"MAIL FROM:<"
        local = b"a" * (MAIL_LIMIT - 2 - len(head) - len(b"@b.test>") - len(params))
        line = head + local + b"@b.test>" + params
        assert len(line) + 2 == MAIL_LIMIT > COMMAND_LIMIT
        reply = await c.cmd(line)
        assert not reply.startswith(TOO_LONG), reply  # judged on its content, not its length
        assert (await c.cmd(line + b"0")).startswith(TOO_LONG)
        assert (await c.cmd("RSET")).startswith("250")
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        # RCPT gets NOTIFY's and ORCPT's octets (RFC 3461 5), and not one more
        rcpt = b"RCPT TO:<" + b"r" * (RCPT_LIMIT + 1 - 2 - 9 - 13) + b"@example.org>"
        assert len(rcpt) + 2 == RCPT_LIMIT + 1 > COMMAND_LIMIT + 500
        assert (await c.cmd(rcpt)).startswith(TOO_LONG)
        assert not (await c.cmd(rcpt[:-14] + b"@example.org>")).startswith(TOO_LONG)
        await c.close()


async def test_help_lists_starttls_only_when_offered(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        reply = await c.cmd("HELP")
        assert reply.startswith("214 ") and "STARTTLS" not in reply, reply
        assert "MAIL" in reply and "EXPN" not in reply
        await c.close()
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test", "127.0.0.1").configure_cert(ctx)
    async with running(make_config(tmp_path), ssl_context=ctx) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert "STARTTLS" in await c.cmd("HELP")
        await c.close()


async def test_submit_watchdog_gives_421_when_the_store_writer_stalls(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def stalled(_data: bytes) -> str:
        await never.wait()  # a store writer that never answers
        return "2.0.0 Ok"

    cfg = make_config(tmp_path, {"session_timeout": 1.0})
    async with running(cfg, Recorder(stalled)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        t0 = time.monotonic()
        reply = await c.cmd(MESSAGE + b".")
        assert reply.startswith("421 4.3.0"), reply
        assert 0.9 < time.monotonic() - t0 < 3.0
        assert await c.closed(3)
        assert len(rec.calls) == 1
        never.set()  # let the shielded write finish so the server stops cleanly
