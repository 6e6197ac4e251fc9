"""Reads what comes back to a list's -bounces address: RFC 3464 DSNs, RFC 5965 ARF
feedback reports and plain bounce texts. Pure; never raises on any input.

* RFC 3464: a multipart/report (report-type=delivery-status) whose message/delivery-status
  part has per-recipient fields; ``Action: failed`` with ``Status: 5.x.x`` is a hard
  bounce, 4.x.x a soft one (section 2.3.4, RFC 3463 section 3.1). ``delayed``,
  ``delivered``, ``relayed`` and ``expanded`` are no bounce (section 2.3.3).
* RFC 5965: a multipart/report (report-type=feedback-report) whose message/feedback-report
  part says ``Feedback-Type: abuse`` (section 3.1) is an abuse complaint; other feedback
  types are noted as none.
* Anything else is read as text: an RFC 3463 status code or an SMTP reply code (5yz hard,
  4yz soft, RFC 5321 section 4.2.1) next to failure words is taken; else none.

A list token is looked for in the enclosed original message (its List-Unsubscribe URI)
for reports that did not come to the VERP address.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from typing import Literal

Kind = Literal["hard", "soft", "abuse", "none"]

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY = re.compile(r"(?:^|[\s:(\[])([45])(\d\d)[\s-]", re.MULTILINE)
_FAIL_WORDS = re.compile(
    r"undeliver|could not be delivered|delivery (?:has )?failed|permanent|user unknown|"
    r"no such (?:user|mailbox|recipient)|mailbox (?:unavailable|full)|rejected|"
    r"does not exist|returned mail|failure notice|delivery status notification",
    re.IGNORECASE,
)
_TOKEN_URI = re.compile(r"/lists/unsubscribe/([a-f0-9]{32})\b")
_MAX_TEXT = 200_000


@dataclass(frozen=True, slots=True)
class BounceReport:
    kind: Kind
    recipients: tuple[str, ...] = ()  # Final-Recipient / Original-Rcpt-To addresses
    status: str = ""  # e.g. "5.1.1"
    detail: str = ""  # diagnostic text, feedback type, or why it is none
    token: str = ""  # a list token found in the enclosed original message


def read_bounce(message: bytes) -> BounceReport:
    """What message reports (see the module docstring)."""
    try:
        msg = email.message_from_bytes(message[: _MAX_TEXT * 5], policy=email.policy.compat32)
        return _read(msg, message)
    except Exception as exc:  # noqa: BLE001 - a parser on hostile input must not raise
        return BounceReport("none", detail=f"unreadable: {type(exc).__name__}")


def _read(msg: Message, raw: bytes) -> BounceReport:
    token = _find_token(raw)
    ctype = msg.get_content_type()
    if ctype == "multipart/report":
        report_type = str(msg.get_param("report-type", "") or "").lower()
        for part in msg.walk():
            pt = part.get_content_type()
            if pt == "message/delivery-status" and report_type != "feedback-report":
                return _with_token(_delivery_status(part), token)
            if pt == "message/feedback-report":
                return _with_token(_feedback(part), token)
    return _with_token(_plain(msg), token)


def _with_token(r: BounceReport, token: str) -> BounceReport:
    return BounceReport(r.kind, r.recipients, r.status, r.detail, token)


def _find_token(raw: bytes) -> str:
    m = _TOKEN_URI.search(raw[: _MAX_TEXT * 5].decode("latin-1"))
    return m.group(1) if m else ""


def _blocks(part: Message) -> list[Message]:
    """The field groups of a message/delivery-status or feedback-report part."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    text = str(payload or "")
    groups = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
    return [email.message_from_string(g + "\n", policy=email.policy.compat32) for g in groups]


def _addr(value: str) -> str:
    kind, _, addr = value.partition(";")
    return (addr if _ else kind).strip().strip("<>")


def _delivery_status(part: Message) -> BounceReport:
    """RFC 3464 section 2.3: the worst failed recipient decides."""
    rcpts: list[str] = []
    worst: tuple[Kind, str, str] = ("none", "", "no failed recipient")
    for block in _blocks(part)[1:]:
        action = str(block.get("Action", "")).strip().lower()
        status = str(block.get("Status", "")).strip()
        if action != "failed":
            continue
        m = _STATUS.search(status)
        cls = m.group(1) if m else ""
        kind: Kind = "hard" if cls == "5" else "soft" if cls == "4" else "none"
        if kind == "none":
            continue
        addr = _addr(str(block.get("Final-Recipient", "") or block.get("Original-Recipient", "")))
        if addr:
            rcpts.append(addr)
        detail = " ".join(str(block.get("Diagnostic-Code", "")).split())[:300]
        if worst[0] != "hard":
            worst = (kind, m.group(0) if m else "", detail)
    return BounceReport(worst[0], tuple(rcpts), worst[1], worst[2])


def _feedback(part: Message) -> BounceReport:
    """RFC 5965 section 3.1."""
    blocks = _blocks(part)
    fields = blocks[0] if blocks else Message()
    ftype = str(fields.get("Feedback-Type", "")).strip().lower()
    rcpts = tuple(_addr(str(v)) for v in fields.get_all("Original-Rcpt-To", []) or [])
    kind: Kind = "abuse" if ftype == "abuse" else "none"
    return BounceReport(kind, rcpts, "", f"feedback-type={ftype or 'missing'}")


def _text_of(msg: Message) -> str:
    out: list[str] = []
    size = 0
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() not in ("text", "message"):
            continue
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            text = data.decode("utf-8", "replace")
        else:
            text = str(part.get_payload() or "")
        out.append(text)
        size += len(text)
        if size > _MAX_TEXT:
            break
    return "\n".join(out)[:_MAX_TEXT]


def _plain(msg: Message) -> BounceReport:
    subject = str(msg.get("Subject", ""))
    text = subject + "\n" + _text_of(msg)
    if not _FAIL_WORDS.search(text):
        return BounceReport("none", detail="not a bounce")
    status = _STATUS.search(text)
    if status is not None and status.group(1) in "45":
        kind: Kind = "hard" if status.group(1) == "5" else "soft"
        return BounceReport(kind, (), status.group(0), _around(text, status.start()))
    reply = _REPLY.search(text)
    if reply is not None:
        kind = "hard" if reply.group(1) == "5" else "soft"
        return BounceReport(kind, (), "", _around(text, reply.start()))
    return BounceReport("none", detail="failure words but no status or reply code")


def _around(text: str, at: int) -> str:
    return " ".join(text[max(0, at - 60) : at + 120].split())[:300]
