"""SMTP smuggling (threats.md rows 1, 2, 4): every end-of-DATA sequence over a raw socket.

The rule under test: DATA ends only on CRLF "." CRLF; any CR, LF or NUL outside a CRLF
pair rejects the whole transaction with 550 5.6.0 once the real end arrives; input sent
ahead of a reply (PIPELINING is not offered) gives 554 5.5.0 and a disconnect. Each
sequence must yield at most one message, never two; here it must yield none at all,
except a plain valid message.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.smtp.test_inbound_harness import MESSAGE, RawClient, make_config, running

VECTORS = Path(__file__).parent.parent / "vectors" / "smuggling"
SEQUENCES: list[dict[str, Any]] = yaml.safe_load((VECTORS / "smuggling.yml").read_text())
DOT_CASES: dict[str, Any] = yaml.safe_load((VECTORS / "dot_reader_cases.yml").read_text())

SMUGGLED = (
    b"mail FROM:<ceo@victim.example>\r\n"
    b"rcpt TO:<info@example.org>\r\n"
    b"data\r\n"
    b"From: ceo@victim.example\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
)


def seq_id(case: dict[str, Any]) -> str:
    return str(case["name"])


def test_vector_file_is_complete() -> None:
    assert len(SEQUENCES) == 14
    assert sum(1 for c in SEQUENCES if c["valid_end_of_data"]) == 1


async def _replies_until_quiet(c: RawClient, quiet: float = 0.3) -> list[str]:
    out: list[str] = []
    while True:
        try:
            r = await c.reply(timeout=quiet)
        except TimeoutError:
            return out
        if not r:
            return out
        out.append(r)


@pytest.mark.parametrize("case", SEQUENCES, ids=seq_id)
async def test_sec_consult_payload_in_one_write(tmp_path: Path, case: dict[str, Any]) -> None:
    """The scanner's layout: body, the sequence, then a whole smuggled transaction."""
    seq = case["bytes"].encode("latin-1")
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        c.send(MESSAGE + b"TESTING sequence!\r\n" + seq + b"\r\n" + SMUGGLED)
        replies = await _replies_until_quiet(c)
        assert len(rec.calls) == 0, replies
        assert not any(r.startswith("250") for r in replies), replies
        assert not any(r.startswith("354") for r in replies), replies
        if b"\r\n.\r\n" in b"\r\n" + seq:
            # a real terminator with the smuggled commands already queued behind it
            assert replies == [replies[0]] and replies[0].startswith("554 5.5.0"), replies
            assert await c.closed()
        else:
            assert len(replies) == 1 and replies[0].startswith("550 5.6.0"), replies
            assert (await c.cmd("NOOP")).startswith("250 ")  # back in command state
        await c.close()


@pytest.mark.parametrize("case", SEQUENCES, ids=seq_id)
async def test_smtpsmug_style_sequence_does_not_end_data(
    tmp_path: Path, case: dict[str, Any]
) -> None:
    """smtpsmug: body + sequence, wait for a reply; none may come unless it really ended."""
    seq = case["bytes"].encode("latin-1")
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        c.send(MESSAGE + b"This is a test mail with an unusual ending.\r\n" + seq)
        ends_data = b"\r\n.\r\n" in b"\r\n" + seq
        if ends_data:
            reply = await c.reply()
            expect = "250 " if case["valid_end_of_data"] else "550 5.6.0"
        else:
            assert await c.no_reply(0.2), "the sequence ended DATA"
            c.send(b"\r\n.\r\n")
            reply = await c.reply()
            expect = "550 5.6.0"
        assert reply.startswith(expect), reply
        assert len(rec.calls) == (1 if case["valid_end_of_data"] else 0)
        assert (await c.cmd("NOOP")).startswith("250 ")
        await c.close()


async def test_pipelining_variant_valid_end_then_mail_from(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        c.send(MESSAGE + b".\r\n" + SMUGGLED)
        reply = await c.reply()
        assert reply.startswith("554 5.5.0"), reply
        assert await c.closed()
        assert rec.calls == []


async def test_quit_right_after_the_dot_is_tolerated(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        c.send(MESSAGE + b".\r\nQUIT\r\n")
        assert (await c.reply()).startswith("250 2.0.0")
        assert (await c.reply()).startswith("221 ")
        assert await c.closed()
        assert len(rec.calls) == 1


@pytest.mark.parametrize(
    "burst",
    [
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<info@example.org>\r\n",
        b"RCPT TO:<info@example.org>\r\nDATA\r\n",
        b"DATA\r\nFrom: x\r\n",
        b"NOOP\r\nNOOP\r\n",
    ],
)
async def test_unauthorised_pipelining_is_refused(tmp_path: Path, burst: bytes) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        if not burst.startswith((b"MAIL", b"NOOP")):
            assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        if burst.startswith(b"DATA"):
            assert (await c.cmd("RCPT TO:<info@example.org>")).startswith("250 ")
        c.send(burst)
        assert (await c.reply()).startswith("554 5.5.0")
        assert await c.closed()
        assert rec.calls == []


async def test_pregreet_is_refused(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, _, port):
        # a blocking connect + send: the bytes are in before the server accepts
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"EHLO early.test\r\n")
        sock.setblocking(False)
        r, w = await asyncio.open_connection(sock=sock)
        c = RawClient(r, w)
        assert (await c.reply()).startswith("554 5.5.0")
        assert await c.closed()
        await c.close()


async def test_header_injection_with_bare_lf(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        reply = await c.cmd(b"Subject: a\nBcc: v@x.test\r\nFrom: a@b.test\r\n\r\nhi\r\n.")
        assert reply.startswith("550 5.6.0")
        await c.start_mail()
        assert (await c.cmd(b"Subject: a\rBcc: v@x.test\r\n\r\nhi\r\n.")).startswith("550 5.6.0")
        assert rec.calls == []
        await c.close()


def _reader_cases(kind: str | None) -> list[dict[str, Any]]:
    return [c for c in DOT_CASES["reader_cases"] if c["expected_error"] == kind]


@pytest.mark.parametrize("case", _reader_cases(None), ids=seq_id)
async def test_chasquid_reader_valid_cases(tmp_path: Path, case: dict[str, Any]) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        c.send(case["input"].encode("latin-1"))
        assert (await c.reply()).startswith("250 ")
        expected = case["expected_output"].replace("\n", "\r\n").encode("latin-1")
        assert rec.calls[0][2] == expected
        await c.close()


@pytest.mark.parametrize("case", _reader_cases("invalid_line_ending"), ids=seq_id)
async def test_chasquid_reader_bad_line_endings(tmp_path: Path, case: dict[str, Any]) -> None:
    async with running(make_config(tmp_path)) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        data = case["input"].encode("latin-1")
        c.send(data)
        if b"\r\n.\r\n" not in data:  # else it holds a real terminator after the bad bytes
            assert await c.no_reply(0.15), "bare CR/LF input ended DATA"
            c.send(b"\r\n.\r\n")
        assert (await c.reply()).startswith("550 5.6.0")
        assert rec.calls == []
        await c.close()


@pytest.mark.parametrize("case", _reader_cases("unexpected_eof"), ids=seq_id)
async def test_chasquid_reader_eof_gives_no_message(tmp_path: Path, case: dict[str, Any]) -> None:
    async with running(make_config(tmp_path)) as (server, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        c.send(case["input"].encode("latin-1"))
        await c.writer.drain()
        await c.close()
        for _ in range(50):
            if server.sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert server.sessions == 0
        assert rec.calls == []


@pytest.mark.parametrize("case", DOT_CASES["session_cases"], ids=seq_id)
async def test_chasquid_sessions(tmp_path: Path, case: dict[str, Any]) -> None:
    size = case.get("max_message_bytes", 26214400)
    async with running(make_config(tmp_path, {"max_message_size": size})) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        c.send(case["data_after_354"].encode("latin-1"))
        for step in case.get("then", []):
            if "repeat" in step:
                for _ in range(step["count"]):
                    c.send(step["repeat"].encode("latin-1"))
            else:
                c.send(step["raw"].encode("latin-1"))
            await c.writer.drain()
        replies = await _replies_until_quiet(c, quiet=0.5)
        assert replies == [replies[0]] and replies[0].startswith("550 5.6.0"), replies
        assert rec.calls == []
        await c.close()
