"""Inbound SMTP: the network-facing server, its session rules and limits (RFC 5321).

``server`` runs the sessions (aiosmtpd underneath) and hands accepted transactions to a
submit callback; ``rules`` decides who may send to whom (no open relay) and expands
aliases; ``limits`` holds connection, session and disk-space caps; ``address`` parses
envelope paths.
"""

from relay.smtp.limits import ConnectionLimits, SessionLimits
from relay.smtp.rules import RelayRules
from relay.smtp.server import SmtpServer, SubmitFn, bind_sockets

__all__ = [
    "ConnectionLimits",
    "RelayRules",
    "SessionLimits",
    "SmtpServer",
    "SubmitFn",
    "bind_sockets",
]
