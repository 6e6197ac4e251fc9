"""No open relay, end to end: attempts from an untrusted source address (127.0.0.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.smtp.test_inbound_harness import MESSAGE, UNTRUSTED, RawClient, make_config, running


@pytest.mark.parametrize(
    "rcpt, expect",
    [
        ("<v@ext.test>", "554 5.7.1"),
        ("<v%ext.test@example.org>", "554 5.7.1"),
        ("<ext.test!v@example.org>", "554 5.7.1"),
        ("<@example.org:v@ext.test>", "554 5.7.1"),
        ("<@example.org,@b.test:info@example.org>", "554 5.7.1"),
        ('<"v@ext.test"@example.org>', "554 5.7.1"),
        ("<v@[192.0.2.1]>", "554 5.7.1"),
        ("<v@[IPv6:2001:db8::1]>", "554 5.7.1"),
        ("<nobody@example.org>", "550 5.1.1"),
        ("<info@sub.example.org>", "554 5.7.1"),
        ("<info@example.org.>", "501 5.1.3"),
    ],
)
async def test_untrusted_client_cannot_relay(tmp_path: Path, rcpt: str, expect: str) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port, source=UNTRUSTED)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        reply = await c.cmd(f"RCPT TO:{rcpt}")
        assert reply.startswith(expect + " "), reply
        assert (await c.cmd("DATA")).startswith("503 5.5.1")  # no recipient was taken
        await c.close()
        assert rec.calls == []


async def test_untrusted_client_reaches_aliases(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port, source=UNTRUSTED)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<v@ext.test>")).startswith("554 5.7.1")
        assert (await c.cmd("RCPT TO:<Info@EXAMPLE.org>")).startswith("250 2.1.5")
        assert (await c.cmd('RCPT TO:<"postmaster"@example.org>')).startswith("250 2.1.5")
        assert (await c.cmd("DATA")).startswith("354 ")
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        conn, env, _ = rec.calls[0]
        assert conn.trusted is False and conn.peer_ip == UNTRUSTED
        assert env.rcpt_tos == ("Info@example.org", "postmaster@example.org")
        await c.close()


async def test_trusted_client_relays_anywhere_but_not_to_unknown_local(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<v@ext.test>")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<@hop.test:w@ext.test>")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<x@[192.0.2.1]>")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<nobody@example.org>")).startswith("550 5.1.1")
        assert (await c.cmd("DATA")).startswith("354 ")
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        assert rec.calls[0][1].rcpt_tos == ("v@ext.test", "w@ext.test", "x@[192.0.2.1]")
        assert rec.calls[0][0].trusted is True
        await c.close()


async def test_many_rejected_recipients_end_the_session(tmp_path: Path) -> None:
    """Dictionary attacks: each 5xx RCPT counts towards the junk limit."""
    cfg = make_config(tmp_path, {"max_junk_commands": 5})
    async with running(cfg) as (_, _, port):
        c = await RawClient.connect(port, source=UNTRUSTED)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        for i in range(5):
            assert (await c.cmd(f"RCPT TO:<u{i}@example.org>")).startswith("550 5.1.1")
        assert (await c.cmd("RCPT TO:<u9@example.org>")).startswith("550 5.1.1")
        assert (await c.reply()).startswith("421 4.7.0")
        assert await c.closed()
