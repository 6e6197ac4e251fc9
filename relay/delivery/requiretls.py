"""The REQUIRETLS gate (RFC 8689 section 4.2.1) for one MX host, as a pure function.

A message sent with ``MAIL FROM:<...> REQUIRETLS`` goes to an MX host only when:

1. the host comes from a DNSSEC-secure MX lookup and has usable TLSA records (DANE,
   RFC 7672), or the domain's MTA-STS policy (mode enforce or testing) lists it
   (RFC 8461 section 4.1) -- section 4.2.1 items 1-2;
2. its TLS session is verified: a TLSA match, or a WebPKI certificate for the MX name
   (section 4.2.1 item 3); "testing" is then applied as "enforce";
3. it advertises REQUIRETLS, and MAIL FROM carries REQUIRETLS (item 4).

Anything else fails the recipient with 5.7.30 (section 5), never a weaker path; a
pooled connection made at a weaker level is never reused for it.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLY_CODE = "550 5.7.30"


@dataclass(frozen=True, slots=True)
class Gate:
    allowed: bool
    reason: str
    rfc: str
    levels: tuple[str, ...] = ()  # pooled session levels that may carry the message


def host_gate(*, dane: bool, sts_mode: str | None, in_sts_policy: bool) -> Gate:
    """Before connecting. ``dane``: the host has usable TLSA records (secure MX + host);
    ``sts_mode``: "enforce" / "testing" / None (no policy or mode none)."""
    if dane:
        # RFC 8689 4.2.1 items 1-3: DNSSEC-secure MX with DANE; only a DANE session
        return Gate(True, "DANE", "RFC 8689 4.2.1", ("dane",))
    if sts_mode in ("enforce", "testing") and in_sts_policy:
        # RFC 8689 4.2.1 item 2: an MTA-STS policy (enforce or testing) lists the host;
        # its certificate must be verified (item 3): only a verified session
        return Gate(True, "MTA-STS", "RFC 8689 4.2.1", ("verified",))
    if sts_mode in ("enforce", "testing"):
        return Gate(False, "MX host not in the MTA-STS policy", "RFC 8689 4.2.1")
    # RFC 8689 4.2.1: without DANE or MTA-STS the MX cannot be trusted: no delivery
    return Gate(False, "no DANE or MTA-STS policy for the MX host", "RFC 8689 4.2.1")


def session_gate(*, verified: bool, advertises: bool) -> Gate:
    """After STARTTLS and EHLO."""
    if not verified:
        # RFC 8689 4.2.1 item 3: the TLS session must be verified
        return Gate(False, "TLS session not verified", "RFC 8689 4.2.1")
    if not advertises:
        # RFC 8689 4.2.1 item 4: the next hop must support REQUIRETLS
        return Gate(False, "next hop does not advertise REQUIRETLS", "RFC 8689 4.2.1")
    return Gate(True, "", "RFC 8689 4.2.1")


def failure_reply(domain: str, reasons: list[str]) -> str:
    """RFC 8689 section 5: the recipient fails with 5.7.30."""
    why = "; ".join(reasons) or "no MX host satisfies REQUIRETLS"
    return f"{REPLY_CODE} REQUIRETLS: no verified TLS path to {domain}: {why}"[:900]
