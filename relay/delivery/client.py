"""One SMTP session to one MX address over aiosmtplib (RFC 5321, RFC 3207 STARTTLS).

Owns: connecting to ``(ip, [delivery] port)`` (optionally from ``[delivery] source_ip``),
EHLO with ``[server] hostname`` (HELO when EHLO is refused), STARTTLS under our own
control (``start_tls=False`` at connect; we look at the EHLO reply ourselves and call
``starttls(tls_context=..., server_hostname=<MX name>)`` so that SNI and the certificate
check use the MX name although we connect by address), and one mail transaction with
per-recipient outcomes.

When the server advertises PIPELINING (RFC 2920), a transaction is one write of
``[RSET] MAIL RCPT... DATA`` (DATA last in the group, section 3.1), every reply read in
order, and then the message content: two round trips instead of one per command. A RSET
before reusing a pooled connection is deferred into that write (``pending_rset``). With
``send(..., then=NextTransaction(...))`` the next transaction's MAIL, RCPT and DATA follow
this one's content in the same write (section 3.1: the content may be followed by more
commands in one group), so a run of messages on one connection costs one write each.

aiosmtplib's exceptions are translated here, once, into the typed ``SessionError``
family below or into ``SmtpReply`` values; nothing above this module sees aiosmtplib.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    SMTPProtocol,
    normalize_message_line_endings,
)

from relay.delivery.guard import address_problem, wire_address
from relay.delivery.tls import STARTTLS_MISSING_REASON, TlsInfo, classify_tls_error, tls_info
from relay.delivery.wiretap import TAP_ATTRIBUTE, SessionTap, session_tap
from relay.dsnparams import mail_options, rcpt_options
from relay.model import MailDsn, RcptDsn, SmtpReply, TlsResultType

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")
MAX_REPLY_TEXT = 512


class SessionError(Exception):
    """A session-level failure (before any transaction); ``detail`` is for the reply text."""

    def __init__(self, detail: str, reply: SmtpReply | None = None) -> None:
        self.detail = detail
        self.reply = reply
        self.local_ip = ""  # our side of the connection, when it got that far
        super().__init__(detail)


class ConnectFailed(SessionError):
    """TCP connect, greeting or EHLO failed: the host is unreachable or refuses us."""


class StartTlsMissing(SessionError):
    """STARTTLS was required but the server did not offer it (or refused the command)."""

    result_type = TlsResultType.STARTTLS_NOT_SUPPORTED


class TlsFailed(SessionError):
    """The STARTTLS handshake failed; classified as an RFC 8460 result type."""

    def __init__(self, result_type: TlsResultType, detail: str) -> None:
        self.result_type = result_type
        super().__init__(detail)


class ConnectionLost(SessionError):
    """The connection broke (or was closed with 421) before MAIL FROM was accepted."""


@dataclass(frozen=True, slots=True)
class Transaction:
    """Per-recipient replies of one mail transaction, in the order given."""

    replies: tuple[tuple[str, SmtpReply], ...]
    data_sent: bool
    usable: bool  # the connection can carry another transaction
    dsn: bool = False  # the server offers DSN and got the parameters (RFC 3461)


@dataclass(frozen=True, slots=True)
class NextTransaction:
    """The transaction to send after this one on the same connection. With PIPELINING
    its MAIL, RCPT and DATA go out in the write of this one's content (RFC 2920 section
    3.1: the content may be followed by more commands in the same group, DATA last), so
    a run of messages costs one write each; the next ``send`` must be for exactly it."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    dsn: MailDsn | None = None
    rcpt_dsn: Mapping[str, RcptDsn] | None = None


@dataclass(slots=True)
class _Ahead:
    """A NextTransaction whose commands are on the wire: the commands as written, and the
    reader left in place for their replies."""

    next: NextTransaction
    batch: list[bytes]
    reader: _Replies


def reply_of(code: int, message: str) -> SmtpReply:
    """A server reply as one line: the lines joined with spaces, bounded in length."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return SmtpReply(code, text[:MAX_REPLY_TEXT])


def enhanced_code(reply: SmtpReply) -> str:
    """The RFC 3463 enhanced status code at the start of the reply text, if any."""
    m = _ENHANCED.match(reply.message)
    if m and m.group(1)[0] == str(reply.code)[0]:
        return m.group(1)
    return ""


def rcpt_reply(code: int, message: str) -> SmtpReply:
    """A reply to RCPT. RFC 5321 section 4.5.3.1.10: RFC 821 listed 552 for "too many
    recipients", whose right code is 452, and "clients SHOULD treat a 552 code in this
    case as a temporary, rather than permanent, failure". Postfix's smtp client takes any
    552 at RCPT as 452; so does this one (the enhanced code becomes 4.x.x too), so the
    recipients beyond the server's limit are deferred and sent on the next attempt."""
    reply = reply_of(code, message)
    if code != 552:
        return reply
    text = reply.message
    if _ENHANCED.match(text) and text.startswith("5."):
        text = "4." + text[2:]
    return SmtpReply(
        452, f"{text} (552 at RCPT taken as 452, RFC 5321 4.5.3.1.10)"[:MAX_REPLY_TEXT]
    )


def _local_reply(code: int, enhanced: str, text: str) -> SmtpReply:
    return SmtpReply(code, f"{enhanced} {text}"[:MAX_REPLY_TEXT])


def _needs_utf8(*addresses: str) -> bool:
    return any(not a.isascii() for a in addresses)


class SmtpSession:
    """An open SMTP connection to one MX address, ready for transactions."""

    def __init__(
        self, smtp: aiosmtplib.SMTP, mx_host: str, ip: str, port: int, tls: TlsInfo | None
    ) -> None:
        self._smtp = smtp
        self.mx_host = mx_host
        self.ip = ip
        self.port = port
        self.tls = tls
        self.starttls_offered = tls is not None
        self.local_ip = _local_ip(smtp)
        self.created = time.monotonic()
        self.transactions = 0
        # RSET owed before the next MAIL; with PIPELINING it goes out in the same write
        self.pending_rset = False
        # the next transaction's commands, written after the last content (NextTransaction)
        self._ahead: _Ahead | None = None
        self._pipelining: bool | None = None
        self.dane = False  # set by the courier once the chain matched TLSA (RFC 7672 3)
        # every transaction runs under a deadline of the caller's (the courier's attempt
        # deadline, asyncio.timeout): a pipelined reply is then awaited without a timer
        # of its own; otherwise each read is bounded by the command timeout
        self.deadline_outside = False

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls,
        *,
        mx_host: str,
        ip: str,
        port: int,
        helo: str,
        tls_context: ssl.SSLContext | None,
        require_tls: bool,
        connect_timeout: float,
        command_timeout: float,
        source_ip: str = "",
    ) -> SmtpSession:
        """Connect, EHLO, and STARTTLS with ``tls_context`` when offered (when it is None,
        stay in clear). With ``require_tls``, no STARTTLS raises StartTlsMissing.

        Raises ConnectFailed, StartTlsMissing or TlsFailed; the connection is closed then.
        """
        smtp = aiosmtplib.SMTP(
            hostname=ip,
            port=port,
            local_hostname=helo,
            source_address=(source_ip, 0) if source_ip else None,
            timeout=command_timeout,
            start_tls=False,
        )
        where = f"{mx_host}[{ip}]:{port}"
        tap = session_tap(mx_host)  # the lab's transcript (relay.delivery.wiretap)
        if tap is not None:
            tap.note(f"connect to {where}")
        try:
            greeting = await smtp.connect(timeout=connect_timeout)
        except SMTPConnectResponseError as exc:
            smtp.close()
            reply = reply_of(exc.code, exc.message)
            if tap is not None:
                tap.note(f"greeted with {reply}")
            raise ConnectFailed(f"{where} greeted with: {reply}", reply) from None
        except (SMTPException, OSError) as exc:
            smtp.close()
            if tap is not None:
                tap.note(f"connect failed: {_why(exc)}")
            raise ConnectFailed(f"connect to {where}: {_why(exc)}") from None
        if tap is not None:
            tap.received(f"{greeting.code} {greeting.message}\r\n".encode())
            if smtp.protocol is not None:
                tap.attach(smtp.protocol)
                _rebind(smtp.protocol)
        local_ip = _local_ip(smtp)
        try:
            await cls._hello(smtp, where)
            offered = smtp.supports_extension("starttls")
            info: TlsInfo | None = None
            if tls_context is not None and offered:
                info = await cls._starttls(smtp, mx_host, tls_context, where, require_tls)
                if tap is not None:
                    tap.note(f"TLS {info.version}" if info is not None else "TLS refused, clear")
            elif require_tls:
                await _quit_quietly(smtp)
                raise StartTlsMissing(f"{where}: {STARTTLS_MISSING_REASON}")
        except SessionError as exc:
            exc.local_ip = local_ip
            smtp.close()
            if tap is not None:
                tap.note(f"session ended: {exc.detail}")
            raise
        except BaseException:
            smtp.close()
            raise
        session = cls(smtp, mx_host, ip, port, info)
        session.starttls_offered = offered
        return session

    @staticmethod
    async def _hello(smtp: aiosmtplib.SMTP, where: str) -> None:
        try:
            try:
                await smtp.ehlo()
            except SMTPHeloError as exc:
                if exc.code >= 500 and smtp.is_connected:
                    await smtp.helo()
                else:
                    raise
        except SMTPResponseException as exc:
            reply = reply_of(exc.code, exc.message)
            raise ConnectFailed(f"{where} refused EHLO/HELO: {reply}", reply) from None
        except (SMTPException, OSError) as exc:
            raise ConnectFailed(f"{where} during EHLO: {_why(exc)}") from None

    @staticmethod
    async def _starttls(
        smtp: aiosmtplib.SMTP,
        mx_host: str,
        ctx: ssl.SSLContext,
        where: str,
        require_tls: bool,
    ) -> TlsInfo | None:
        verified = ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        try:
            await smtp.starttls(tls_context=ctx, server_hostname=mx_host)
        except SMTPResponseException as exc:
            reply = reply_of(exc.code, exc.message)
            if exc.code == 421 or not smtp.is_connected or require_tls:
                raise StartTlsMissing(f"{where} refused STARTTLS: {reply}", reply) from None
            return None  # 454 and the like: the session goes on in clear (RFC 3207 4)
        except (SMTPException, OSError) as exc:
            result_type, reason = classify_tls_error(exc)
            raise TlsFailed(result_type, f"{where}: {reason}") from None
        ssl_object = smtp.get_transport_info("ssl_object")
        info = tls_info(ssl_object, bool(verified))
        try:
            await smtp.ehlo()  # RFC 3207 4.2: forget what was learnt before TLS
        except (SMTPException, OSError) as exc:
            raise ConnectFailed(f"{where} EHLO after STARTTLS: {_why(exc)}") from None
        return info

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._smtp.is_connected

    @property
    def level(self) -> str:
        """ "dane" (the chain matched the host's TLSA records), "verified", "encrypted"
        or "clear"."""
        if self.tls is None:
            return "clear"
        if self.dane:
            return "dane"
        return "verified" if self.tls.verified else "encrypted"

    @property
    def pipelining(self) -> bool:
        """The server advertised PIPELINING (RFC 2920) in its last EHLO reply (the session
        is made after the last EHLO: worked out once)."""
        if self._pipelining is None:
            smtp = self._smtp
            self._pipelining = bool(
                smtp.supports_extension("pipelining") and _can_pipeline(smtp.protocol)
            )
        return self._pipelining

    async def reset(self) -> bool:
        """RSET before reusing the connection; False when it is no longer usable."""
        self.pending_rset = False
        try:
            resp = await self._smtp.rset()
        except (SMTPException, OSError):
            self.close()
            return False
        return resp.code == 250

    @property
    def ahead(self) -> bool:
        """The next transaction's commands are on the wire already: only ``send`` of that
        transaction may follow (never RSET, QUIT or the pool)."""
        return self._ahead is not None

    async def quit(self, timeout: float = 2.0) -> None:
        await _quit_quietly(self._smtp, timeout)

    def close(self) -> None:
        self._smtp.close()

    # ------------------------------------------------------------------ transaction

    def supports(self, extension: str) -> bool:
        """The server advertised this extension in its last EHLO reply."""
        return bool(self._smtp.supports_extension(extension.lower()))

    async def send(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
        dsn: MailDsn | None = None,
        rcpt_dsn: Mapping[str, RcptDsn] | None = None,
        *,
        requiretls: bool = False,
        then: NextTransaction | None = None,
    ) -> Transaction:
        """One transaction: MAIL, RCPT for each recipient, DATA once for all accepted
        (pipelined when the server offers PIPELINING); a ``pending_rset`` goes first.
        ``then``: the transaction to be sent next on this connection; with PIPELINING its
        commands follow this one's content in the same write (NextTransaction).

        Raises ConnectionLost only when the connection failed (or the pending RSET was
        refused) before MAIL was accepted and before any content was sent (safe to retry on
        a new connection); afterwards every recipient gets a reply.

        ``requiretls``: MAIL FROM carries REQUIRETLS (RFC 8689 section 4.2.1); a server
        that does not advertise it gets nothing, every recipient 550 5.7.30.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.next != NextTransaction(
            mail_from, tuple(recipients), data, dsn, rcpt_dsn
        ):  # its commands are on the wire: this one cannot go on this connection
            self.close()
            raise ConnectionLost(f"{self.mx_host}[{self.ip}] another transaction was pipelined")
        problem = address_problem(mail_from)
        if problem is not None:  # threats row 3: nothing of it is written
            reply = _local_reply(553, "5.1.7", f"sender address {problem}; not sent")
            return Transaction(tuple((r, reply) for r in recipients), False, self.connected)
        refused = {
            r: _local_reply(553, "5.1.3", f"recipient address {p}; not sent")
            for r in recipients
            if (p := address_problem(r)) is not None
        }
        if refused:
            sendable = [r for r in recipients if r not in refused]
            if sendable:
                tx = await self.send(
                    mail_from, sendable, data, dsn, rcpt_dsn, requiretls=requiretls
                )
            else:
                tx = Transaction((), False, self.connected)
            got = dict(tx.replies)
            return Transaction(
                tuple((r, refused.get(r) or got[r]) for r in recipients), tx.data_sent, tx.usable
            )
        smtp = self._smtp
        where = f"{self.mx_host}[{self.ip}]"
        utf8 = _needs_utf8(mail_from, *recipients)
        if utf8 and not smtp.supports_extension("smtputf8"):
            reply = _local_reply(553, "5.6.7", f"{where} does not support SMTPUTF8 addresses")
            return Transaction(tuple((r, reply) for r in recipients), False, True)
        if requiretls and not smtp.supports_extension("requiretls"):
            reply = _local_reply(550, "5.7.30", f"{where} does not support REQUIRETLS")
            return Transaction(tuple((r, reply) for r in recipients), False, True)
        options, passed = self._mail_options(data, utf8, requiretls, dsn)
        ropts = _rcpt_dsn_options(recipients, rcpt_dsn if passed else None)
        encoding = "utf-8" if utf8 else "ascii"
        self.transactions += 1
        if self.pipelining:  # (only a pipelining session has commands ahead)
            if ahead is None:
                batch = _batch(mail_from, recipients, options, encoding, ropts)
            else:  # written already, the same envelope: the same commands
                batch = ahead.batch
            tx = await self._send_pipelined(batch, recipients, data, ahead, then)
            return dataclasses.replace(tx, dsn=passed)
        if self.pending_rset and not await self.reset():
            self.close()
            raise ConnectionLost(f"{where} RSET before reuse failed")

        try:
            await smtp.mail(mail_from, options=options, encoding=encoding)
        except SMTPResponseException as exc:
            reply = reply_of(exc.code, exc.message)
            if exc.code == 421 or not smtp.is_connected:
                raise ConnectionLost(f"{where} MAIL FROM: {reply}", reply) from None
            await self._rset_quietly()
            return Transaction(tuple((r, reply) for r in recipients), False, smtp.is_connected)
        except (SMTPException, OSError) as exc:
            self.close()
            raise ConnectionLost(f"{where} MAIL FROM: {_why(exc)}") from None

        replies: dict[str, SmtpReply] = {}
        accepted: list[str] = []
        lost: SmtpReply | None = None
        for rcpt in recipients:
            if lost is not None:
                replies[rcpt] = lost
                continue
            try:
                resp = await smtp.rcpt(rcpt, options=ropts[rcpt], encoding=encoding)
                replies[rcpt] = reply_of(resp.code, resp.message)
                accepted.append(rcpt)
            except SMTPResponseException as exc:
                replies[rcpt] = rcpt_reply(exc.code, exc.message)
                if not smtp.is_connected:
                    lost = replies[rcpt]
            except (SMTPException, OSError) as exc:
                self.close()
                lost = _local_reply(451, "4.4.2", f"{where} connection lost at RCPT: {_why(exc)}")
                replies[rcpt] = lost

        data_sent = False
        if accepted and lost is None:
            try:
                resp = await _data(smtp, data)
                final = reply_of(resp.code, resp.message)
                data_sent = True
            except SMTPResponseException as exc:
                final = reply_of(exc.code, exc.message)
            except (SMTPException, OSError) as exc:
                self.close()
                final = _local_reply(
                    451, "4.4.2", f"{where} connection lost during DATA: {_why(exc)}"
                )
            for rcpt in accepted:
                replies[rcpt] = final
        elif accepted:
            for rcpt in accepted:
                replies[rcpt] = lost or _local_reply(451, "4.4.2", "connection lost")
        elif smtp.is_connected:
            await self._rset_quietly()
        return Transaction(
            tuple((r, replies[r]) for r in recipients), data_sent, smtp.is_connected, passed
        )

    def _mail_options(
        self, data: bytes, utf8: bool, requiretls: bool, dsn: MailDsn | None
    ) -> tuple[list[str], bool]:
        """MAIL FROM's parameters for this server, and whether the DSN ones were passed
        (RFC 3461 5.2: they go on to a next hop that offers DSN)."""
        smtp = self._smtp
        options: list[str] = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        if smtp.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if utf8:
            options.append("SMTPUTF8")
        if requiretls:
            options.append("REQUIRETLS")
        passed = dsn is not None and smtp.supports_extension("dsn")
        if passed and dsn is not None:
            options.extend(mail_options(dsn))
        return options, passed

    def _group_ahead(self, nt: NextTransaction) -> list[bytes] | None:
        """The commands of ``nt`` to write after this transaction's content, or None when
        ``send`` would not write them as they are (an address the guard refuses, SMTPUTF8
        not offered): it is then sent on its own."""
        if not self.pipelining or address_problem(nt.mail_from) is not None:
            return None
        if any(address_problem(r) is not None for r in nt.recipients):
            return None
        utf8 = _needs_utf8(nt.mail_from, *nt.recipients)
        if utf8 and not self._smtp.supports_extension("smtputf8"):
            return None
        options, passed = self._mail_options(nt.data, utf8, False, nt.dsn)
        ropts = _rcpt_dsn_options(nt.recipients, nt.rcpt_dsn if passed else None)
        encoding = "utf-8" if utf8 else "ascii"
        return _batch(nt.mail_from, nt.recipients, options, encoding, ropts)

    async def _send_pipelined(
        self,
        batch: list[bytes],
        recipients: Sequence[str],
        data: bytes,
        ahead: _Ahead | None = None,
        then: NextTransaction | None = None,
    ) -> Transaction:
        """``send`` over PIPELINING (RFC 2920 3.1): one write of [RSET] MAIL RCPT... DATA,
        the replies read in order; the content follows only when DATA got 354 and some
        recipient was accepted. When DATA got 354 but no recipient was, a lone "." ends the
        transaction (its reply is read and ignored). ``ahead``: the batch went out after
        the previous transaction's content (NextTransaction); only its replies are read."""
        smtp = self._smtp
        where = f"{self.mx_host}[{self.ip}]"
        rset = self.pending_rset and ahead is None
        if rset:
            batch.insert(0, b"RSET\r\n")
        self.pending_rset = False
        protocol = smtp.protocol
        lock = protocol._command_lock if protocol is not None else None
        if protocol is None or lock is None:
            self.close()
            raise ConnectionLost(f"{where} MAIL FROM: Server not connected")
        reader = _Replies(smtp, protocol, len(batch), ahead.reader if ahead else None)
        reader.bounded = self.deadline_outside
        async with lock, reader as replies:
            phase = "RSET" if rset else "MAIL FROM"
            try:
                if ahead is None:
                    protocol.write(b"".join(batch))
                if rset:
                    resp = await replies.next()
                    if resp.code != 250:
                        self.close()
                        reply = reply_of(resp.code, resp.message)
                        raise ConnectionLost(f"{where} RSET: {reply}", reply)
                    phase = "MAIL FROM"
                resp = await replies.next()
            except (SMTPException, OSError) as exc:
                self.close()
                raise ConnectionLost(f"{where} {phase}: {_why(exc)}") from None
            mail = reply_of(resp.code, resp.message)
            if resp.code != 250:
                if resp.code == 421 or not smtp.is_connected:
                    self.close()
                    raise ConnectionLost(f"{where} MAIL FROM: {mail}", mail)
                await self._drain_refused(replies, len(recipients))
                return Transaction(tuple((r, mail) for r in recipients), False, smtp.is_connected)
            return await self._rcpt_and_data(replies, recipients, data, where, then)

    async def _drain_refused(self, replies: _Replies, count: int) -> None:
        """MAIL was refused: read the replies to the RCPTs and the DATA sent with it."""
        try:
            for _ in range(count):
                if (await replies.next()).code == 421:
                    return
            if (await replies.next()).code == 354:  # a server that takes DATA regardless
                await replies.send(b".\r\n")
        except (SMTPException, OSError):
            self.close()

    async def _rcpt_and_data(
        self,
        replies: _Replies,
        recipients: Sequence[str],
        data: bytes,
        where: str,
        then: NextTransaction | None = None,
    ) -> Transaction:
        """MAIL was accepted: the RCPT replies, the DATA reply, then content or a lone dot."""
        smtp = self._smtp
        answers: dict[str, SmtpReply] = {}
        accepted: list[str] = []
        lost: SmtpReply | None = None
        for rcpt in recipients:
            if lost is not None:
                answers[rcpt] = lost
                continue
            try:
                resp = await replies.next()
            except (SMTPException, OSError) as exc:
                self.close()
                lost = _local_reply(451, "4.4.2", f"{where} connection lost at RCPT: {_why(exc)}")
                answers[rcpt] = lost
                continue
            answers[rcpt] = rcpt_reply(resp.code, resp.message)
            if resp.code in (250, 251):
                accepted.append(rcpt)
            elif resp.code == 421:
                lost = answers[rcpt]

        data_sent = False
        if lost is not None:
            for rcpt in accepted:
                answers[rcpt] = lost
        else:
            final: SmtpReply | None = None
            try:
                resp = await replies.next()
                if resp.code != 354:
                    final = reply_of(resp.code, resp.message)
                    self.pending_rset = smtp.is_connected  # the server may hold the envelope
                elif accepted:
                    payload = data_payload(data)
                    group = self._group_ahead(then) if then is not None else None
                    if then is not None and group is not None:  # their replies stay buffered
                        payload += b"".join(group)
                        self._ahead, replies.keep = _Ahead(then, group, replies), True
                    resp = await replies.send(payload)
                    final = reply_of(resp.code, resp.message)
                    data_sent = resp.code == 250
                else:  # RFC 2920 3.1: DATA accepted without recipients: end it with "."
                    await replies.send(b".\r\n")
            except (SMTPException, OSError) as exc:
                self.close()
                final = _local_reply(
                    451, "4.4.2", f"{where} connection lost during DATA: {_why(exc)}"
                )
            if final is not None:
                for rcpt in accepted:
                    answers[rcpt] = final
        return Transaction(tuple((r, answers[r]) for r in recipients), data_sent, smtp.is_connected)

    async def _rset_quietly(self) -> None:
        try:
            await self._smtp.rset()
        except (SMTPException, OSError):
            self.close()


class _Replies:
    """Reads the replies to a group of pipelined commands, in order, off aiosmtplib's
    protocol (5.x internals; the caller holds its command lock).

    ``SMTPProtocol.read_response`` expects one reply per write: replies that arrive
    together stay unparsed in its buffer, and bytes arriving while a parsed reply awaits
    pickup are dropped. While the group is read, ``data_received`` keeps every byte
    (bounded) and ``next`` parses what is buffered before waiting for more.
    """

    _PROTOCOL_PARTS = (
        "_command_lock",
        "_response_pending",
        "_response_waiter",
        "_buffer",
        "_read_response_from_buffer",
        "_set_response_exception",
    )

    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        protocol: SMTPProtocol,
        commands: int,
        held: _Replies | None = None,
    ) -> None:
        """``held``: the reader of the previous transaction, left in place because this
        one's commands followed its content (NextTransaction): its buffer is this one's."""
        self._smtp = smtp
        self._protocol = protocol
        self._limit = MAX_RESPONSE_LENGTH * min(commands + 4, 32)
        self._prev: Callable[[bytes], None] | None = None
        self._tap: SessionTap | None = None
        self._held = held
        self.keep = False  # on exit, stay in place for the next transaction's replies
        self.bounded = False  # the caller's deadline bounds every wait (no timer per read)

    async def __aenter__(self) -> _Replies:
        # a wire tap (relay.delivery.wiretap) wraps data_received: kept, and put back
        held = self._held
        if held is not None and self._protocol.__dict__.get("data_received") == (
            held._data_received
        ):
            self._prev, self._tap = held._prev, held._tap
        else:
            self._prev = self._protocol.__dict__.get("data_received")
            self._tap = self._protocol.__dict__.get(TAP_ATTRIBUTE)
        self._held = None
        self._protocol.__dict__["data_received"] = self._data_received
        _rebind(self._protocol)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.keep and exc[0] is None:
            return  # the next transaction's replies are on their way to this buffer
        protocol = self._protocol
        protocol.__dict__.pop("data_received", None)
        if self._prev is not None:
            protocol.__dict__["data_received"] = self._prev
        _rebind(protocol)
        protocol._response_pending = False
        del protocol._buffer[:]  # anything left over was not asked for

    async def next(self) -> aiosmtplib.SMTPResponse:
        """The next reply; a 421 closes the connection (as aiosmtplib does). A reply
        parsed while no one was reading (between two transactions) waits in the response
        waiter, ahead of what the buffer holds."""
        protocol = self._protocol
        waiter = protocol._response_waiter
        resp: aiosmtplib.SMTPResponse | None
        if waiter is not None and waiter.done():
            _renew_waiter(protocol)
            resp = waiter.result()
        else:
            resp = protocol._read_response_from_buffer()
        if resp is None:
            protocol._response_pending = True
            if self.bounded:
                resp = await self._waited(protocol)
            else:
                resp = await protocol.read_response(timeout=self._smtp.timeout)
        if resp.code == 421:
            self._smtp.close()
        return resp

    @staticmethod
    async def _waited(protocol: SMTPProtocol) -> aiosmtplib.SMTPResponse:
        """``protocol.read_response()`` without its wait_for: the same waiter awaited, the
        same state after (a fresh waiter unless the connection is gone); the caller's
        deadline cancels the wait."""
        waiter = protocol._response_waiter
        if waiter is None:
            raise SMTPServerDisconnected("Connection lost")
        try:
            return await waiter
        finally:
            protocol._response_pending = False
            _renew_waiter(protocol)

    async def send(self, payload: bytes) -> aiosmtplib.SMTPResponse:
        """Write ``payload`` (the content after 354, or a lone dot) and read its reply."""
        self._protocol._response_pending = True
        self._protocol.write(payload)
        return await self.next()

    def _data_received(self, data: bytes) -> None:
        if self._tap is not None:
            self._tap.received(data)
        protocol = self._protocol
        waiter = protocol._response_waiter
        if waiter is None:
            return
        buffer = protocol._buffer
        buffer.extend(data)
        if len(buffer) > self._limit:
            del buffer[:]
            if not waiter.done():
                protocol._set_response_exception(
                    waiter, SMTPResponseException(-1, "Response too long")
                )
            if protocol.transport is not None:
                protocol.transport.close()
            return
        if waiter.done():
            return  # a parsed reply awaits pickup; next() parses this from the buffer
        try:
            resp = protocol._read_response_from_buffer()
        except SMTPResponseException as exc:
            protocol._set_response_exception(waiter, exc)
        else:
            if resp is not None:
                waiter.set_result(resp)


def _renew_waiter(protocol: SMTPProtocol) -> None:
    """A fresh response waiter after one was used, none once the connection is gone (as
    ``SMTPProtocol.read_response`` leaves it)."""
    gone = protocol.transport is None
    protocol._response_waiter = None if gone else asyncio.get_running_loop().create_future()


def _batch(
    mail_from: str,
    recipients: Sequence[str],
    options: Sequence[str],
    encoding: str,
    ropts: Mapping[str, list[str]],
) -> list[bytes]:
    """MAIL, one RCPT a recipient, DATA: a transaction's pipelined command group."""
    batch = [
        _command(
            b"MAIL",
            b"FROM:" + wire_address(mail_from).encode(encoding),
            *(o.encode("ascii") for o in options),
        )
    ]
    batch.extend(
        _command(
            b"RCPT",
            b"TO:" + wire_address(r).encode(encoding),
            *(o.encode("ascii") for o in ropts[r]),
        )
        for r in recipients
    )
    batch.append(b"DATA\r\n")
    return batch


def _rebind(protocol: SMTPProtocol) -> None:
    """Make the transport see the protocol's current ``data_received``: uvloop's TCP
    transport keeps the bound method it found at ``set_protocol`` (asyncio's looks it up
    at every read), so setting the protocol again refreshes it."""
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        if transport.get_protocol() is protocol:
            transport.set_protocol(protocol)


def _rcpt_dsn_options(
    recipients: Sequence[str], rcpt_dsn: Mapping[str, RcptDsn] | None
) -> dict[str, list[str]]:
    """NOTIFY and ORCPT per recipient for a next hop that offers DSN (else none)."""
    return {r: rcpt_options(rcpt_dsn[r]) if rcpt_dsn and r in rcpt_dsn else [] for r in recipients}


def _can_pipeline(protocol: SMTPProtocol | None) -> bool:
    return protocol is not None and all(hasattr(protocol, a) for a in _Replies._PROTOCOL_PARTS)


def _command(*args: bytes) -> bytes:
    """One command line, refused like aiosmtplib refuses it (no control characters)."""
    for arg in args:
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


def data_payload(data: bytes) -> bytes:
    """What follows DATA on the wire: CRLF lines, dot-stuffed (RFC 5321 4.5.2), then the
    terminator; byte for byte what aiosmtplib sends. Queued mail is strict CRLF already
    (intake refuses anything else), so the normalisation regex runs only when it is not."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf or not data.endswith(b"\r\n"):
        data = normalize_message_line_endings(data)
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def _data(smtp: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
    """``smtp.data(data)`` without aiosmtplib's per-message regex passes: the same steps
    as its ``execute_data_command`` (aiosmtplib 5.x), with our payload."""
    protocol = smtp.protocol
    if protocol is None or not hasattr(protocol, "_response_pending"):
        return await smtp.data(data)
    lock = getattr(protocol, "_command_lock", None)
    if lock is None:
        raise SMTPServerDisconnected("Server not connected")
    payload = data_payload(data)
    try:
        async with lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=smtp.timeout)
            if start.code != 354:
                raise SMTPDataError(start.code, start.message)
            protocol._response_pending = True
            protocol.write(payload)
            resp = await protocol.read_response(timeout=smtp.timeout)
            if resp.code != 250:
                raise SMTPDataError(resp.code, resp.message)
            return resp
    except (SMTPServerDisconnected, SMTPTimeoutError):
        smtp.close()
        raise


async def _quit_quietly(smtp: aiosmtplib.SMTP, timeout: float = 2.0) -> None:
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=timeout)
    except (SMTPException, OSError):
        pass
    finally:
        smtp.close()


def _local_ip(smtp: aiosmtplib.SMTP) -> str:
    try:
        sockname = smtp.get_transport_info("sockname")
    except SMTPException:
        return ""
    return str(sockname[0]) if sockname else ""


def _why(exc: BaseException) -> str:
    if isinstance(exc, SMTPTimeoutError):
        return f"timeout ({exc})"
    if isinstance(exc, SMTPServerDisconnected | SMTPConnectError):
        cause = exc.__cause__
        return f"{exc}" + (f" ({cause})" if cause is not None and str(cause) else "")
    return str(exc) or type(exc).__name__
