"""Sender Rewriting Scheme: the Shevek / libsrs2 scheme, as used by postsrsd and Exim.

Forwarded mail leaves with a reverse-path in our SRS domain, so SPF passes for our hop,
and bounces to it can be routed back (threats.md #27):

- ``SRS0=HHHH=TT=orig-domain=orig-local@srs-domain`` for a plain address;
- ``SRS1=HHHH=first-forwarder==HHHH=TT=orig-domain=orig-local@srs-domain`` when the
  address is already an SRS0 address of another forwarder (only that forwarder's host
  and its opaque part are kept, so the chain never grows); an SRS1 address is rewritten
  to a fresh SRS1 keeping its forwarder and opaque part.

HHHH is the first 4 characters of base64(HMAC-SHA1(secret, data)) over the lower-cased
fields (TT, domain, local for SRS0; forwarder host, opaque part for SRS1), compared
case-insensitively on the way back. TT is the day number (Unix time / 86400) modulo 1024
in two base32 characters (A-Z2-7); an address is accepted for ``max_age_days`` (21 by
default) after its day, modulo the 1024-day wrap, as libsrs2 does. The null reverse-path
is never rewritten, nor are addresses already in the SRS domain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

from relay.errors import SmtpReplyError

HASH_LENGTH = 4
TIME_PRECISION = 86400
TIME_SLOTS = 1024  # 10 bits of days, two base32 characters
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
SEPARATORS = "=+-"  # accepted after SRS0/SRS1 on input; we write "="


class SrsError(SmtpReplyError):
    """An SRS address that cannot be reversed (refused with 550 5.1.1 at RCPT)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(550, "5.1.1", f"Invalid SRS address: {problem}")

    def __str__(self) -> str:
        return self.problem  # .reply has the whole SMTP reply


def _is_tagged(local: str, tag: str) -> bool:
    return len(local) > 4 and local[:4].upper() == tag and local[4] in SEPARATORS


def is_srs(address: str) -> bool:
    """True when the local part is an SRS0 or SRS1 address (any domain)."""
    local = address.rpartition("@")[0]
    return _is_tagged(local, "SRS0") or _is_tagged(local, "SRS1")


class SrsRewriter:
    def __init__(
        self,
        domain: str,
        secret: str | bytes,
        max_age_days: int = 21,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not domain or not secret:
            raise ValueError("SRS needs a domain and a secret")
        self.domain = domain.strip().lower().rstrip(".")
        self.secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self.max_age_days = max_age_days
        self.now = now

    @staticmethod
    def is_srs(address: str) -> bool:
        """True when the local part is an SRS0 or SRS1 address (any domain)."""
        return is_srs(address)

    # ---- pieces ----

    def hash(self, *fields: str) -> str:
        mac = hmac.new(self.secret, digestmod=hashlib.sha1)
        for f in fields:
            mac.update(f.lower().encode("utf-8", "surrogateescape"))
        return base64.b64encode(mac.digest()).decode("ascii")[:HASH_LENGTH]

    def _check_hash(self, given: str, *fields: str) -> None:
        want = self.hash(*fields)
        if len(given) != HASH_LENGTH or not hmac.compare_digest(
            given.lower().encode("ascii", "replace"), want.lower().encode("ascii")
        ):
            raise SrsError("bad hash")

    def _today(self) -> int:
        return int(self.now() // TIME_PRECISION) % TIME_SLOTS

    def timestamp(self) -> str:
        day = self._today()
        return BASE32[(day >> 5) & 31] + BASE32[day & 31]

    def _check_timestamp(self, stamp: str) -> None:
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in BASE32 for c in stamp):
            raise SrsError("bad timestamp")
        then = BASE32.index(stamp[0]) << 5 | BASE32.index(stamp[1])
        now = self._today()
        while now < then:
            now += TIME_SLOTS
        if now > then + self.max_age_days:
            raise SrsError("expired timestamp")

    def _ours(self, domain: str) -> bool:
        return domain.strip().lower().rstrip(".") == self.domain

    # ---- the two directions ----

    def forward(self, address: str) -> str:
        """The reverse-path to use when forwarding mail from address."""
        if not address:
            return address
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or self._ours(domain):
            return address
        if _is_tagged(local, "SRS1"):
            parts = local[5:].split("=", 2)
            if len(parts) == 3 and parts[1]:
                _, host, opaque = parts
                return self._srs1(host, opaque)
        if _is_tagged(local, "SRS0"):
            return self._srs1(domain, local[4:])
        stamp = self.timestamp()
        digest = self.hash(stamp, domain, local)
        return f"SRS0={digest}={stamp}={domain}={local}@{self.domain}"

    def _srs1(self, host: str, opaque: str) -> str:
        digest = self.hash(host, opaque)
        return f"SRS1={digest}={host}={opaque}@{self.domain}"

    def reverse(self, address: str) -> str:
        """The address an SRS address of ours stands for: the original sender for SRS0,
        the first forwarder's SRS0 address for SRS1. Raises SrsError (bad hash, expired
        or malformed, or not an SRS address)."""
        local, at, _domain = address.rpartition("@")
        if not at:
            raise SrsError("not an SRS address")
        if _is_tagged(local, "SRS0"):
            parts = local[5:].split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SrsError("malformed SRS0 address")
            digest, stamp, domain, orig_local = parts
            self._check_hash(digest, stamp, domain, orig_local)
            self._check_timestamp(stamp)
            return f"{orig_local}@{domain}"
        if _is_tagged(local, "SRS1"):
            parts = local[5:].split("=", 2)
            if len(parts) != 3 or not parts[0] or not parts[1] or len(parts[2]) < 2:
                raise SrsError("malformed SRS1 address")
            digest, host, opaque = parts
            self._check_hash(digest, host, opaque)
            return f"SRS0{opaque}@{host}"
        raise SrsError("not an SRS address")

    def reverse_or_none(self, address: str) -> str | None:
        """For intake routing: None unless address is an SRS address in our SRS domain;
        its reversal otherwise (SrsError when forged or expired)."""
        _local, at, domain = address.rpartition("@")
        if not at or not self._ours(domain) or not is_srs(address):
            return None
        return self.reverse(address)
