"""relay: an asyncio SMTP relay and forwarder (ARC, SRS, MTA-STS, TLS-RPT, downgrade lab)."""

__version__ = "0.1.0"
