"""Authenticated submission (RFC 4954 AUTH, RFC 6409 submission, RFC 8314 implicit TLS):
the SASL decoders (``sasl``), the users file of argon2 hashes (``users``), the brute-force
lock-out (``lockout``), the MAIL FROM policy (``senders``) and the service the SMTP
session asks (``service``)."""
