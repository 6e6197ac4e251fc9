"""DANE for SMTP (RFC 7672): TLSA matching, the per-host DANE policy, and `relay dane`."""
