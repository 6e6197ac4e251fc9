"""STARTTLS (RFC 3207): offered with a certificate, state forgotten after it, ConnInfo TLS."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiosmtplib
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


async def test_starttls_fills_conninfo(
    tmp_path: Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with running(make_config(tmp_path), ssl_context=server_ctx) as (_, rec, port):
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=port,
            start_tls=True,
            tls_context=client_ctx,
            local_hostname="client.test",
        )
        async with client:
            errors, reply = await client.sendmail("a@b.test", ["info@example.org"], MESSAGE)
            assert client.get_transport_info("sslcontext") is not None
            assert "starttls" not in client.esmtp_extensions  # not offered twice
        assert errors == {} and reply.startswith("2.0.0")
        conn, _, data = rec.calls[0]
        assert conn.tls_version in ("TLSv1.2", "TLSv1.3")
        assert conn.tls_cipher and "_" in conn.tls_cipher
        assert conn.helo == "client.test"
        assert data == MESSAGE


async def test_new_ehlo_required_after_starttls(
    tmp_path: Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with running(make_config(tmp_path), ssl_context=server_ctx) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.reply()
        ehlo = await c.cmd("EHLO client.test")
        assert "250-STARTTLS" in ehlo or "250 STARTTLS" in ehlo
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        assert (await c.cmd("STARTTLS")) == "220 2.0.0 Ready to start TLS"
        await c.writer.start_tls(client_ctx, server_hostname="mx.test")
        # the MAIL before TLS is forgotten, and so is the EHLO
        assert (await c.cmd("RCPT TO:<info@example.org>")).startswith("503 5.5.1")
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("503 5.5.1")
        ehlo = await c.cmd("EHLO client.test")
        assert "STARTTLS" not in ehlo
        assert (await c.cmd("STARTTLS")).startswith("503 5.5.1")
        await c.start_mail()
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        assert rec.calls[0][0].tls_version is not None
        await c.close()


async def test_starttls_command_injection(
    tmp_path: Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """CVE-2011-0411 pattern: STARTTLS and RSET in one write; no RSET reply inside TLS."""
    async with running(make_config(tmp_path), ssl_context=server_ctx) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        c.send(b"STARTTLS\r\nRSET\r\n")
        reply = await c.reply()
        assert reply.startswith("554 5.5.0"), reply  # never "220" then a TLS session
        assert await c.closed()


async def test_starttls_not_offered_without_certificate(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("STARTTLS")).startswith("502 5.5.1")
        await c.close()


async def test_failed_handshake_closes_quietly(tmp_path: Path, server_ctx: ssl.SSLContext) -> None:
    async with running(make_config(tmp_path), ssl_context=server_ctx) as (server, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("STARTTLS")).startswith("220 ")
        c.send(b"this is not a TLS client hello\r\n" * 4)
        assert await c.closed()
        for _ in range(100):
            if server.sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert server.sessions == 0
