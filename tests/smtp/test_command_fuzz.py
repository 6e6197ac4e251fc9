"""Fuzzing the SMTP command line and the ESMTP parameters of MAIL / RCPT (hypothesis) over
a real session on loopback: whatever a client sends, it gets clean SMTP replies (a code,
no internal error, no traceback), and MAIL parameters are accepted exactly when RFC 1870
(SIZE), RFC 6152 (BODY) and RFC 6531 (SMTPUTF8) allow them."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.smtp.address import AddressError, parse_params
from relay.smtp.server import INTERNAL_ERROR
from tests.smtp.test_inbound_harness import RawClient, make_config, running

REPLY_LINE = re.compile(r"\A[2-5][0-9][0-9][ -]")
MAX_SIZE = 1_000_000
SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

VERBS = st.sampled_from(
    [b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"HELP",
     b"VRFY", b"EXPN", b"STARTTLS", b"AUTH", b"BDAT", b"mail from:", b"", b"X"]
)  # fmt: skip
ARGS = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")),
    st.sampled_from([b"<a@b.test>", b"<>", b"<info@example.org>", b"<x@elsewhere.test>",
                     b"<a@b.test> SIZE=10", b"<a@b.test> BODY=8BITMIME", b"<\xc3\xa9@b.test>",
                     b" ", b"\t", b"\x00", b"\r", b"\n", b"x" * 600, b"<" * 30]),
    st.text(max_size=30).map(lambda t: t.encode("utf-8").replace(b"\r\n", b"")),
)  # fmt: skip
LINES = st.lists(st.tuples(VERBS, ARGS).map(lambda t: t[0] + b" " + t[1]), max_size=12)


async def _session(port: int, lines: list[bytes]) -> list[str]:
    c = await RawClient.connect(port)
    replies = [await c.reply()]
    try:
        for line in [b"EHLO fuzz.test", *lines]:
            c.send(line + b"\r\n")
            reply = await c.reply()
            if not reply:  # the server closed the session (junk limit, sync error)
                break
            replies.append(reply)
            if reply.startswith("354"):
                c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
                replies.append(await c.reply())
            if reply.startswith(("221", "421", "554")):
                break
    finally:
        await c.close()
    return replies


def _clean(replies: list[str]) -> None:
    for reply in replies:
        assert reply, replies
        for line in reply.split("\n"):
            assert REPLY_LINE.match(line), replies
        assert reply != INTERNAL_ERROR and "Traceback" not in reply, replies


@SETTINGS
@given(lines=LINES)
def test_any_command_line_gets_a_clean_reply(tmp_path: Path, lines: list[bytes]) -> None:
    async def run() -> None:
        async with running(make_config(tmp_path)) as (_, _, port):
            _clean(await _session(port, lines))

    asyncio.run(run())


KEYWORDS = st.one_of(
    st.sampled_from(["SIZE", "size", "BODY", "Body", "SMTPUTF8", "smtputf8", "AUTH", "RET",
                     "ENVID", "X-FOO", "-bad", ""]),
    st.text(alphabet="ABCXYZ019-=_", min_size=1, max_size=8),
)  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.sampled_from(["", "0", "100", str(MAX_SIZE), str(MAX_SIZE + 1), "9" * 18, "9" * 19,
                     "7BIT", "8bitmime", "BINARYMIME", "-1", "1e3", "\u0661\u0662", "a=b",
                     "FULL", "hdrs", "id+2B1", "id+0A", "id+2b", "x" * 101]),
    st.text(alphabet="0123456789abcXYZ=+", max_size=6),
)  # fmt: skip
# an empty keyword without a value writes nothing at all: not a parameter to judge
PARAMS = st.lists(st.tuples(KEYWORDS, VALUES).filter(lambda kv: kv != ("", None)), max_size=4)


def _item(key: str, value: str | None) -> str:
    return key if value is None else f"{key}={value}"


def _allowed(params: list[tuple[str, str | None]]) -> bool:
    """The oracle: what RFC 1869/1870/6152/6531/3461 let a MAIL command carry here."""
    seen: set[str] = set()
    for key, value in params:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", key):
            return False
        if value is not None and (value == "" or "=" in value):
            return False
        k = key.upper()
        if k in seen:
            return False
        seen.add(k)
        if k == "SIZE":  # RFC 1870: 1*20DIGIT (we cap at 18), within the fixed limit
            if value is None or not re.fullmatch(r"[0-9]{1,18}", value):
                return False
            if int(value) > MAX_SIZE:
                return False
        elif k == "BODY":  # RFC 6152
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return False
        elif k == "SMTPUTF8":  # RFC 6531 3.4: no value
            if value is not None:
                return False
        elif k == "RET":  # RFC 3461 4.3
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return False
        elif k == "ENVID":  # RFC 3461 4.4: xtext, at most 100 characters, printable
            if not value or len(value) > 100:
                return False
            if not re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+", value):
                return False
            decoded = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
            if not all(" " <= c <= "~" for c in decoded):
                return False
        else:
            return False  # not offered in EHLO
    return True


@SETTINGS
@given(params=PARAMS)
def test_mail_parameters_are_accepted_exactly_when_allowed(
    tmp_path: Path, params: list[tuple[str, str | None]]
) -> None:
    text = " ".join(_item(k, v) for k, v in params)
    line = f"MAIL FROM:<a@b.test> {text}".rstrip(" ").encode()

    async def run() -> None:
        cfg = make_config(tmp_path, {"max_message_size": MAX_SIZE})
        async with running(cfg) as (_, _, port):
            replies = await _session(port, [line, b"RCPT TO:<info@example.org> " + text.encode()])
        _clean(replies)
        mail = replies[2]
        assert mail.startswith("250 ") == _allowed(params), (line, mail)
        assert mail[:3] in {"250", "501", "552", "555"}, mail
        if mail.startswith("250") and text:  # RCPT takes no parameters here
            assert replies[3][:3] in {"501", "555"}, replies

    asyncio.run(run())


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=60))
def test_parse_params_gives_a_dict_or_an_smtp_error(text: str) -> None:
    try:
        params = parse_params(text)
    except AddressError as exc:
        assert str(exc.reply)[:3] == "501"
        return
    for key, value in params.items():
        assert key == key.upper() and re.fullmatch(r"[A-Z0-9][A-Z0-9-]*", key)
        assert value is None or (value and "=" not in value and " " not in value)
