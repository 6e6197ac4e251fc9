"""Sender authentication: SPF, DKIM, DMARC, ARC, the Authentication-Results header, sealing."""
