"""Which MAIL FROM an authenticated user may give (Postfix's
``reject_authenticated_sender_login_mismatch`` with ``smtpd_sender_login_maps``).

The patterns of ``[submission.users."NAME"] senders``: ``local@domain`` (that address),
``*@domain`` (any address at that domain, not its subdomains), ``*`` (any non-null
address) and ``<>`` (the null sender). A user without a table may send only as its own
name when the name is an address, and nothing else; the null sender is refused unless
``<>`` is listed (a mail client has no reason to send bounces). Case-insensitive.
"""

from __future__ import annotations

from collections.abc import Sequence


def default_senders(user: str) -> tuple[str, ...]:
    """A user without a ``[submission.users]`` table: its own name, if an address."""
    local, at, domain = user.rpartition("@")
    return (user.lower(),) if at and local and domain else ()


def sender_allowed(mail_from: str, patterns: Sequence[str]) -> bool:
    """Whether ``mail_from`` ("" = null reverse-path) matches one of ``patterns``."""
    if not mail_from:
        return "<>" in patterns
    addr = mail_from.lower()
    domain = addr.rpartition("@")[2]
    for p in patterns:
        if p == "*" or p == addr:
            return True
        if p.startswith("*@") and p[2:] == domain:
            return True
    return False
