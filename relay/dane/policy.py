"""The DANE decision for one MX host, as pure functions (RFC 7672, RFC 7671; Postfix's
``smtp_tls_security_level = dane``).

``host_policy(DaneInputs) -> DaneHostPolicy``, before connecting:

- the MX RRset (or, with no MX, the secure denial of it) not secure: DANE does not apply
  to any host of the domain (RFC 7672 section 2.2.1);
- the host's address records not secure: not for this host (section 2.2.2);
- the TLSA RRset at ``_25._tcp.<host>`` (or at the secure CNAME expansion first, RFC
  7671 section 7) secure and holding a usable record: DANE (STARTTLS required and a
  match; section 2.2); only unusable records: mandatory unauthenticated TLS (section
  2.2, "TLSA records ... none usable"); insecure or none: DANE does not apply, MTA-STS
  and then opportunistic TLS do (section 2.2; RFC 8461 section 2);
- the TLSA lookup bogus or failed: the host is not used (section 2.2: "MUST NOT ...
  deliver to that server"), the next is tried; never clear text.

``after_handshake(policy, offer, match) -> DaneOutcome``, after STARTTLS: send, or refuse
this host with the RFC 8460 section 4.3 result type to record.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.dane.tlsa import DaneMatch, usable
from relay.dns import TlsaRecord


class DaneState(enum.StrEnum):
    NONE = "none"  # DANE does not apply: MTA-STS, then opportunistic
    DANE = "dane"  # usable TLSA: STARTTLS required and the certificate must match
    ENCRYPT = "encrypt"  # only unusable TLSA records: mandatory unauthenticated TLS
    DEFER = "defer"  # the TLSA lookup failed or was bogus: do not use this host


class Lookup(enum.StrEnum):
    """How a DNS step ended, as far as DANE cares."""

    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    FAILED = "failed"  # SERVFAIL, timeout: no answer


@dataclass(frozen=True, slots=True)
class DaneInputs:
    mx: Lookup  # the MX RRset (or its authenticated absence for an implicit MX)
    address: Lookup  # the host's A/AAAA
    tlsa: Lookup  # SECURE/INSECURE with records; SECURE/INSECURE with none = no TLSA
    records: tuple[TlsaRecord, ...] = ()
    reason: str = ""  # the TLSA lookup's error text


@dataclass(frozen=True, slots=True)
class DaneHostPolicy:
    state: DaneState
    reason: str
    rfc: str
    records: tuple[TlsaRecord, ...] = ()
    result_type: str = ""  # RFC 8460 section 4.3 result to record before connecting


def host_policy(i: DaneInputs) -> DaneHostPolicy:
    if i.mx is not Lookup.SECURE:
        # RFC 7672 section 2.2.1: an insecure MX RRset gives no secure reference names;
        # DANE does not apply to its hosts
        return DaneHostPolicy(DaneState.NONE, "MX RRset not DNSSEC-secure", "RFC 7672 2.2.1")
    if i.address is not Lookup.SECURE:
        # RFC 7672 section 2.2.2: TLSA records are looked up only for a host whose
        # address records are secure
        return DaneHostPolicy(DaneState.NONE, "MX host address not secure", "RFC 7672 2.2.2")
    if i.tlsa is Lookup.BOGUS:
        # RFC 7672 section 2.2: a TLSA RRset that fails validation: the server is not used
        # (RFC 8460 4.3.2 dnssec-invalid); the next MX host is tried, never clear text
        return DaneHostPolicy(
            DaneState.DEFER,
            i.reason or "TLSA RRset DNSSEC-bogus",
            "RFC 7672 2.2; RFC 8460 4.3.2",
            result_type="dnssec-invalid",
        )
    if i.tlsa is Lookup.FAILED:
        # RFC 7672 section 2.2: a failed TLSA lookup (SERVFAIL, timeout) is not "no TLSA":
        # the host is skipped for now, as for a bogus answer
        return DaneHostPolicy(
            DaneState.DEFER,
            i.reason or "TLSA lookup failed",
            "RFC 7672 2.2; RFC 8460 4.3.2",
            result_type="dnssec-invalid",
        )
    if i.tlsa is Lookup.INSECURE or not i.records:
        # RFC 7672 section 2.2: no secure TLSA RRset: DANE does not apply; MTA-STS or
        # opportunistic TLS (RFC 8461 section 2) take over
        why = "TLSA RRset not secure" if i.records else "no TLSA records"
        return DaneHostPolicy(DaneState.NONE, why, "RFC 7672 2.2")
    good = tuple(r for r in i.records if usable(r))
    if good:
        # RFC 7672 sections 2.2, 3.1: usable records: authenticated TLS is mandatory
        return DaneHostPolicy(DaneState.DANE, "usable TLSA records", "RFC 7672 2.2, 3.1", good)
    # RFC 7672 section 2.2: a secure TLSA RRset with only unusable records: encrypted
    # but unauthenticated TLS is still mandatory (the domain signalled TLS support);
    # RFC 8460 4.3.2 tlsa-invalid is recorded
    return DaneHostPolicy(
        DaneState.ENCRYPT,
        "only unusable TLSA records",
        "RFC 7672 2.2, 3.1.3; RFC 8460 4.3.2",
        i.records,
        result_type="tlsa-invalid",
    )


class Offer(enum.StrEnum):
    NOT_OFFERED = "not-offered"  # no STARTTLS (stripped, or refused)
    FAILED = "failed"  # the TLS handshake failed
    ENCRYPTED = "encrypted"  # TLS up; the chain is in ``match``


@dataclass(frozen=True, slots=True)
class DaneOutcome:
    send: bool
    result_type: str  # "" on success; else the RFC 8460 section 4.3 type
    reason: str
    rfc: str


def after_handshake(
    policy: DaneHostPolicy, offer: Offer, match: DaneMatch | None, reason: str = ""
) -> DaneOutcome:
    assert policy.state in (DaneState.DANE, DaneState.ENCRYPT)
    if offer is Offer.NOT_OFFERED:
        # RFC 7672 section 2.2: with TLSA records STARTTLS is mandatory; a missing or
        # stripped STARTTLS is refused (RFC 8460 4.3.1 starttls-not-supported)
        return DaneOutcome(
            False,
            "starttls-not-supported",
            reason or "STARTTLS not offered",
            "RFC 7672 2.2; RFC 8460 4.3.1",
        )
    if offer is Offer.FAILED:
        # RFC 7672 section 2.2: no TLS session, no delivery to this host
        return DaneOutcome(
            False, "validation-failure", reason or "TLS handshake failed", "RFC 7672 2.2"
        )
    if policy.state is DaneState.ENCRYPT:
        # RFC 7672 section 2.2: unusable records only, any certificate (encrypted) is enough
        return DaneOutcome(True, "", "", "RFC 7672 2.2")
    if match is None or not match.matched:
        # RFC 7672 section 3: no TLSA record matches: the host is refused;
        # certificate-host-mismatch when a DANE-TA chain matched but the name did not,
        # else validation-failure (RFC 8460 4.3.1)
        rt = (match.result_type if match is not None else "") or "validation-failure"
        why = match.reason if match is not None else "no certificate chain"
        return DaneOutcome(False, rt, why, "RFC 7672 3.1, 3.2; RFC 8460 4.3.1")
    return DaneOutcome(True, "", "", "RFC 7672 3.1")
