"""Delivery status notifications (RFC 3464): multipart/report; report-type=delivery-status.

Built from the queued message and its failed (or delayed, or "relayed") recipients; sent
with a null reverse-path through our own queue, never to the null reverse-path (RFC 5321
6.1). The DSN extension's parameters (RFC 3461) shape it: ENVID is returned as
Original-Envelope-Id, ORCPT as Original-Recipient, RET=FULL returns the whole message
(message/rfc822) and RET=HDRS, or no RET, its header only (text/rfc822-headers).
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_CODE = re.compile(r"^\s*([245])\d\d\b")


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    address: str  # final recipient
    orig: str  # original recipient as given at RCPT ("" if the same)
    reply: str  # last reply / reason text
    remote_mta: str = ""
    orcpt: str = ""  # RFC 3461 ORCPT "addr-type;address" as the sender gave it
    action: str = ""  # this recipient's action when not the report's (e.g. "relayed")


def status_of(reply: str, action: str) -> str:
    """The RFC 3463 status for a reply: its enhanced code, else derived from the code class."""
    m = _ENHANCED.search(reply)
    if m:
        return m.group(0)
    c = _CODE.match(reply)
    if c:
        return f"{c.group(1)}.0.0"
    return {"delayed": "4.0.0", "relayed": "2.0.0"}.get(action, "5.0.0")


def _safe(text: str, limit: int = 900) -> str:
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text)[:limit]


def original_headers(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    from_addr: str,
    recipients: Sequence[DsnRecipient],
    original: bytes,
    arrival: float,
    now: float,
    action: str = "failed",
    envid: str = "",
    ret: str = "",
) -> bytes:
    """Build the DSN message bytes (CRLF line ends) to be sent to ``sender``."""
    if not sender:
        raise ValueError("never send a DSN to the null reverse-path")
    if action not in ("failed", "delayed"):
        raise ValueError(f"unsupported DSN action {action!r}")
    actions = {r.action or action for r in recipients}
    if action == "failed" and "failed" not in actions:
        action = "relayed"  # only "relayed" recipients: a success report (RFC 3461 6.2.1)
    boundary = f"=_relay_{secrets.token_hex(12)}"
    msgid = email.utils.make_msgid(domain=reporting_mta)
    subject = {
        "failed": "Undelivered Mail Returned to Sender",
        "delayed": "Delayed Mail (still being retried)",
        "relayed": "Successful Mail Delivery Report",
    }[action]
    lines = [
        f"From: Mail Delivery System <{from_addr}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "",
    ]
    full = ret == "FULL"
    attached = "It is attached below." if full else "It is attached below (headers only)."
    if action == "failed":
        lines += [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message could not be delivered to one or more recipients.",
            attached,
            "",
        ]
    elif action == "relayed":
        lines += [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message was relayed to the recipients below, to a system that does not",
            "send delivery notifications: no further notification may follow.",
            "",
        ]
    else:
        lines += [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message has not been delivered yet to the recipients below.",
            "It is still being retried; you do not need to resend it.",
            "",
        ]
    for r in recipients:
        lines.append(f"<{_safe(r.address)}>: {_safe(r.reply)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
    ]
    if envid:  # RFC 3464 2.2.1, RFC 3461 6.3: the sender's ENVID, first
        lines.append(f"Original-Envelope-Id: {_safe(envid, 100)}")
    lines += [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}",
        "",
    ]
    for r in recipients:
        lines.append(f"Final-Recipient: rfc822; {_safe(r.address)}")
        if r.orcpt:  # RFC 3461 6.3 c: the ORCPT given, as given
            addr_type, _, addr = r.orcpt.partition(";")
            lines.append(f"Original-Recipient: {_safe(addr_type)}; {_safe(addr, 500)}")
        elif r.orig and r.orig.lower() != r.address.lower():
            lines.append(f"Original-Recipient: rfc822; {_safe(r.orig)}")
        this = r.action or action
        lines.append(f"Action: {this}")
        lines.append(f"Status: {status_of(r.reply, this)}")
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {_safe(r.remote_mta)}")
        if r.reply and _CODE.match(r.reply):
            lines.append(f"Diagnostic-Code: smtp; {_safe(r.reply)}")
        elif r.reply:
            lines.append(f"Diagnostic-Code: X-relay; {_safe(r.reply)}")
        lines.append(f"Last-Attempt-Date: {email.utils.formatdate(now, localtime=False)}")
        lines.append("")
    lines += [
        f"--{boundary}",
        "Content-Type: message/rfc822" if full else "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered Message" + ("" if full else " Headers"),
        "",
    ]
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    orig = original if full else original_headers(original)
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + orig + tail
