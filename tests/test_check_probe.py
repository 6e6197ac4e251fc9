"""The MX probe (relay.check.probe) against scripted SMTP servers on loopback, for the
replies no lab MTA gives: EHLO refused, STARTTLS offered but refused; and the pure DANE
finding for a failed MX lookup."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest

from relay.check.dane import check_dane
from relay.check.probe import probe_mx
from relay.dane.policy import Lookup


async def _scripted(replies: dict[bytes, bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted ESMTP\r\n")
        while line := await reader.readline():
            verb = line.split()[0].upper() if line.split() else b""
            writer.write(replies.get(verb, b"502 no\r\n"))
            await writer.drain()
            if verb == b"QUIT":
                break
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    srv = await _scripted(request.param)
    yield srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()


@pytest.mark.parametrize(
    ("server", "check_id"),
    [
        ({b"EHLO": b"554 go away\r\n"}, "probe.ehlo"),
        (
            {b"EHLO": b"250-scripted\r\n250 STARTTLS\r\n", b"STARTTLS": b"454 not now\r\n"},
            "probe.starttls_refused",
        ),
    ],
    indirect=["server"],
)
async def test_scripted_replies(server: int, check_id: str) -> None:
    ctx = ssl.create_default_context()
    found = await probe_mx("mx.scripted.test", "127.0.0.1", server, ctx, timeout=5)
    assert [(f.severity, f.id) for f in found] == [("error", check_id)]


def test_dane_mx_lookup_failed_is_an_error() -> None:
    [f] = check_dane("x.test", Lookup.FAILED, {})
    assert (f.severity, f.id) == ("error", "dane.dns_failed")


def test_report_text_colour_only_when_asked_and_spf_macros_not_followed() -> None:
    from relay.check import Finding
    from relay.check.spf import count_lookups
    from relay.commands.check import to_text

    findings = [Finding("SPF", "spf.ptr", "warn", "ptr", "replace ptr")]
    assert "\033[33m⚠\033[0m [spf.ptr]" in to_text("x.test", findings, colour=True)
    plain = to_text("x.test", findings, colour=False)
    assert "\033[" not in plain and "⚠ [spf.ptr] ptr" in plain and "→ replace ptr" in plain
    records = {"x.test": ["v=spf1 include:%{d}.spf.test include:a.test -all"], "a.test": None}
    assert count_lookups("x.test", records) == (2, 1, ())
