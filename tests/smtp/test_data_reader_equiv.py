"""The bulk DATA reader (relay.smtp.data_reader.read_data) decides exactly as the line-at-a-time
reader it replaced: same content (dot-unstuffed), same reply, same pipelining verdict
and the same input left for the command reader, whatever the bytes and however the
network splits them. The reference below is the previous implementation, kept verbatim
(one readuntil per CRLF line)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.smtp.data_reader import LINE_LIMIT, SYNC_ERROR, read_data
from relay.smtp.limits import SessionLimits

_HEADER_START = re.compile(rb"[!-9;-~]+[ \t]*:")
_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)


async def reference_read_data(
    reader: asyncio.StreamReader, lim: SessionLimits
) -> tuple[bytes | None, str | None, bool]:
    lines: list[bytes] = []
    size = 0
    bad = too_long = too_big = header_big = False
    in_headers = True
    header_bytes = 0
    received = 0
    tail = False
    while True:
        try:
            line: bytes = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(exc.consumed)
            if b"\r" in chunk or b"\n" in chunk or b"\x00" in chunk:
                bad = True
            too_long = tail = True
            size += len(chunk)
            lines.clear()
            continue
        n = len(line)
        if tail:
            tail = False
            size += n
            if line.count(b"\r") != 1 or line.count(b"\n") != 1 or b"\x00" in line:
                bad = True
            continue
        if n == 3 and line == b".\r\n":
            break
        size += n
        if line.count(b"\r") != 1 or line.count(b"\n") != 1 or b"\x00" in line:
            bad = True
        if n > LINE_LIMIT:
            too_long = True
        if in_headers:
            if n == 2:
                in_headers = False
            elif line[0] in (32, 9):
                header_bytes += n
            elif _HEADER_START.match(line):
                header_bytes += n
                if _RECEIVED.match(line):
                    received += 1
            else:
                in_headers = False
            if header_bytes > lim.max_header_size:
                header_big = True
        if size > lim.max_message_size:
            too_big = True
        if bad or too_long or too_big or header_big:
            lines.clear()
            continue
        lines.append(line[1:] if line[0] == 46 else line)
    pending = bytes(reader._buffer)  # type: ignore[attr-defined]
    if pending and pending.upper() != b"QUIT\r\n":
        return None, SYNC_ERROR, True
    if bad:
        return None, "bad", False
    if too_long:
        return None, "long", False
    if too_big:
        return None, "big", False
    if header_big:
        return None, "header", False
    if received >= lim.max_received_headers:
        return None, "loop", False
    return b"".join(lines), None, False


def _kind(reply: str | None) -> str | None:
    if reply is None or reply == SYNC_ERROR:
        return reply
    for code, kind in (
        ("550 5.6.0", "bad"),
        ("500 5.5.2", "long"),
        ("552 5.3.4 Error: message size", "big"),
        ("552 5.3.4 Error: message header", "header"),
        ("554 5.4.6", "loop"),
    ):
        if reply.startswith(code):
            return kind
    raise AssertionError(reply)


async def _run(
    chunks: list[bytes], eof: bool, read: Any
) -> tuple[tuple[bytes | None, str | None, bool] | str, bytes]:
    reader = asyncio.StreamReader(limit=LINE_LIMIT)

    async def feed() -> None:
        for c in chunks:
            reader.feed_data(c)
            await asyncio.sleep(0)
        if eof:
            reader.feed_eof()

    feeder = asyncio.create_task(feed())
    try:
        out: Any = await asyncio.wait_for(read(reader), 5)
    except asyncio.IncompleteReadError:
        out = "eof"
    await feeder
    return out, bytes(reader._buffer)  # type: ignore[attr-defined]


LIM = SessionLimits(max_message_size=2500, max_header_size=300, max_received_headers=3)

CUT = b""  # a token that ends a network read here

TOKENS = st.sampled_from(
    [
        CUT,
        CUT,
        b"\r\n",
        b"\r\n",
        b"\r\n",
        b"\r",
        b"\n",
        b".",
        b"..",
        b"\x00",
        b"a",
        b"hello world",
        b" folded",
        b"\t",
        b"Received: from x",
        b"Subject: hi",
        b"X-A: b",
        b"\r\n.\r\n",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r\n..\r\n",
        b"a" * 400,
        b"b" * 998,
        b"c" * 999,
        b"d" * 1000,
        b"e" * 1500,
        b"f" * 3000,
    ]
)


@settings(max_examples=300, deadline=None)
@example(tokens=[b"e" * 1500, b"\r", CUT, b"\n", b"x"], end=b"\r\n.\r\n", cuts=[])  # CR|LF
@example(tokens=[b"e" * 1500, CUT, b".", b"\r\n"], end=b"\r\n.\r\n", cuts=[])  # not an end
@example(tokens=[b"e" * 1500, b"\r", CUT, b"\n.\r\n"], end=b"QUIT\r\n", cuts=[])
@example(tokens=[b"X: y\r\n\r\n", b"..", CUT, b"\r\n."], end=b".\r\n\r\n.\r\n", cuts=[])
@given(
    tokens=st.lists(TOKENS, max_size=50),
    end=st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\r\n.\r\nQUIT\r\n", b"\r\n.\r\nRSET\r\n", b""]),
    cuts=st.lists(st.integers(min_value=0, max_value=8000), max_size=12),
)
def test_bulk_reader_matches_line_reader(tokens: list[bytes], end: bytes, cuts: list[int]) -> None:
    stream = b"".join(tokens) + end
    at, marks = 0, set(cuts)
    for t in tokens:
        at += len(t)
        if t == CUT:
            marks.add(at)
    points = sorted({c for c in marks if 0 < c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    chunks = [c for c in chunks if c]

    async def new(reader: asyncio.StreamReader) -> tuple[bytes | None, str | None, bool]:
        r = await read_data(
            reader,
            LIM,
            lambda: None,
            lambda: bytes(reader._buffer),  # type: ignore[attr-defined]
        )
        return r.content, _kind(r.reply), r.close

    async def both() -> None:
        want = await _run(chunks, True, lambda r: reference_read_data(r, LIM))
        got = await _run(chunks, True, new)
        assert got == want

    asyncio.run(both())
