"""What the SMTP session asks about authenticated submission: check a user's
credentials (in a thread, behind the lock-out), and whether the user may use a MAIL FROM.

Replies (RFC 4954 section 6): 235 2.7.0 on success, 535 5.7.8 for bad credentials (after
the lock-out's back-off), 454 4.7.0 for a locked IP or user and when the users file
cannot be read. The password is never logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relay import logs
from relay.config import SubmissionConfig
from relay.submission.lockout import Lockout
from relay.submission.sasl import Credentials
from relay.submission.senders import default_senders, sender_allowed
from relay.submission.users import UserDb, UsersFileError

log = logs.get("relay.submission")

OK = "235 2.7.0 Authentication successful"
BAD = "535 5.7.8 Error: authentication failed"
LOCKED = "454 4.7.0 Too many failed attempts, try later"
TEMPORARY = "454 4.7.0 Temporary authentication failure"
MAX_VERIFY = 4  # argon2 checks at once per process (each takes ~64 MiB and a core)


@dataclass(frozen=True, slots=True)
class AuthResult:
    reply: str
    user: str = ""  # the authenticated (lower-cased) user name when reply is OK

    @property
    def ok(self) -> bool:
        return self.reply == OK


class Submission:
    def __init__(
        self,
        config: SubmissionConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        users: UserDb | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.users = users or UserDb(config.users_file)
        self.lockout = Lockout(
            config.max_failures,
            config.failure_window,
            config.lockout,
            config.failure_delay,
            clock,
        )
        self._sleep = sleep
        self._verify_slots = asyncio.Semaphore(MAX_VERIFY)

    def locked(self, ip: str, user: str | None = None) -> bool:
        return self.lockout.locked(ip, user)

    async def authenticate(self, ip: str, creds: Credentials, mechanism: str) -> AuthResult:
        user = creds.user.lower()
        if self.lockout.locked(ip, user):
            log.warning("smtp_auth_locked", peer=ip, user=user, mechanism=mechanism)
            return AuthResult(LOCKED)
        try:
            async with self._verify_slots:
                ok = await asyncio.to_thread(self.users.verify, user, creds.password)
        except UsersFileError as exc:
            log.error("smtp_auth_users_file", peer=ip, error=str(exc))
            return AuthResult(TEMPORARY)
        # RFC 4616 section 2: acting as another identity (authzid) is not offered
        if ok and (not creds.authzid or creds.authzid.lower() == user):
            self.lockout.success(user)
            log.info("smtp_auth", peer=ip, user=user, mechanism=mechanism, result="pass")
            return AuthResult(OK, user)
        delay = self.lockout.failure(ip, user)
        log.warning(
            "smtp_auth",
            peer=ip,
            user=user,
            mechanism=mechanism,
            result="fail",
            reason="authzid" if ok else "credentials",
            delay=delay,
        )
        if delay:
            await self._sleep(delay)
        return AuthResult(BAD)

    def senders(self, user: str) -> tuple[str, ...]:
        entry = self.config.users.get(user.lower())
        return entry.senders if entry is not None else default_senders(user)

    def may_send_as(self, user: str, mail_from: str) -> bool:
        return sender_allowed(mail_from, self.senders(user))
