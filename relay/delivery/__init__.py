"""Outbound delivery: MX routing (route), the SMTP client (client), TLS contexts and
RFC 8460 classification (tls), MTA-STS enforcement, connection reuse and the courier's
deliver() (courier), and per-destination limits (destinations)."""

from relay.delivery.courier import Courier, OutcomeSink, PolicyLookup

__all__ = ["Courier", "OutcomeSink", "PolicyLookup"]
