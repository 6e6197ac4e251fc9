"""Intake (Postfix's cleanup): the single writer of new mail into the queue.

Turns an accepted SMTP transaction into a queued message: loop check, authentication
verdict and ARC seal (injected transforms), the Received trace header, alias expansion,
SRS for forwarded mail, a durable write (fsync'd before the 250), then wakes the
scheduler. Locally generated mail (DSNs, TLS-RPT reports) enters through ``inject``.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from relay import logs
from relay.config import Config
from relay.errors import SmtpReplyError, StoreError
from relay.model import ConnInfo, Envelope, QueueId
from relay.queue.spool import (
    FLAG_NO_TLS_REQUIRED,
    NewMessage,
    Spool,
    envelope_fields,
    extract_message_id,
    new_qid,
)

log = logs.get("relay.intake")

# A transform gets the message (with our Received header) and returns the message to
# queue; it raises SmtpReplyError to refuse it (e.g. DMARC reject).
Transform = Callable[[ConnInfo, Envelope, bytes], Awaitable[bytes]]
NotifyFn = Callable[[QueueId, NewMessage, float, bool], None]
ReserveFn = Callable[[], bool]

_RECEIVED_RE = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
_TLS_REQUIRED_NO = re.compile(rb"^tls-required:[ \t]*no[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def count_received(data: bytes) -> int:
    return len(_RECEIVED_RE.findall(header_block(data)))


def tls_required_no(data: bytes) -> bool:
    """RFC 8689: the sender asked that TLS policies be ignored for this message."""
    return _TLS_REQUIRED_NO.search(header_block(data)) is not None


def _clean(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255]


def received_header(conn: ConnInfo, env: Envelope, hostname: str, qid: str, now: float) -> bytes:
    """RFC 5321 4.4 trace header, with the TLS version and cipher when TLS was used."""
    helo = _clean(conn.helo) or "unknown"
    with_ = "ESMTP"
    if conn.tls_version:
        with_ = "ESMTPS"
    if env.smtputf8:
        with_ = "UTF8SMTPS" if conn.tls_version else "UTF8SMTP"
    parts = [f"Received: from {helo} ([{_clean(conn.peer_ip)}])", f"\tby {hostname} (relay)"]
    if conn.tls_version:
        parts.append(
            f"\t(using {_clean(conn.tls_version)} with cipher {_clean(conn.tls_cipher or '')})"
        )
    rcpt = f"\n\tfor <{_clean(env.rcpt_tos[0])}>" if len(env.rcpt_tos) == 1 else ""
    parts.append(f"\twith {with_} id {qid}{rcpt};")
    parts.append(f"\t{email.utils.formatdate(now, localtime=False)}")
    return ("\r\n".join(parts).replace("\n\tfor", "\r\n\tfor") + "\r\n").encode("utf-8")


@dataclass(frozen=True, slots=True)
class Routing:
    """How intake maps envelope addresses: alias expansion and SRS (both injected)."""

    expand: Callable[[str], tuple[str, ...]] = lambda a: (a,)
    # SRS forward rewrite of the reverse-path for forwarded mail ("" stays "")
    srs_forward: Callable[[str], str] | None = None
    # SRS reverse: an SRS address in our SRS domain -> the original sender, else None
    srs_reverse: Callable[[str], str | None] | None = None


class Intake:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        *,
        notify: NotifyFn | None = None,
        reserve: ReserveFn | None = None,
        release: Callable[[], None] | None = None,
        transforms: Sequence[Transform] = (),
        routing: Routing | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.spool = spool
        self.notify = notify
        self.reserve = reserve
        self.release = release
        self.transforms = list(transforms)
        self.routing = routing or Routing()
        self.clock = clock

    def route(self, env: Envelope) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """Expand aliases and apply SRS: (reverse-path, recipients, original recipients)."""
        rcpts: list[str] = []
        origs: list[str] = []
        forwarded = False
        mail_from = env.mail_from
        for rcpt in env.rcpt_tos:
            if self.routing.srs_reverse is not None:
                original = self.routing.srs_reverse(rcpt)
                if original is not None:
                    rcpts.append(original)
                    origs.append(rcpt)
                    continue
            targets = self.routing.expand(rcpt)
            if targets != (rcpt,):
                forwarded = True
            for t in targets:
                rcpts.append(t)
                origs.append(rcpt)
        if forwarded and mail_from and self.routing.srs_forward is not None:
            mail_from = self.routing.srs_forward(mail_from)
        return mail_from, tuple(rcpts), tuple(origs)

    async def submit(self, conn: ConnInfo, env: Envelope, data: bytes) -> str:
        """Queue one accepted transaction durably; return the text after '250 '."""
        if count_received(data) >= self.config.server.max_received_headers:
            raise SmtpReplyError(554, "5.4.6", "Too many hops (mail loop detected)")
        now = self.clock()
        qid = new_qid(now)
        message = received_header(conn, env, self.config.server.hostname, qid, now) + data
        for transform in self.transforms:
            message = await transform(conn, env, message)
        mail_from, rcpts, origs = self.route(env)
        flags = FLAG_NO_TLS_REQUIRED if tls_required_no(message) else 0
        mid = _message_id(message)
        new = NewMessage(
            mail_from, rcpts, message, origs, flags, mid, **envelope_fields(conn, env, origs)
        )
        claimed = await self._enqueue(new, qid)
        log.info(
            "queued",
            qid=qid,
            client=conn.peer_ip,
            helo=conn.helo,
            mail_from=env.mail_from,
            sender=mail_from,
            recipients=list(rcpts),
            size=len(message),
            tls=conn.tls_version,
            message_id=mid,
            claimed=claimed,
        )
        if self.notify is not None:
            self.notify(qid, new, now, claimed)
        return f"2.0.0 Ok: queued as {qid}"

    async def _enqueue(self, new: NewMessage, qid: QueueId) -> bool:
        """Write durably; claim a place in the active window when there is one."""
        claimed = self.reserve() if self.reserve is not None else False
        try:
            await self.spool.enqueue(new, qid, claimed=claimed)
        except StoreError as exc:
            if claimed and self.release is not None:
                self.release()
            log.error("queue_write_failed", qid=qid, error=str(exc))
            raise SmtpReplyError(
                451, "4.3.0", "Temporary storage failure, try again later"
            ) from exc
        return claimed

    async def inject(
        self, mail_from: str, recipients: Sequence[str], data: bytes, flags: int = 0
    ) -> QueueId:
        """Queue locally generated mail (DSNs, reports)."""
        if tls_required_no(data):
            flags |= FLAG_NO_TLS_REQUIRED
        new = NewMessage(mail_from, tuple(recipients), data, (), flags)
        now = self.clock()
        qid = new_qid(now)
        claimed = await self._enqueue(new, qid)
        log.info(
            "injected",
            qid=qid,
            mail_from=mail_from,
            recipients=list(recipients),
            size=len(data),
            message_id=_message_id(data),
        )
        if self.notify is not None:
            self.notify(qid, new, now, claimed)
        return qid


_message_id = extract_message_id
