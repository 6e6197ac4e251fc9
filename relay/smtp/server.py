"""Inbound SMTP server: the network-facing session (RFC 5321, 1869, 6152, 6531, 2034, 3207).

Built on aiosmtpd 1.4.6's ``SMTP`` protocol, which keeps the transport plumbing and the
STARTTLS switch (with its CVE-2024-34083 fix: input buffered before TLS is dropped).
The command loop and the DATA reader are ours, because the stock ones are not strict
enough (see shared/threats.md rows 1-14):

* Commands must end in CRLF; a control character anywhere in a command line -> 501.
* DATA ends only on a line that is exactly ``.`` after CRLF. Any CR, LF or NUL outside a
  CRLF pair -> the whole transaction is refused with 550 5.6.0 once the real end of data
  arrives (nothing inside the bad message is ever run as a command).
* PIPELINING is not advertised, so a client must wait for each reply. Input that is
  already waiting when a command (or the final ``.``) is read is a protocol
  synchronisation error: 554 5.5.0 and disconnect, the transaction is dropped (Postfix
  ``smtpd_forbid_unauth_pipelining``). One exception: ``QUIT`` right after the final dot.
  Input sent before the greeting gets the same treatment. This makes the "valid end of
  data then MAIL FROM in the same write" variant yield no message at all.
* Limits: SIZE (552 5.3.4, also checked at MAIL), line length (500 5.5.2), header block
  (552 5.3.4), Received count (554 5.4.6), recipients (452 4.5.3), free disk (452 4.3.1),
  connection caps (421 4.7.0), idle time per line and total session time (421 4.4.2),
  junk commands and errors (421 4.7.0; the count resets after each accepted message).

Accepted transactions go to ``submit(conn, envelope, data)``; its string is the text
after ``250 ``; a ``SmtpReplyError`` gives that reply; anything else gives 451 4.3.0.
The submit runs shielded: a client that disconnects does not cancel a queue write
half-way. A submit that has not answered within the session timeout (a stalled store
writer) gets the client ``421 4.3.0`` and the connection closes: the submit watchdog.
The write goes on and may still commit; the client, told 421, sends again: at worst a
duplicate, never a loss.
No Python traceback ever reaches the client.

Command lines are limited to 512 octets with CRLF (RFC 5321 4.5.3.1.4; MAIL gets the
extra octets of SIZE, BODY and SMTPUTF8): ``500 5.5.2 Line too long``. ``HELP`` lists
only what is offered (STARTTLS only with a certificate, before TLS). The DATA reader
(the smuggling guard) is relay.smtp.data_reader.

Listeners have a kind (``listeners``): ``smtp`` (``[server] listen``, no AUTH, as
Postfix's port 25), ``submission`` (``[submission] listen``, port 587: STARTTLS, then
AUTH, then MAIL) and ``smtps`` (``[submission] implicit_tls_listen``, port 465: TLS from
the first byte, RFC 8314 section 3.3). On the two submission kinds AUTH PLAIN and LOGIN
(relay.submission) are offered only over TLS and MAIL needs AUTH first (530 5.7.0); the
MAIL FROM must be one the user may use (553 5.7.1), and an authenticated session may
relay like a trusted one.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, AnyStr, cast

from aiosmtpd.smtp import SMTP, TLSSetupException

from relay import logs, metrics
from relay.config import Config, HostPort
from relay.dsnparams import DsnParamError
from relay.errors import SmtpReplyError
from relay.model import ConnInfo, Envelope, MailDsn, RcptDsn
from relay.smtp.address import AddressError, parse_params, parse_path
from relay.smtp.data_reader import LINE_LIMIT, SYNC_ERROR, DataResult, read_data
from relay.smtp.dsnparams import (
    DSN_MAIL_EXTRA,
    DSN_RCPT_EXTRA,
    MAIL_DSN_PARAMS,
    mail_dsn_param,
    rcpt_dsn_params,
)
from relay.smtp.limits import (
    CachedDiskFree,
    ConnectionLimits,
    SessionLimits,
    in_networks,
    normalise_ip,
)
from relay.smtp.rules import RelayRules
from relay.submission.sasl import (
    MECHANISMS,
    Credentials,
    SaslError,
    encode_challenge,
    parse_login_field,
    parse_plain,
)
from relay.submission.sasl import decode_response as sasl_decode

if TYPE_CHECKING:
    from relay.submission.service import Submission

SubmitFn = Callable[[ConnInfo, Envelope, bytes], Awaitable[str]]

log = logs.get("relay.smtp")


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_REPLY_TEXT_BAD = re.compile(r"[\x00-\x1f\x7f]")

INTERNAL_ERROR = "451 4.3.0 Error: internal error"

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF; extensions may
# raise it, and those we offer raise MAIL's: SIZE by 26 (RFC 1870 3), BODY by 16 (RFC 6152
# 2) and SMTPUTF8 by 10 (RFC 6531 3.4).
COMMAND_LIMIT = 512
MAIL_LIMIT = COMMAND_LIMIT + 26 + 16 + 10 + DSN_MAIL_EXTRA
RCPT_LIMIT = COMMAND_LIMIT + DSN_RCPT_EXTRA
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 limit: 512 octets with CRLF)"


class _NoHooks:
    """aiosmtpd needs a handler object; every decision here lives in SmtpSession."""


_NO_HOOKS = _NoHooks()


def bind_sockets(listen: Sequence[HostPort], *, reuse_port: bool = False) -> list[socket.socket]:
    """Bind listening sockets before forking worker processes that share them."""
    out: list[socket.socket] = []
    for hp in listen:
        family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
        s = socket.create_server(
            (hp.host, hp.port), family=family, backlog=1024, reuse_port=reuse_port
        )
        s.setblocking(False)
        out.append(s)
    return out


def _fits_mail_limit(line: bytes) -> bool:
    """A MAIL or RCPT command gets the extra octets of the extensions it may carry; AUTH
    its initial response (RFC 4954 section 4 allows 12288; the reader's line limit)."""
    verb = line[:5].upper()
    return (
        (len(line) <= MAIL_LIMIT and verb == b"MAIL ")
        or (len(line) <= RCPT_LIMIT and verb == b"RCPT ")
        or verb == b"AUTH "
    )


def listeners(config: Config) -> list[tuple[HostPort, str]]:
    """Every listen address with its kind, in the order the sockets are bound:
    ``[server] listen`` (smtp), ``[submission] listen`` (submission), ``[submission]
    implicit_tls_listen`` (smtps)."""
    out = [(hp, "smtp") for hp in config.server.listen]
    out += [(hp, "submission") for hp in config.submission.listen]
    out += [(hp, "smtps") for hp in config.submission.implicit_tls_listen]
    return out


def _reply_from_error(exc: SmtpReplyError) -> str:
    if not 400 <= exc.code <= 599:
        return INTERNAL_ERROR
    text = " ".join(p for p in (str(exc.code), exc.enhanced, exc.message) if p)
    return _REPLY_TEXT_BAD.sub(" ", text)


class SmtpServer:
    """Listens, runs one ``SmtpSession`` per connection, hands messages to ``submit``."""

    def __init__(
        self,
        config: Config,
        submit: SubmitFn,
        rules: RelayRules,
        *,
        limits: ConnectionLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        free_space: Callable[[], int] | None = None,
        submission: Submission | None = None,
    ) -> None:
        self.config = config
        self.submission = submission
        self.submit = submit
        self.rules = rules
        self.limits = limits if limits is not None else ConnectionLimits.from_config(config)
        self.session_limits = SessionLimits.from_config(config.server)
        self.ssl_context = ssl_context
        store_path = config.storage.path
        self.free_space: Callable[[], int] = free_space or CachedDiskFree(store_path)
        self._servers: list[asyncio.Server] = []
        self._sessions: set[SmtpSession] = set()
        self._submits: set[asyncio.Task[str]] = set()

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        kinds = listeners(self.config)
        if sockets:  # bound by the parent, in the order of listeners()
            kinds = [
                kinds[i] if i < len(kinds) else (kinds[0][0], "smtp") for i in range(len(sockets))
            ]
        for i, (hp, kind) in enumerate(kinds):
            tls: ssl.SSLContext | None = None
            if kind == "smtps":
                if self.ssl_context is None:
                    raise ValueError("implicit TLS listeners need a server TLS context")
                tls = self.ssl_context

            def factory(kind: str = kind) -> SmtpSession:
                return SmtpSession(self, kind)

            if sockets:
                srv = await loop.create_server(factory, sock=sockets[i], backlog=1024, ssl=tls)
            else:
                srv = await loop.create_server(
                    factory, hp.host, hp.port, backlog=1024, reuse_address=True, ssl=tls
                )
            self._servers.append(srv)
        log.info("smtp_listening", listen=[f"{h}:{p}" for h, p in self.bound])

    @property
    def bound(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for srv in self._servers:
            for s in srv.sockets:
                name = s.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; idle sessions get 421 at once, sessions in DATA may finish."""
        for srv in self._servers:
            srv.close()
        sessions = list(self._sessions)
        for sess in sessions:
            sess.request_stop()
        waits = [asyncio.ensure_future(s.closed.wait()) for s in sessions]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for w in pending:
                w.cancel()
        for sess in list(self._sessions):
            sess.abort()
        if self._submits:
            await asyncio.wait(list(self._submits), timeout=max(grace, 1.0))
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        log.info("smtp_stopped")

    # ------------------------------------------------------------ internals

    def _register(self, sess: SmtpSession) -> None:
        self._sessions.add(sess)

    def _unregister(self, sess: SmtpSession) -> None:
        self._sessions.discard(sess)

    def _start_submit(self, conn: ConnInfo, env: Envelope, data: bytes) -> asyncio.Task[str]:
        async def run() -> str:
            return await self.submit(conn, env, data)

        task = asyncio.ensure_future(run())
        self._submits.add(task)
        task.add_done_callback(self._submit_done)
        return task

    def _submit_done(self, task: asyncio.Task[str]) -> None:
        self._submits.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here too, for sessions that went away meanwhile


class SmtpSession(SMTP):
    """One client connection."""

    def __init__(self, server: SmtpServer, kind: str = "smtp") -> None:
        # aiosmtpd's SMTP.__init__ is skipped on purpose: it introspects the class twice
        # per connection (inspect.getmembers for AUTH mechanisms and dir() for commands),
        # about half a millisecond each time, for features this session does not use.
        # We set the attributes that the inherited connection_made / connection_lost /
        # eof_received / push / smtp_STARTTLS read (aiosmtpd 1.4.6; see the version test).
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(limit=max(LINE_LIMIT, RCPT_LIMIT), loop=loop),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        cfg = server.config.server
        self.__ident__ = "ESMTP"
        self.loop = loop
        self.event_handler = _NO_HOOKS
        self.data_size_limit = cfg.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = cfg.hostname
        self._kind = kind  # smtp | submission | smtps (see listeners)
        self._implicit_tls = kind == "smtps"
        self.tls_context = None if self._implicit_tls else server.ssl_context
        self.require_starttls = False
        self._timeout_duration = server.session_limits.idle_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport: asyncio.BaseTransport | None = None
        self.session = None
        self.envelope = None
        self.transport: asyncio.BaseTransport | None = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._auth_required = False
        self._auth_methods = {}
        self._auth_callback = None
        self._authenticator = None
        self._proxy_timeout = None
        self._handle_hooks = {}
        self._ehlo_hook_ver = None
        self._smtp_methods = {}
        self._enforce_call_limit = False
        self._server = server
        self._lim = server.session_limits
        self.closed = asyncio.Event()
        self._refused = False
        self._end = "dropped"  # how the session ended, for relay_smtp_sessions_closed_total
        self._counted = False
        self._peer_ip = ""
        self._peer_port = 0
        self._local_ip = ""
        self._local_port = 0
        self._trusted = False
        self._auth_user: str | None = None  # set by a successful AUTH
        self._tls_version: str | None = None
        self._tls_cipher: str | None = None
        self._helo = ""
        self._esmtp = False
        self._junk = 0
        self._phase = "command"  # command | data | submit
        self._stop_requested = False
        self._started = 0.0
        self._last_progress = 0.0
        self._mail_at: float | None = None  # monotonic time of the last MAIL (metrics)
        self._reset_transaction()

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and self.transport is None
        if first:
            metrics.smtp_session()
            peer = transport.get_extra_info("peername") or ("", 0)
            local = transport.get_extra_info("sockname") or ("", 0)
            self._peer_ip = normalise_ip(str(peer[0]))
            self._peer_port = int(peer[1])
            self._local_ip = normalise_ip(str(local[0]))
            self._local_port = int(local[1])
            self._trusted = in_networks(self._peer_ip, self._server.config.relay.trusted_networks)
            if self._implicit_tls:  # RFC 8314 section 3.3: TLS before the greeting
                self._note_tls(transport)
            self._started = self._last_progress = self.loop.time()
            refusal = self._server.limits.acquire(self._peer_ip)
            if refusal is not None:
                self._refused = True
                metrics.smtp_session_closed("refused")
                log.info("smtp_refused", peer=self._peer_ip, reply=str(refusal))
                cast(asyncio.Transport, transport).write(f"{refusal}\r\n".encode())
                transport.close()
                return
            self._counted = True
            self._server._register(self)
            log.debug("smtp_connect", peer=self._peer_ip, port=self._peer_port)
        super().connection_made(transport)
        if not first:  # STARTTLS finished: forget everything said before (RFC 3207 4.2)
            self._note_tls(transport)
            self._helo = ""
            self._esmtp = False
            self._reset_transaction()

    def _note_tls(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self._tls_cipher = cipher[0] if cipher else None

    @property
    def _tls_active(self) -> bool:
        return self._tls_protocol is not None or self._implicit_tls

    @property
    def _submission(self) -> Submission | None:
        """The submission service on a submission listener, else None (no AUTH)."""
        return self._server.submission if self._kind != "smtp" else None

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused or self.closed.is_set():
            return
        if self._counted:
            self._counted = False
            self._server.limits.release(self._peer_ip)
            self._server._unregister(self)
        metrics.smtp_session_closed(self._end)
        self.closed.set()
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result

    def request_stop(self) -> None:
        """Server shutdown: close now when between transactions, else after this one."""
        self._stop_requested = True
        if self._phase == "command":
            self._end = "shutdown"
            self._say_and_close(f"421 4.3.2 {self.hostname} Service shutting down")

    def _say_and_close(self, reply: str) -> None:
        """Last words from a callback (not the session task), then close."""
        if self.transport is None:
            return
        try:
            self._tx().write(f"{reply}\r\n".encode())
            self.transport.close()
        except Exception:  # a transport half torn down (failed TLS): just drop it
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self._tx().abort()
        if self._original_transport is not None:
            self._original_transport.close()

    def _tx(self) -> asyncio.Transport:
        return cast(asyncio.Transport, self.transport)

    # ------------------------------------------------------------ time limits

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd calls this on connect and after STARTTLS; our watchdog replaces its timer.
        self._last_progress = self.loop.time()
        self._arm_watchdog(self._due())

    def _arm_watchdog(self, when: float) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timeout_handle = self.loop.call_at(when, self._timeout_cb)

    def _due(self) -> float:
        return min(
            self._last_progress + self._lim.idle_timeout,
            self._started + self._lim.max_session_time,
        )

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        now = self.loop.time()
        if self._phase == "submit":  # our own time, not the client's
            self._arm_watchdog(now + min(self._lim.idle_timeout, 1.0))
            return
        due = self._due()
        if now < due:
            self._arm_watchdog(due)
            return
        whole = now >= self._started + self._lim.max_session_time
        what = "session time limit exceeded" if whole else "timeout exceeded"
        log.info("smtp_timeout", peer=self._peer_ip, reason=what, phase=self._phase)
        self._end = "timeout"
        self._say_and_close(f"421 4.4.2 {self.hostname} Error: {what}")
        self._timeout_handle = self.loop.call_later(5.0, self.abort)

    # ------------------------------------------------------------ helpers

    def _reset_transaction(self) -> None:
        self._mail_from: str | None = None
        self._rcpts: list[str] = []
        self._rcpt_dsn: list[RcptDsn] = []  # DSN parameters of each of _rcpts
        self._mail_dsn = MailDsn()
        self._smtputf8 = False
        self._body8 = False
        self._requiretls = False

    def conn_info(self) -> ConnInfo:
        return ConnInfo(
            peer_ip=self._peer_ip,
            peer_port=self._peer_port,
            helo=self._helo,
            local_ip=self._local_ip,
            local_port=self._local_port,
            tls_version=self._tls_version,
            tls_cipher=self._tls_cipher,
            trusted=self._trusted,
            auth_user=self._auth_user or "",
        )

    def _pending(self) -> bytes:
        """Client input already received but not yet read."""
        return bytes(getattr(self._reader, "_buffer", b""))

    async def push(self, status: AnyStr) -> None:
        # aiosmtpd's push, without its per-reply debug logging call
        if isinstance(status, str):
            if status == "220 Ready to start TLS":  # aiosmtpd's text; we offer enhanced codes
                status = "220 2.0.0 Ready to start TLS"
            data = status.encode("utf-8")
        else:
            data = bytes(status)
        writer = self._writer
        writer.write(data + b"\r\n")
        await writer.drain()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _error(self, reply: str) -> bool:
        """Reply with an error and count it; False when the session was closed."""
        await self.push(reply)
        return await self._count_junk()

    async def _count_junk(self) -> bool:
        self._junk += 1
        if self._junk > self._lim.max_junk_commands:
            log.info("smtp_junk_limit", peer=self._peer_ip, count=self._junk)
            self._end = "error_limit"
            await self.push(f"421 4.7.0 {self.hostname} Error: too many errors or junk commands")
            self._close()
            return False
        return True

    # ------------------------------------------------------------ command loop

    async def _handle_client(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            self._close()
            raise
        except (ConnectionError, asyncio.IncompleteReadError):
            self._close()
        except TLSSetupException:
            # the TLS layer never reached the session, so it will not report the loss:
            # close the TCP connection and clean up here (as aiosmtpd does)
            log.info("smtp_tls_failed", peer=self._peer_ip)
            if self._original_transport is not None:
                self._original_transport.close()
            self.connection_lost(None)
        except Exception:
            log.exception("smtp_session_error", peer=self._peer_ip)
            if self.transport is not None:
                self._tx().write(f"{INTERNAL_ERROR}\r\n".encode())
            self._close()

    async def _run(self) -> None:
        await asyncio.sleep(0)  # one loop turn: input already sent is read in before the check
        if self._pending():
            log.warning("smtp_pregreet", peer=self._peer_ip)
            await self.push(SYNC_ERROR)
            self._close()
            return
        await self.push(f"220 {self.hostname} ESMTP")
        reader = self._reader
        while self.transport is not None:
            try:
                line: bytes = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                await self._skip_long_line(exc.consumed)
                if not await self._error(LINE_TOO_LONG):
                    return
                continue
            self._last_progress = self.loop.time()
            if len(line) > COMMAND_LIMIT and not _fits_mail_limit(line):
                if not await self._error(LINE_TOO_LONG):
                    return
                continue
            if not await self._dispatch(line):
                return

    async def _skip_long_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)

    async def _dispatch(self, line: bytes) -> bool:
        body = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if self._pending() and body[:4].upper() != b"QUIT":
            log.warning("smtp_unauth_pipelining", peer=self._peer_ip, command=body[:16])
            await self.push(SYNC_ERROR)
            self._close()
            return False
        if not line.endswith(b"\r\n"):
            return await self._error("500 5.5.2 Error: bare LF in command (use CRLF)")
        if _CONTROL.search(body):
            return await self._error("501 5.5.2 Error: control character in command")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return await self._error("500 5.5.2 Error: command is not valid UTF-8")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip(" ")
        if verb in _JUNK_VERBS and not await self._count_junk():
            return False
        method = _COMMANDS.get(verb)
        if method is None:
            if not verb:
                return await self._error("500 5.5.2 Error: empty command")
            return await self._error("500 5.5.2 Error: command not recognized")
        return await method(self, arg)

    # ------------------------------------------------------------ commands

    async def _cmd_helo(self, arg: str) -> bool:
        return await self._greet(arg, esmtp=False)

    async def _cmd_ehlo(self, arg: str) -> bool:
        return await self._greet(arg, esmtp=True)

    async def _greet(self, arg: str, *, esmtp: bool) -> bool:
        verb = "EHLO" if esmtp else "HELO"
        if not arg or " " in arg or not arg.isascii() or not arg.isprintable():
            return await self._error(f"501 5.5.4 Syntax: {verb} hostname")
        self._reset_transaction()
        self._helo = arg
        self._esmtp = esmtp
        if not esmtp:
            await self.push(f"250 {self.hostname}")
            return True
        lines = [
            self.hostname,
            f"SIZE {self._lim.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        if self._tls_active:
            # RFC 8689 section 4.1: REQUIRETLS is offered only over a TLS session
            lines.append("REQUIRETLS")
            if self._submission is not None:
                # RFC 4954 section 4 with RFC 8314: plain-text mechanisms over TLS only
                lines.append("AUTH " + " ".join(MECHANISMS))
        last = len(lines) - 1
        # one write for the whole multi-line reply
        await self.push(
            "\r\n".join(f"250{'-' if i < last else ' '}{x}" for i, x in enumerate(lines))
        )
        return True

    async def _cmd_mail(self, arg: str) -> bool:
        if not self._helo:
            return await self._error("503 5.5.1 Error: send HELO/EHLO first")
        if self._mail_from is not None:
            return await self._error("503 5.5.1 Error: nested MAIL command")
        if arg[:5].upper() != "FROM:":
            return await self._error("501 5.5.4 Syntax: MAIL FROM:<address>")
        submission = self._submission
        if submission is not None and self._auth_user is None:
            if not self._tls_active:  # RFC 3207 section 4
                return await self._error("530 5.7.0 Must issue a STARTTLS command first")
            return await self._error("530 5.7.0 Authentication required")  # RFC 4954 sec 6
        try:
            mbox, rest = parse_path(arg[5:], null_ok=True, enhanced="5.1.7")
            params = parse_params(rest)
        except AddressError as exc:
            return await self._error(str(exc.reply))
        if params and not self._esmtp:
            return await self._error("501 5.5.4 Error: parameters need EHLO")
        size, body8, utf8, requiretls = 0, False, False, False
        mail_dsn = MailDsn()
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()) or len(value) > 18:
                    return await self._error("501 5.5.4 Error: bad SIZE parameter")
                size = int(value)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return await self._error("501 5.5.4 Error: BODY must be 7BIT or 8BITMIME")
                body8 = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    return await self._error("501 5.5.4 Error: SMTPUTF8 takes no value")
                utf8 = True
            elif key in MAIL_DSN_PARAMS:
                try:
                    mail_dsn = mail_dsn_param(mail_dsn, key, value)
                except DsnParamError as exc:
                    return await self._error(str(exc.reply))
            elif key == "REQUIRETLS":
                if value is not None:
                    return await self._error("501 5.5.4 Error: REQUIRETLS takes no value")
                if not self._tls_active:
                    # RFC 8689 section 4.1: REQUIRETLS over a connection without TLS
                    return await self._error("530 5.7.10 Error: REQUIRETLS needs STARTTLS first")
                requiretls = True
            elif key == "AUTH" and submission is not None:
                # RFC 4954 section 5: accepted where AUTH is offered; the identity it
                # claims is not trusted nor passed on (the session's own AUTH counts)
                if not value:
                    return await self._error("501 5.5.4 Error: bad AUTH parameter")
            else:
                return await self._error(f"555 5.5.4 Error: MAIL parameter {key} not supported")
        if size > self._lim.max_message_size:
            return await self._error(
                f"552 5.3.4 Error: message size exceeds fixed limit of "
                f"{self._lim.max_message_size} octets"
            )
        if mbox is not None and mbox.utf8 and not utf8:
            return await self._error("553 5.6.7 Error: non-ASCII address needs SMTPUTF8")
        mail_from = mbox.address if mbox is not None else ""
        if (
            submission is not None
            and self._auth_user is not None
            and not submission.may_send_as(self._auth_user, mail_from)
        ):
            log.info(
                "smtp_sender_rejected",
                peer=self._peer_ip,
                user=self._auth_user,
                mail_from=mail_from,
            )
            return await self._error(
                f"553 5.7.1 <{mail_from}>: Sender address rejected: not owned by user "
                f"{self._auth_user}"
            )
        try:
            free = self._server.free_space()
        except OSError:
            log.exception("smtp_disk_check_failed")
            await self.push("451 4.3.0 Error: cannot check free disk space")
            return True
        if free < self._lim.min_free_space + size:
            log.warning("smtp_low_disk", free=free, need=self._lim.min_free_space + size)
            await self.push("452 4.3.1 Error: insufficient system storage")
            return True
        self._mail_from = mbox.address if mbox is not None else ""
        self._mail_at = time.monotonic()  # for the accept latency (metrics)
        self._mail_dsn = mail_dsn
        self._smtputf8 = utf8
        self._body8 = body8
        self._requiretls = requiretls
        await self.push("250 2.1.0 Ok")
        return True

    async def _cmd_rcpt(self, arg: str) -> bool:
        if not self._helo:
            return await self._error("503 5.5.1 Error: send HELO/EHLO first")
        if self._mail_from is None:
            return await self._error("503 5.5.1 Error: need MAIL command")
        if arg[:3].upper() != "TO:":
            return await self._error("501 5.5.4 Syntax: RCPT TO:<address>")
        try:
            mbox, rest = parse_path(arg[3:], null_ok=False, enhanced="5.1.3")
            params = parse_params(rest)
        except AddressError as exc:
            return await self._error(str(exc.reply))
        assert mbox is not None
        try:
            rcpt_dsn = rcpt_dsn_params(params)
        except DsnParamError as exc:
            return await self._error(str(exc.reply))
        if rcpt_dsn is None:
            return await self._error("555 5.5.4 Error: RCPT parameters not supported")
        if mbox.utf8 and not self._smtputf8:
            return await self._error("553 5.6.7 Error: non-ASCII address needs SMTPUTF8")
        if len(self._rcpts) >= self._lim.max_recipients:
            await self.push("452 4.5.3 Error: too many recipients")
            return True
        try:
            verdict = self._server.rules.check_rcpt(self.conn_info(), mbox.path)
        except Exception:
            log.exception("smtp_rcpt_check_failed", peer=self._peer_ip)
            await self.push(INTERNAL_ERROR)
            return True
        if verdict is not None:
            log.info("smtp_rcpt_rejected", peer=self._peer_ip, rcpt=mbox.path, reply=str(verdict))
            if verdict.permanent:
                return await self._error(str(verdict))
            await self.push(str(verdict))
            return True
        if mbox.address not in self._rcpts:
            self._rcpts.append(mbox.address)
            self._rcpt_dsn.append(rcpt_dsn)
        await self.push("250 2.1.5 Ok")
        return True

    async def _cmd_data(self, arg: str) -> bool:
        if not self._helo:
            return await self._error("503 5.5.1 Error: send HELO/EHLO first")
        if self._mail_from is None:
            return await self._error("503 5.5.1 Error: need MAIL command")
        if not self._rcpts:
            return await self._error("503 5.5.1 Error: need RCPT command")
        if arg:
            return await self._error("501 5.5.4 Syntax: DATA")
        envelope = Envelope(
            mail_from=self._mail_from,
            rcpt_tos=tuple(self._rcpts),
            smtputf8=self._smtputf8,
            body_8bit=self._body8,
            requiretls=self._requiretls,
            dsn=self._mail_dsn,
            rcpt_dsn=tuple(self._rcpt_dsn) if any(d != RcptDsn() for d in self._rcpt_dsn) else (),
        )
        self._reset_transaction()
        self._phase = "data"
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        result = await self._read_data()
        if result.close:
            log.warning("smtp_unauth_pipelining", peer=self._peer_ip, where="end of data")
            assert result.reply is not None
            await self.push(result.reply)
            self._close()
            return False
        if result.reply is not None:
            self._phase = "command"
            log.info("smtp_data_rejected", peer=self._peer_ip, reply=result.reply)
            metrics.smtp_message(result.reply, self._mail_at)
            if not await self._error(result.reply):
                return False
        else:
            assert result.content is not None
            reply = await self._submit(envelope, result.content)
            metrics.smtp_message(reply, self._mail_at)
            self._phase = "command"
            await self.push(reply)
            if reply.startswith("421"):  # closing the channel (RFC 5321 3.8)
                self._end = "deferred_421"
                self._close()
                return False
            if reply.startswith("250"):
                self._junk = 0
        if self._stop_requested:
            self._end = "shutdown"
            await self.push(f"421 4.3.2 {self.hostname} Service shutting down")
            self._close()
            return False
        return True

    async def _submit(self, envelope: Envelope, content: bytes) -> str:
        self._phase = "submit"
        task = self._server._start_submit(self.conn_info(), envelope, content)
        try:
            # the submit watchdog: a store writer stalled past the session timeout gets
            # the client a 421 (RFC 5321 4.5.3.2.6: it waits 10 minutes for this reply,
            # and must not hang); the write itself goes on, shielded
            text = await asyncio.wait_for(asyncio.shield(task), self._lim.idle_timeout)
        except TimeoutError:
            log.error("smtp_submit_stalled", peer=self._peer_ip, waited=self._lim.idle_timeout)
            return f"421 4.3.0 {self.hostname} Error: queue write timed out, try again later"
        except SmtpReplyError as exc:
            return _reply_from_error(exc)
        except Exception:
            log.exception("smtp_submit_failed", peer=self._peer_ip)
            return INTERNAL_ERROR
        finally:
            self._last_progress = self.loop.time()
        return "250 " + _REPLY_TEXT_BAD.sub(" ", str(text))

    async def _read_data(self) -> DataResult:
        """The DATA reader (relay.smtp.data_reader: the smuggling guard) on this session's
        stream; a whole line read counts as client progress for the idle timeout."""

        def progress() -> None:
            self._last_progress = self.loop.time()

        return await read_data(self._reader, self._lim, progress, self._pending)

    async def _cmd_rset(self, arg: str) -> bool:
        if arg:
            return await self._error("501 5.5.4 Syntax: RSET")
        self._reset_transaction()
        await self.push("250 2.0.0 Ok")
        return True

    async def _cmd_noop(self, arg: str) -> bool:
        await self.push("250 2.0.0 Ok")
        return True

    async def _cmd_help(self, arg: str) -> bool:
        # only what is offered here and now: STARTTLS with a certificate, before TLS
        offered = "EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"
        if self.tls_context is not None and self._tls_protocol is None:
            offered += " STARTTLS"
        if self._submission is not None and self._tls_active:
            offered += " AUTH"
        await self.push(f"214 2.0.0 Commands: {offered}")
        return True

    async def _cmd_vrfy(self, arg: str) -> bool:
        await self.push("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
        return True

    async def _cmd_expn(self, arg: str) -> bool:
        await self.push("502 5.5.1 Error: EXPN not available")
        return True

    async def _cmd_quit(self, arg: str) -> bool:
        self._end = "quit"
        await self.push("221 2.0.0 Bye")
        self._close()
        return False

    async def _cmd_starttls(self, arg: str) -> bool:
        if arg:
            return await self._error("501 5.5.4 Syntax: STARTTLS")
        if self.tls_context is None:
            return await self._error("502 5.5.1 Error: STARTTLS not available")
        if self._tls_protocol is not None:
            return await self._error("503 5.5.1 Error: TLS already active")
        self._reset_transaction()
        await self.smtp_STARTTLS("")
        log.debug(
            "smtp_tls", peer=self._peer_ip, version=self._tls_version, cipher=self._tls_cipher
        )
        return True

    # ------------------------------------------------------------ AUTH (RFC 4954)

    async def _cmd_auth(self, arg: str) -> bool:
        submission = self._submission
        if submission is None:
            return await self._error("503 5.5.1 Error: authentication not enabled")
        if not self._esmtp:
            return await self._error("503 5.5.1 Error: send EHLO first")
        if not self._tls_active:  # RFC 4954 section 6: mechanism needs encryption
            return await self._error(
                "538 5.7.11 Encryption required for requested authentication mechanism"
            )
        if self._auth_user is not None:  # RFC 4954 section 4: once per session
            return await self._error("503 5.5.1 Error: already authenticated")
        if self._mail_from is not None:  # RFC 4954 section 4: not during a transaction
            return await self._error("503 5.5.1 Error: MAIL transaction in progress")
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in MECHANISMS:
            return await self._error("504 5.5.4 Error: unrecognized authentication type")
        if submission.locked(self._peer_ip):
            log.warning("smtp_auth_locked", peer=self._peer_ip, mechanism=mechanism)
            return await self._error("454 4.7.0 Too many failed attempts, try later")
        try:
            creds = await self._sasl(mechanism, initial.strip(" "))
        except SaslError as exc:
            log.info("smtp_auth_aborted", peer=self._peer_ip, reply=exc.reply)
            return await self._error(exc.reply)
        if creds is None:
            return False  # the client broke the protocol: the session is closed
        result = await submission.authenticate(self._peer_ip, creds, mechanism)
        self._last_progress = self.loop.time()
        if not result.ok:
            return await self._error(result.reply)
        self._auth_user = result.user
        await self.push(result.reply)
        return True

    async def _sasl(self, mechanism: str, initial: str) -> Credentials | None:
        """The exchange of one mechanism: its credentials, None when the session was
        closed, SaslError for a reply that ends the exchange."""
        if mechanism == "PLAIN":
            raw = sasl_decode(initial) if initial else await self._sasl_step("")
            return None if raw is None else parse_plain(raw)
        if initial:
            user_raw: bytes | None = sasl_decode(initial)
        else:
            user_raw = await self._sasl_step(encode_challenge("Username:"))
        if user_raw is None:
            return None
        user = parse_login_field(user_raw)
        pass_raw = await self._sasl_step(encode_challenge("Password:"))
        return None if pass_raw is None else Credentials(user, parse_login_field(pass_raw))

    async def _sasl_step(self, challenge: str) -> bytes | None:
        """``334 challenge``, then the client's one line, decoded (RFC 4954 section 4)."""
        await self.push(f"334 {challenge}")
        try:
            line: bytes = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await self._skip_long_line(exc.consumed)
            raise SaslError("500 5.5.6 Error: authentication exchange line is too long") from None
        self._last_progress = self.loop.time()
        if self._pending():
            log.warning("smtp_unauth_pipelining", peer=self._peer_ip, where="auth")
            await self.push(SYNC_ERROR)
            self._close()
            return None
        if not line.endswith(b"\r\n"):
            raise SaslError("500 5.5.2 Error: bare LF in command (use CRLF)")
        try:
            text = line[:-2].decode("ascii")
        except UnicodeDecodeError:
            raise SaslError("501 5.5.2 Cannot decode response (invalid base64)") from None
        return sasl_decode(text)


_Command = Callable[[SmtpSession, str], Awaitable[bool]]
_COMMANDS: dict[str, _Command] = {
    "HELO": SmtpSession._cmd_helo,
    "EHLO": SmtpSession._cmd_ehlo,
    "MAIL": SmtpSession._cmd_mail,
    "RCPT": SmtpSession._cmd_rcpt,
    "DATA": SmtpSession._cmd_data,
    "RSET": SmtpSession._cmd_rset,
    "NOOP": SmtpSession._cmd_noop,
    "HELP": SmtpSession._cmd_help,
    "VRFY": SmtpSession._cmd_vrfy,
    "EXPN": SmtpSession._cmd_expn,
    "QUIT": SmtpSession._cmd_quit,
    "STARTTLS": SmtpSession._cmd_starttls,
    "AUTH": SmtpSession._cmd_auth,
}
_JUNK_VERBS = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN"})

__all__ = ["SmtpServer", "SmtpSession", "SubmitFn", "bind_sockets", "listeners"]
