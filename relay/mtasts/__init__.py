"""MTA-STS (RFC 8461): discovery, fetch, durable cache, refresh, and MX matching.

Delivery calls ``PolicyManager.get_policy(domain) -> relay.model.TlsPolicy`` and
``patterns_allow(policy.mx_patterns, mx_host)`` / ``mx_matches(pattern, host)``.
"""

from relay.mtasts.policy import (
    StsPolicy,
    StsRecord,
    mx_matches,
    parse_policy,
    parse_txt_record,
    patterns_allow,
    policy_allows,
)

__all__ = [
    "StsPolicy",
    "StsRecord",
    "mx_matches",
    "parse_policy",
    "parse_txt_record",
    "patterns_allow",
    "policy_allows",
]
