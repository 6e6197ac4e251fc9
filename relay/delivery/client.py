"""One SMTP session to one MX address over aiosmtplib (RFC 5321, RFC 3207 STARTTLS).

Owns: connecting to ``(ip, [delivery] port)`` (optionally from ``[delivery] source_ip``),
EHLO with ``[server] hostname`` (HELO when EHLO is refused), STARTTLS under our own
control (``start_tls=False`` at connect; we look at the EHLO reply ourselves and call
``starttls(tls_context=..., server_hostname=<MX name>)`` so that SNI and the certificate
check use the MX name although we connect by address), and one mail transaction with
per-recipient outcomes.

aiosmtplib's exceptions are translated here, once, into the typed ``SessionError``
family below or into ``SmtpReply`` values; nothing above this module sees aiosmtplib.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Sequence
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
from aiosmtplib.protocol import normalize_message_line_endings

from relay.delivery.tls import STARTTLS_MISSING_REASON, TlsInfo, classify_tls_error, tls_info
from relay.model import SmtpReply, TlsResultType

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
        try:
            await smtp.connect(timeout=connect_timeout)
        except SMTPConnectResponseError as exc:
            smtp.close()
            reply = reply_of(exc.code, exc.message)
            raise ConnectFailed(f"{where} greeted with: {reply}", reply) from None
        except (SMTPException, OSError) as exc:
            smtp.close()
            raise ConnectFailed(f"connect to {where}: {_why(exc)}") from None
        local_ip = _local_ip(smtp)
        try:
            await cls._hello(smtp, where)
            offered = smtp.supports_extension("starttls")
            info: TlsInfo | None = None
            if tls_context is not None and offered:
                info = await cls._starttls(smtp, mx_host, tls_context, where, require_tls)
            elif require_tls:
                await _quit_quietly(smtp)
                raise StartTlsMissing(f"{where}: {STARTTLS_MISSING_REASON}")
        except SessionError as exc:
            exc.local_ip = local_ip
            smtp.close()
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
        """ "verified", "encrypted" or "clear"."""
        if self.tls is None:
            return "clear"
        return "verified" if self.tls.verified else "encrypted"

    async def reset(self) -> bool:
        """RSET before reusing the connection; False when it is no longer usable."""
        try:
            resp = await self._smtp.rset()
        except (SMTPException, OSError):
            self.close()
            return False
        return resp.code == 250

    async def quit(self, timeout: float = 2.0) -> None:
        await _quit_quietly(self._smtp, timeout)

    def close(self) -> None:
        self._smtp.close()

    # ------------------------------------------------------------------ transaction

    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes) -> Transaction:
        """One transaction: MAIL, RCPT for each recipient, DATA once for all accepted.

        Raises ConnectionLost only when the connection failed before MAIL was accepted
        (safe to retry on a new connection); afterwards every recipient gets a reply.
        """
        smtp = self._smtp
        where = f"{self.mx_host}[{self.ip}]"
        utf8 = _needs_utf8(mail_from, *recipients)
        if utf8 and not smtp.supports_extension("smtputf8"):
            reply = _local_reply(553, "5.6.7", f"{where} does not support SMTPUTF8 addresses")
            return Transaction(tuple((r, reply) for r in recipients), False, True)
        options: list[str] = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        if smtp.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if utf8:
            options.append("SMTPUTF8")
        encoding = "utf-8" if utf8 else "ascii"
        self.transactions += 1

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
                resp = await smtp.rcpt(rcpt, encoding=encoding)
                replies[rcpt] = reply_of(resp.code, resp.message)
                accepted.append(rcpt)
            except SMTPResponseException as exc:
                replies[rcpt] = reply_of(exc.code, exc.message)
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
        return Transaction(tuple((r, replies[r]) for r in recipients), data_sent, smtp.is_connected)

    async def _rset_quietly(self) -> None:
        try:
            await self._smtp.rset()
        except (SMTPException, OSError):
            self.close()


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
