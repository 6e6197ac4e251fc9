"""Result types of the authentication checks (shared by spf, dkim, dmarc, arc, results)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SpfResultCode(enum.StrEnum):
    """RFC 7208 section 2.6 results."""

    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: SpfResultCode
    domain: str  # the domain checked (MAIL FROM domain, or HELO when MAIL FROM is null)
    identity: str  # "mailfrom" or "helo"
    explanation: str = ""  # exp= text on fail, else a short reason
    mechanism: str = ""  # the mechanism that matched, e.g. "ip4:192.0.2.0/24"
    lookups: int = 0


@dataclass(frozen=True, slots=True)
class DkimResult:
    """One DKIM signature's verdict (RFC 8601 dkim= method)."""

    result: str  # pass | fail | neutral | temperror | permerror | policy | none
    domain: str = ""  # d=
    selector: str = ""  # s=
    b: str = ""  # first characters of b=, for header.b
    algorithm: str = ""  # a=
    reason: str = ""  # why not pass, in plain words (e.g. "body hash mismatch")


class DmarcResultCode(enum.StrEnum):
    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: DmarcResultCode
    header_from: str = ""  # RFC5322.From domain
    policy: str = "none"  # the policy that applies: none | quarantine | reject (after sp=, pct=)
    record_policy: str = ""  # p= as published
    aligned_spf: bool = False
    aligned_dkim: bool = False
    org_domain: str = ""
    reason: str = ""
    testing: bool = False  # the policy record says t=y (RFC 9989): policy lowered one step


class ArcCv(enum.StrEnum):
    NONE = "none"
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class ArcResult:
    cv: ArcCv
    instances: int = 0  # number of ARC sets found (N)
    oldest_pass: int = 0  # RFC 8617 oldest-pass instance, 0 if none
    sealers: tuple[str, ...] = ()  # d= of each AS, by instance 1..N
    reason: str = ""
    # DMARC result recorded in the oldest AAR (instance 1), "" when absent
    first_aar_dmarc: str = ""


@dataclass(frozen=True, slots=True)
class AuthResults:
    """Everything the relay saw about one message's authentication."""

    spf: SpfResult | None
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult | None
    arc: ArcResult | None
    helo_spf: SpfResult | None = None
    dmarc_override: str = ""  # e.g. "arc=pass by trusted sealer example.com"
