"""The DATA reader: the smuggling guard of the inbound session (RFC 5321 4.1.1.4, 4.5.2).

Reads a message body up to the one valid terminator with bounded memory, whatever
arrives, and decides on the whole transaction (shared/threats.md rows 1-14):

* DATA ends only on a line that is exactly ``.`` after CRLF. Any CR, LF or NUL outside a
  CRLF pair -> 550 5.6.0 once the real end of data arrives (nothing inside the bad
  message is ever run as a command).
* Input already waiting after the final dot (except ``QUIT``) is a synchronisation error
  (PIPELINING is not offered): 554 5.5.0 and the session closes, nothing is queued.
* Limits: lines of 1000 octets with CRLF (500 5.5.2), the message size (552 5.3.4), the
  header block (552 5.3.4) and the Received count (554 5.4.6, a mail loop).

No aiosmtpd here: the session (relay.smtp.server) passes its stream reader, its limits, a
progress callback (a whole line counts against the idle timeout) and a view of the input
already buffered.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

from relay.smtp.limits import SessionLimits

LINE_LIMIT = 1001  # RFC 5321 4.5.3.1.6: 998 + CRLF + one stuffed dot
_DATA_CHUNK = 65536  # bytes asked of the reader at a time in DATA

SYNC_ERROR = "554 5.5.0 Error: SMTP protocol synchronization (PIPELINING is not offered)"

_HEADER_START = re.compile(rb"[!-9;-~]+[ \t]*:")
_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)


def _bare_cr_lf_nul(without_crlf: bytes) -> bool:
    """Any CR, LF or NUL in bytes from which every CRLF pair was removed."""
    return b"\r" in without_crlf or b"\n" in without_crlf or b"\x00" in without_crlf


@dataclass(frozen=True, slots=True)
class DataResult:
    """The message (dot-unstuffed) or the reply refusing it; close: end the session."""

    content: bytes | None
    reply: str | None
    close: bool = False


async def read_data(
    reader: asyncio.StreamReader,
    lim: SessionLimits,
    on_progress: Callable[[], None],
    pending: Callable[[], bytes],
) -> DataResult:
    """Read DATA up to the one valid terminator; bounded memory whatever arrives.

    Reads whatever the socket has (not a line at a time) and checks each run of whole
    lines at once. The rules are those of CRLF-separated lines: the terminator is the
    first line that is exactly ".<CRLF>"; a CR, LF or NUL outside a CRLF pair, a line
    longer than LINE_LIMIT with its CRLF, the size and header limits are errors. At
    most one incomplete line (LINE_LIMIT bytes) is held; an overlong line is checked
    and dropped as it arrives, and nothing is kept once the message is refused.
    """
    blocks: list[bytes] = []
    size = 0
    bad = too_long = too_big = header_big = False
    in_headers = True
    header_bytes = 0
    received = 0
    carry = b""  # the current line so far (without a CRLF)
    overlong = False  # the current line is overlong: carry holds at most its last CR
    while True:
        data = await reader.read(_DATA_CHUNK)
        if not data:
            raise asyncio.IncompleteReadError(carry, None)
        buf = carry + data if carry else data
        if not overlong and buf[:3] == b".\r\n":
            cut, rest = 0, buf[3:]
        else:
            i = buf.find(b"\r\n.\r\n")
            if i >= 0:
                cut, rest = i + 2, buf[i + 5 :]
            else:
                j = buf.rfind(b"\r\n")
                cut, rest = (j + 2 if j >= 0 else 0), None
        block = buf[:cut]
        carry = buf[cut:] if rest is None else b""
        if block or rest is not None:  # a whole line came
            on_progress()
        if block:
            if overlong:  # the end of an overlong line
                j = block.index(b"\r\n") + 2
                tail = block[:j]
                if tail.count(b"\r") != 1 or tail.count(b"\n") != 1 or b"\x00" in tail:
                    bad = True
                size += j
                block = block[j:]
                overlong = False
        if block:
            size += len(block)
            lines = block.split(b"\r\n")
            if _bare_cr_lf_nul(b"".join(lines)):  # a CR or LF left is outside a CRLF
                bad = True
            if len(max(lines, key=len)) + 2 > LINE_LIMIT:
                too_long = True
            if in_headers:
                for line in lines[:-1]:
                    n = len(line) + 2
                    if n == 2:
                        in_headers = False
                    elif line[0] in (32, 9):
                        header_bytes += n
                    elif _HEADER_START.match(line):
                        header_bytes += n
                        if line[0] in (82, 114) and _RECEIVED.match(line):  # R, r
                            received += 1
                    else:
                        in_headers = False
                    if header_bytes > lim.max_header_size:
                        header_big = True
                    if not in_headers:
                        break
            if size > lim.max_message_size:
                too_big = True
            if bad or too_long or too_big or header_big:
                blocks.clear()
            else:
                blocks.append(block)
        if rest is not None:
            if rest:  # pipelined input after the terminator: back for the command reader
                reader._buffer[0:0] = rest  # type: ignore[attr-defined]
            break
        if len(carry) > LINE_LIMIT:  # an overlong line: check what came, keep a last CR
            keep = 1 if carry[-1] == 13 else 0
            done = carry[: len(carry) - keep]
            if b"\r" in done or b"\n" in done or b"\x00" in done:
                bad = True
            size += len(done)
            carry = carry[len(carry) - keep :]
            too_long = overlong = True
            blocks.clear()
    waiting = pending()
    if waiting and waiting.upper() != b"QUIT\r\n":
        return DataResult(None, SYNC_ERROR, close=True)
    if bad:
        return DataResult(
            None, "550 5.6.0 Error: bare CR, LF or NUL in message (line ends must be CRLF)"
        )
    if too_long:
        return DataResult(
            None, "500 5.5.2 Error: line too long (RFC 5321 limit: 1000 octets with CRLF)"
        )
    if too_big:
        return DataResult(
            None,
            f"552 5.3.4 Error: message size exceeds fixed limit of {lim.max_message_size} octets",
        )
    if header_big:
        return DataResult(
            None,
            f"552 5.3.4 Error: message header section exceeds {lim.max_header_size} octets",
        )
    if received >= lim.max_received_headers:
        return DataResult(
            None, f"554 5.4.6 Error: too many Received headers ({received}): mail loop?"
        )
    content = b"".join(blocks)
    if content[:1] == b".":  # dot-unstuffing (RFC 5321 4.5.2)
        content = content[1:]
    if b"\r\n." in content:
        content = content.replace(b"\r\n.", b"\r\n")
    if _bare_cr_lf_nul(content.replace(b"\r\n", b"")):
        # unreachable by construction; kept as the last line of defence
        return DataResult(None, "550 5.6.0 Error: bare CR, LF or NUL in message")
    return DataResult(content, None)


__all__ = ["LINE_LIMIT", "SYNC_ERROR", "DataResult", "read_data"]
