"""The outbound command guard (threats row 3): what goes on the wire in MAIL FROM and
RCPT TO is exactly the queued address, or nothing is written.

``address_problem(address) -> str | None`` refuses:
- control characters (C0, DEL, C1): a CR or LF would end the command line and start
  another one (RFC 5321 section 2.3.8: lines end with CRLF, and CR or LF alone MUST NOT
  appear elsewhere; section 4.1.2: no Mailbox production contains a control
  character), i.e. command injection into our own session;
- an address that aiosmtplib's quoting would change (``a,b@x`` goes out as ``<a>``,
  ``a@b> NOTIFY=NEVER`` as ``<a@b>``): the wrong recipient, or a different one than the
  queue records.

The courier refuses such a recipient (553 5.1.3) or sender (553 5.1.7, every recipient)
before connecting; ``SmtpSession.send`` checks again before it writes anything.
"""

from __future__ import annotations

import re

from aiosmtplib.email import quote_address

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# dot-atom local part @ a plain domain: what aiosmtplib's quote_address (email.utils'
# parser, ~9 us a call, four calls a message) always gives back as "<address>" unchanged
# (tests/delivery/test_guard_fast.py checks the two agree); anything else takes the slow
# path below.
_PLAIN = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)


def address_problem(address: str) -> str | None:
    """Why ``address`` must not be written in MAIL FROM / RCPT TO; None when it may."""
    if _PLAIN.fullmatch(address):
        return None
    return slow_problem(address)


def slow_problem(address: str) -> str | None:
    """``address_problem`` without the plain-address shortcut."""
    if _CONTROL.search(address):
        return "contains control characters"
    try:
        wire = quote_address(address)
    except Exception:  # noqa: BLE001 - the parser's own failure is a refusal too
        return "cannot be quoted for SMTP"
    if wire != f"<{address}>":
        return "would not go on the wire as written"
    return None


def recipient_reply(problem: str) -> str:
    return f"553 5.1.3 recipient address {problem}; not sent (RFC 5321 4.1.2)"


def sender_reply(problem: str) -> str:
    return f"553 5.1.7 sender address {problem}; not sent (RFC 5321 4.1.2)"


def wire_address(address: str) -> str:
    """``<address>`` as MAIL FROM / RCPT TO write it (aiosmtplib's quoting, with the plain
    case answered without its parser)."""
    if _PLAIN.fullmatch(address):
        return f"<{address}>"
    return quote_address(address)
