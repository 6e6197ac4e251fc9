"""Intake (Postfix's cleanup): the single writer of new mail into the queue.

``Intake.submit`` takes what the SMTP session accepted and parses it once into a
``relay.message.ParsedMessage``; every stage after reads that value (relay.stages):
loop check, our Received trace field, the verdict (``VerdictStage``: forged A-R removed,
SPF/DKIM/DMARC/ARC, our A-R), the route (``RouteStage``: aliases, SRS), the ARC seal
(``SealStage``), the lists (``ListsStage``: recipients that are mailing-list addresses
are handed to relay.lists, which stores the post and its fan-out durably; they get the
message before the seal, with the verdict, and seal each copy once), the TLS-Required
decision, then a durable write (fsync'd before the 250) and the scheduler told
(``QueueSink``). Locally generated mail (TLS-RPT reports) enters through
``inject`` (a ``Submitter``); DSNs are queued by the spool itself.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay import logs
from relay.config import Config
from relay.errors import SmtpReplyError, StoreError
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope, QueueId
from relay.queue.base import QueueSpool
from relay.queue.faults import LISTS_PREPARED, crash_point
from relay.queue.spool import (
    FLAG_NO_TLS_REQUIRED,
    FLAG_REQUIRETLS,
    NewMessage,
    envelope_fields,
    new_qid,
)
from relay.stages import (
    AcceptAll,
    NoSeal,
    QueueSink,
    Route,
    RouteStage,
    SealStage,
    Verdict,
    VerdictStage,
)

if TYPE_CHECKING:
    from relay.lists.stage import ListsStage, Pending

log = logs.get("relay.intake")

# The auth wiring's verdict and seal as one call over bytes (bench/auth_profile.py):
# the same stage objects intake runs.
Transform = Callable[[ConnInfo, Envelope, bytes], Awaitable[bytes]]


def count_received(message: ParsedMessage) -> int:
    return len(message.get_all("received"))


def tls_required_no(message: ParsedMessage) -> bool:
    """RFC 8689: the sender asked that TLS policies be ignored for this message."""
    return any(f.unfolded().strip().lower() == b"no" for f in message.get_all("tls-required"))


def message_id(message: ParsedMessage) -> str:
    """The Message-ID field's value (the first), at most 250 characters, "" when none."""
    field = message.first("message-id")
    if field is None:
        return ""
    return field.unfolded().strip().decode("ascii", "replace")[:250]


def honour_tls_required_no(setting: str, conn: ConnInfo) -> bool:
    """Whether a "TLS-Required: No" field from this client relaxes the TLS policy.

    RFC 8689 section 5 lets the operator choose whether the field is honoured, and the
    field is a sender's request, not ours to trust from anyone: under MTA-STS enforce
    it turns a refusal into clear text (section 5, security considerations section 8).
    ``delivery.tls_required_no``:
    - "all": honoured from every client (section 5, as the RFC describes it);
    - "never": never honoured (section 5: the operator may ignore it);
    - "trusted" (the default): honoured only from clients in the trusted networks or
      authenticated ones, who may relay anyway; an untrusted sender's field is kept but
      not honoured.
    """
    if setting == "all":
        return True
    if setting == "never":
        return False
    return conn.may_relay


def _clean(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255]


def received_header(conn: ConnInfo, env: Envelope, hostname: str, qid: str, now: float) -> bytes:
    """RFC 5321 4.4 trace header, with the TLS version and cipher when TLS was used."""
    helo = _clean(conn.helo) or "unknown"
    # RFC 3848: ESMTP, then S for TLS, A for AUTH; UTF8SMTP* for SMTPUTF8 (RFC 6531)
    with_ = ("UTF8SMTP" if env.smtputf8 else "ESMTP") + ("S" if conn.tls_version else "")
    if conn.auth_user:
        with_ += "A"
    parts = [f"Received: from {helo} ([{_clean(conn.peer_ip)}])", f"\tby {hostname} (relay)"]
    if conn.auth_user:
        parts.insert(1, f"\t(authenticated user {_clean(conn.auth_user)})")
    if conn.tls_version:
        parts.append(
            f"\t(using {_clean(conn.tls_version)} with cipher {_clean(conn.tls_cipher or '')})"
        )
    rcpt = f"\n\tfor <{_clean(env.rcpt_tos[0])}>" if len(env.rcpt_tos) == 1 else ""
    parts.append(f"\twith {with_} id {qid}{rcpt};")
    parts.append(f"\t{email.utils.formatdate(now, localtime=False)}")
    return ("\r\n".join(parts).replace("\n\tfor", "\r\n\tfor") + "\r\n").encode("utf-8")


@dataclass(frozen=True, slots=True)
class Router:
    """The route stage: alias expansion (from the relay rules) and SRS (from the auth
    wiring), both injected; envelope only."""

    expand: Callable[[str], tuple[str, ...]] = lambda a: (a,)
    # SRS forward rewrite of the reverse-path for forwarded mail ("" stays "")
    srs_forward: Callable[[str], str] | None = None
    # SRS reverse: an SRS address in our SRS domain -> the original sender, else None
    srs_reverse: Callable[[str], str | None] | None = None

    def route(self, env: Envelope) -> Route:
        """Expand aliases and apply SRS: (reverse-path, recipients, original recipients)."""
        rcpts: list[str] = []
        origs: list[str] = []
        forwarded = False
        mail_from = env.mail_from
        for rcpt in env.rcpt_tos:
            if self.srs_reverse is not None:
                original = self.srs_reverse(rcpt)
                if original is not None:
                    rcpts.append(original)
                    origs.append(rcpt)
                    continue
            targets = self.expand(rcpt)
            if targets != (rcpt,):
                forwarded = True
            for t in targets:
                rcpts.append(t)
                origs.append(rcpt)
        if forwarded and mail_from and self.srs_forward is not None:
            mail_from = self.srs_forward(mail_from)
        return Route(mail_from, tuple(rcpts), tuple(origs))


class Intake:
    """The intake stage (see the module docstring); built once, in flow order."""

    def __init__(
        self,
        config: Config,
        spool: QueueSpool,
        *,
        queue: QueueSink | None = None,
        verdict: VerdictStage | None = None,
        router: RouteStage | None = None,
        sealer: SealStage | None = None,
        lists: ListsStage | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.spool = spool
        self.queue = queue
        self.lists = lists
        self.verdict: VerdictStage = verdict or AcceptAll(config.authserv_id)
        self.router: RouteStage = router or Router()
        self.sealer: SealStage = sealer or NoSeal()
        self.clock = clock

    async def submit(self, conn: ConnInfo, env: Envelope, data: bytes) -> str:
        """Queue one accepted transaction durably; return the text after '250 '."""
        message = ParsedMessage.parse(data)  # the one parse of this message
        if count_received(message) >= self.config.server.max_received_headers:
            raise SmtpReplyError(554, "5.4.6", "Too many hops (mail loop detected)")
        now = self.clock()
        qid = new_qid(now)
        message = message.prepend(received_header(conn, env, self.config.server.hostname, qid, now))
        judged = await self.verdict.judge(conn, env, message)
        route = self.router.route(env)
        pending: Pending | None = None
        if self.lists is not None:
            # unsealed: each list copy gets our one ARC set over its final header
            # fields (i = previous + 1), repeating this verdict in its AAR
            verdict = Verdict(judged.ar_value, judged.chain, judged.author_policy)
            rest, pending = await self.lists.prepare(env, judged.message.raw, qid, verdict)
            crash_point(LISTS_PREPARED, qid=qid)
            if rest is None:  # list recipients only: the lists store it durably
                await self._commit_lists(pending, qid)
                log.info("to_lists", qid=qid, client=conn.peer_ip, mail_from=env.mail_from)
                return f"2.0.0 Ok: queued as {qid}"
            if rest is not env:
                route = self.router.route(rest)
        message = await self.sealer.seal(judged)  # the ARC set of the queued message
        flags = 0
        if tls_required_no(message):
            setting = getattr(self.config.delivery, "tls_required_no", "trusted")
            if honour_tls_required_no(setting, conn):
                flags |= FLAG_NO_TLS_REQUIRED
            else:
                log.info(
                    "tls_required_no_ignored",
                    qid=qid,
                    client=conn.peer_ip,
                    setting=setting,
                    reason="RFC 8689 field kept but not honoured for this client",
                )
        if env.requiretls:
            # RFC 8689 section 5: with REQUIRETLS a "TLS-Required: No" field is ignored
            flags = FLAG_REQUIRETLS
        mid = message_id(message)
        new = NewMessage(
            route.mail_from,
            route.recipients,
            message.raw,
            route.originals,
            flags,
            mid,
            **envelope_fields(conn, env, route.originals),
        )
        claimed = await self._enqueue(new, qid, pending)  # with the list part: one write
        log.info(
            "queued",
            qid=qid,
            client=conn.peer_ip,
            helo=conn.helo,
            mail_from=env.mail_from,
            sender=route.mail_from,
            recipients=list(route.recipients),
            size=len(message.raw),
            tls=conn.tls_version,
            auth_user=conn.auth_user or None,
            message_id=mid,
            claimed=claimed,
        )
        if self.queue is not None:
            self.queue.submit_new(qid, new, now, claimed)
        return f"2.0.0 Ok: queued as {qid}"

    async def _enqueue(self, new: NewMessage, qid: QueueId, lists: Pending | None = None) -> bool:
        """Write durably (with the list recipients' part, when given, in the same
        transaction); claim a place in the active window when there is one."""
        claimed = self.queue.reserve() if self.queue is not None else False
        try:
            if lists is None:
                await self.spool.enqueue(new, qid, claimed=claimed)
            else:
                await self.spool.enqueue(new, qid, claimed=claimed, also=lists.run)
        except StoreError as exc:
            if claimed and self.queue is not None:
                self.queue.release()
            log.error("queue_write_failed", qid=qid, error=str(exc))
            raise SmtpReplyError(
                451, "4.3.0", "Temporary storage failure, try again later"
            ) from exc
        if lists is not None:
            lists.done()
        return claimed

    async def _commit_lists(self, pending: Pending | None, qid: QueueId) -> None:
        assert self.lists is not None
        try:
            await self.lists.commit(pending)
        except StoreError as exc:
            log.error("list_write_failed", qid=qid, error=str(exc))
            raise SmtpReplyError(
                451, "4.3.0", "Temporary storage failure, try again later"
            ) from exc

    async def inject(
        self, mail_from: str, recipients: Sequence[str], data: bytes, flags: int = 0
    ) -> QueueId:
        """Queue locally generated mail (DSNs, reports): our own, so its TLS-Required
        field is honoured (RFC 8460 section 3 asks it of TLS reports)."""
        pending: Pending | None = None
        if self.lists is not None:  # a DSN about a list copy: to its -bounces+TOKEN
            rest, pending = await self.lists.prepare(
                Envelope(mail_from, tuple(recipients)), data, ""
            )
            if rest is None:
                await self._commit_lists(pending, "")
                return new_qid(self.clock())
            recipients = rest.rcpt_tos
        message = ParsedMessage.parse(data)
        if tls_required_no(message):
            flags |= FLAG_NO_TLS_REQUIRED
        mid = message_id(message)
        new = NewMessage(mail_from, tuple(recipients), data, (), flags, mid)
        now = self.clock()
        qid = new_qid(now)
        claimed = await self._enqueue(new, qid, pending)
        log.info(
            "injected",
            qid=qid,
            mail_from=mail_from,
            recipients=list(recipients),
            size=len(data),
            message_id=mid,
        )
        if self.queue is not None:
            self.queue.submit_new(qid, new, now, claimed)
        return qid
