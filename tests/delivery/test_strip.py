"""The STARTTLS-stripping proxy of the downgrade lab (threats row 6)."""

from __future__ import annotations

import asyncio

from relay.lab.strip import StripProxy
from tests.delivery.mxlab import MxLab


async def _reply(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out


async def _ehlo(host: str, port: int) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    await _reply(reader)
    writer.write(b"EHLO client.test\r\n")
    return await _reply(reader), reader, writer


async def test_strips_starttls_same_length_and_keeps_content(lab: MxLab) -> None:
    srv = await lab.add_server("mx.lab.test", "good")
    direct, _, w = await _ehlo(srv.ip, srv.port)
    w.close()
    async with StripProxy((srv.ip, srv.port), ("127.0.0.1", 0)) as proxy:
        stripped, reader, writer = await _ehlo(proxy.host, proxy.port)
        assert b"STARTTLS" in direct and b"STARTTLS" not in stripped
        assert b"250-XXXXXXXA\r\n" in stripped
        assert len(stripped) == len(direct)
        assert stripped == direct.replace(b"STARTTLS", b"XXXXXXXA")
        # a client that sends STARTTLS anyway gets an error, never a TLS session
        writer.write(b"STARTTLS\r\n")
        assert (await _reply(reader)).startswith(b"500")
        for cmd in (b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>", b"DATA"):
            writer.write(cmd + b"\r\n")
            await _reply(reader)
        writer.write(b"Subject: t\r\n\r\nSTARTTLS\r\n250-STARTTLS\r\n.\r\n")
        assert (await _reply(reader)).startswith(b"250")
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        writer.close()
        assert proxy.stripped == 2 and proxy.connections == 1
    (msg,) = srv.recorder.messages
    assert msg.data == b"Subject: t\r\n\r\nSTARTTLS\r\n250-STARTTLS\r\n"
    assert msg.tls_version is None


async def test_upstream_down_closes_the_client(lab: MxLab) -> None:
    async with StripProxy((lab.next_ip(), lab.port), ("127.0.0.1", 0)) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
