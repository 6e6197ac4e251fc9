"""The Postfix TLS policy service: ``smtp_tls_policy_maps = socketmap:inet:HOST:PORT:NAME``
answered from the relay's MTA-STS cache and DANE lookups (docs/postfix-policy.md)."""
