"""REQUIRETLS inbound (RFC 8689 section 4.1): offered only after STARTTLS; the MAIL
parameter in clear text is refused with 530 5.7.10; over TLS it reaches the envelope."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from tests.smtp.test_inbound_harness import MESSAGE, RawClient, make_config, running


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_requiretls_only_after_starttls(
    tmp_path: Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with running(make_config(tmp_path), ssl_context=server_ctx) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.reply()
        ehlo = await c.cmd("EHLO client.test")
        assert "REQUIRETLS" not in ehlo
        reply = await c.cmd("MAIL FROM:<a@b.test> REQUIRETLS")
        assert reply.startswith("530 5.7.10"), reply
        assert (await c.cmd("STARTTLS")).startswith("220")
        await c.writer.start_tls(client_ctx, server_hostname="mx.test")
        ehlo = await c.cmd("EHLO client.test")
        assert "250-REQUIRETLS" in ehlo or "250 REQUIRETLS" in ehlo
        assert (await c.cmd("MAIL FROM:<a@b.test> REQUIRETLS=yes")).startswith("501 5.5.4")
        assert (await c.cmd("MAIL FROM:<a@b.test> REQUIRETLS")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<info@example.org>")).startswith("250 ")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        _, env, _ = rec.calls[0]
        assert env.requiretls is True
        # the next transaction on the session starts without it
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<info@example.org>")).startswith("250 ")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        assert rec.calls[1][1].requiretls is False
        await c.close()


async def test_no_requiretls_without_a_certificate(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, _rec, port):
        c = await RawClient.connect(port)
        await c.reply()
        assert "REQUIRETLS" not in await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<a@b.test> REQUIRETLS")).startswith("530 5.7.10")
        await c.close()
