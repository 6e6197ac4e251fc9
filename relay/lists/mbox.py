"""Archive export as mbox (RFC 4155, "mboxrd" quoting: every ">*From " line in a body
gets one more ">", so readers can undo it)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import BinaryIO

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


def mbox_entry(mail_from: str, created: float, data: bytes) -> bytes:
    sender = mail_from or "MAILER-DAEMON"
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(created))
    text = data.replace(b"\r\n", b"\n")
    text = _FROM_LINE.sub(rb">\1", text)
    if not text.endswith(b"\n"):
        text += b"\n"
    return f"From {sender} {stamp}\n".encode() + text + b"\n"


def write_mbox(fh: BinaryIO, posts: Sequence[tuple[str, float, bytes]]) -> int:
    for mail_from, created, data in posts:
        fh.write(mbox_entry(mail_from, created, data))
    return len(posts)
