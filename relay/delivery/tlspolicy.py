"""The transport-security decision of a delivery attempt, as one pure function
(RFC 8461 sections 4.1, 4.2, 5; RFC 8689 sections 3 and 4.2.2; RFC 3207; RFC 7435;
RFC 8460 section 4.3 for the result types).

``decide(TlsInputs) -> TlsDecision`` is asked three times in an attempt, each time with
more known:

1. for the job (``mx_in_policy`` None, ``offer`` UNKNOWN): defer at once (the policy is
   unavailable), or the plan: require verified TLS, verify-and-report, or opportunistic;
2. for each MX host (``mx_in_policy`` known): refuse the host, or how to connect to it;
3. after the handshake (``offer`` known): send over this session, refuse the host, or
   fall back to a new connection at a lower level.

It reads no clock, no socket and no store; the courier (connection pool, retry loop,
TLS-RPT outcomes) calls it and does what it says. Every branch names its RFC section in
``rfc`` and in a comment beside it; docs/delivery.md has the same table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.delivery.tls import MX_NOT_IN_POLICY, STARTTLS_MISSING_REASON
from relay.model import StsMode, TlsPolicy, TlsResultType

CERT_NOT_VERIFIED = "certificate not verified for the MX host"


class PolicyMode(enum.StrEnum):
    """What the recipient domain's policy says, as far as it could be learnt."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"  # no policy, or a policy in mode "none"
    UNAVAILABLE = "unavailable"  # the policy source could not say (its cache unreadable)


class Mode(enum.Enum):
    """The effective mode of the attempt."""

    ENFORCE = "enforce"
    TESTING = "testing"
    OPPORTUNISTIC = "opportunistic"


class Offer(enum.StrEnum):
    """What the server offered and what the handshake gave."""

    UNKNOWN = "unknown"  # not connected yet
    VERIFIED = "verified"  # STARTTLS done, certificate verified for the MX name
    ENCRYPTED = "encrypted"  # STARTTLS done, certificate not verified
    NOT_OFFERED = "not-offered"  # no STARTTLS in the EHLO reply, or STARTTLS refused
    FAILED = "failed"  # the handshake or the certificate check failed


class Action(enum.StrEnum):
    DEFER = "defer"  # no connection: every recipient deferred (4.7.0)
    REFUSE_HOST = "refuse-host"  # this host (or session) must not carry the mail
    REQUIRE_TLS = "require-tls"  # connect; verified STARTTLS or nothing
    VERIFY = "verify"  # connect with verification; what enforce would refuse is reported
    OPPORTUNISTIC = "opportunistic"  # connect; STARTTLS when offered, else clear text
    SEND = "send"  # the session as it stands may carry the mail
    FALL_BACK = "fall-back"  # a new connection at ``fallback`` ("encrypted" or "clear")


LEVELS_ALL = ("verified", "encrypted", "clear")
LEVELS_VERIFIED = ("verified",)


@dataclass(frozen=True, slots=True)
class TlsInputs:
    policy: PolicyMode
    tls_required_no: bool = False  # the message's "TLS-Required: No" is honoured
    mx_in_policy: bool | None = None  # None: not asked yet (the job-level decision)
    offer: Offer = Offer.UNKNOWN
    verifying: bool = False  # the handshake was made with the verifying context
    failure: TlsResultType | None = None  # RFC 8460 type of a FAILED handshake
    reason: str = ""  # why the policy is unavailable, or the handshake's failure detail


@dataclass(frozen=True, slots=True)
class TlsDecision:
    action: Action
    mode: Mode
    levels: tuple[str, ...]  # session TLS levels that may carry the mail (pooled reuse)
    reason: str = ""
    result_type: TlsResultType | None = None  # the RFC 8460 failure to record, if any
    report: bool = False  # record a TLS outcome (RFC 8460) for this step
    enforced: bool = False  # the policy refused something (for the TLS-RPT ledger)
    fallback: str = ""  # FALL_BACK: the level of the new connection
    rfc: str = ""


def policy_mode(policy: TlsPolicy | None) -> PolicyMode:
    if policy is None or policy.mode is None or policy.mode is StsMode.NONE:
        return PolicyMode.NONE
    return PolicyMode.ENFORCE if policy.mode is StsMode.ENFORCE else PolicyMode.TESTING


def effective_mode(policy: PolicyMode, tls_required_no: bool) -> Mode:
    if policy is PolicyMode.ENFORCE:
        # RFC 8689 sections 3, 4.2.2: "TLS-Required: No" lets the sender ignore the
        # recipient's policy; the failures are still reported, as under testing
        return Mode.TESTING if tls_required_no else Mode.ENFORCE
    if policy is PolicyMode.TESTING:
        return Mode.TESTING
    return Mode.OPPORTUNISTIC  # NONE (UNAVAILABLE never reaches a mode: it defers)


def decide(i: TlsInputs) -> TlsDecision:
    if i.policy is PolicyMode.UNAVAILABLE:
        # RFC 8461 section 5: with a valid unexpired policy cached the sender MUST apply
        # it, and sections 3.3/10.2 make the cache the defence against a DNS attacker who
        # hides the policy. A cache that cannot be read may hold one: "no policy" would
        # be a guess that downgrades, so the recipients are deferred (fail closed).
        return TlsDecision(
            Action.DEFER,
            Mode.ENFORCE,
            LEVELS_VERIFIED,
            reason=i.reason or "MTA-STS policy unavailable",
            enforced=True,
            rfc="RFC 8461 5",
        )
    mode = effective_mode(i.policy, i.tls_required_no)
    levels = LEVELS_VERIFIED if mode is Mode.ENFORCE else LEVELS_ALL
    if i.mx_in_policy is None or i.offer is Offer.UNKNOWN:
        return _before_connect(i, mode, levels)
    return _after_handshake(i, mode, levels)


def _before_connect(i: TlsInputs, mode: Mode, levels: tuple[str, ...]) -> TlsDecision:
    if mode is Mode.OPPORTUNISTIC:
        # no policy (or mode none): RFC 3207 / RFC 7435 opportunistic STARTTLS, and
        # RFC 8461 section 5 has nothing to check (the MX host need not match anything)
        return TlsDecision(Action.OPPORTUNISTIC, mode, levels, rfc="RFC 7435; RFC 8461 5")
    if i.mx_in_policy is False:
        if mode is Mode.ENFORCE:
            # RFC 8461 sections 4.1 and 5: an MX host that matches no "mx" pattern is not
            # a candidate; RFC 8460 4.3 has no type of its own: validation-failure
            return TlsDecision(
                Action.REFUSE_HOST,
                mode,
                levels,
                reason=MX_NOT_IN_POLICY,
                result_type=TlsResultType.VALIDATION_FAILURE,
                report=True,
                enforced=True,
                rfc="RFC 8461 4.1, 5",
            )
        # testing: RFC 8461 section 5 delivers anyway and reports what enforce refuses
        return TlsDecision(
            Action.OPPORTUNISTIC,
            mode,
            levels,
            reason=MX_NOT_IN_POLICY,
            result_type=TlsResultType.VALIDATION_FAILURE,
            report=True,
            rfc="RFC 8461 4.1, 5",
        )
    if mode is Mode.ENFORCE:
        # RFC 8461 sections 4.2, 5: STARTTLS, TLS 1.2+, a PKIX certificate for the MX name
        return TlsDecision(Action.REQUIRE_TLS, mode, levels, rfc="RFC 8461 4.2, 5")
    # testing (or enforce waived by RFC 8689): the same check, reported, never refusing
    return TlsDecision(Action.VERIFY, mode, levels, rfc="RFC 8461 5; RFC 8689 4.2.2")


def _after_handshake(i: TlsInputs, mode: Mode, levels: tuple[str, ...]) -> TlsDecision:
    # the first handshake of an attempt is reported (RFC 8460 counts sessions); the
    # opportunistic retry after a failed verification pass is not (already reported)
    report = mode is not Mode.TESTING or i.verifying
    if i.offer is Offer.VERIFIED:
        return TlsDecision(Action.SEND, mode, levels, report=report, rfc="RFC 8461 4.2")
    if mode is Mode.ENFORCE:
        if i.offer is Offer.NOT_OFFERED:
            # RFC 8461 section 5: the server must support STARTTLS; a stripped or missing
            # STARTTLS is refused (starttls-not-supported, RFC 8460 4.3.1)
            result, reason, rfc = (
                TlsResultType.STARTTLS_NOT_SUPPORTED,
                i.reason or STARTTLS_MISSING_REASON,
                "RFC 8461 5; RFC 8460 4.3.1",
            )
        elif i.offer is Offer.FAILED:
            # RFC 8461 section 4.2: the certificate must chain to a trusted root and be
            # valid for the MX host; a failed handshake is no TLS at all
            result = i.failure or TlsResultType.VALIDATION_FAILURE
            reason, rfc = i.reason or str(result), "RFC 8461 4.2; RFC 8460 4.3"
        else:
            # ENCRYPTED without verification cannot satisfy section 4.2
            result, reason, rfc = (
                TlsResultType.VALIDATION_FAILURE,
                CERT_NOT_VERIFIED,
                "RFC 8461 4.2",
            )
        return TlsDecision(
            Action.REFUSE_HOST,
            mode,
            levels,
            reason=reason,
            result_type=result,
            report=True,
            enforced=True,
            rfc=rfc,
        )
    if i.offer is Offer.ENCRYPTED:
        # opportunistic TLS (RFC 7435): encrypted beats clear text; nothing to report
        return TlsDecision(Action.SEND, mode, levels, report=report, rfc="RFC 7435")
    if i.offer is Offer.NOT_OFFERED:
        # testing / no policy: delivered in clear (RFC 3207 section 4: STARTTLS is
        # optional without a policy); RFC 8460 4.3.1 starttls-not-supported is reported
        return TlsDecision(
            Action.SEND,
            mode,
            levels,
            reason=i.reason or STARTTLS_MISSING_REASON,
            result_type=TlsResultType.STARTTLS_NOT_SUPPORTED,
            report=report,
            rfc="RFC 3207 4; RFC 8461 5; RFC 8460 4.3.1",
        )
    # FAILED handshake, not enforcing: testing retries without verification, then clear;
    # opportunistic falls back to clear text (what every MTA does, RFC 7435 section 1.1)
    fallback = "encrypted" if mode is Mode.TESTING and i.verifying else "clear"
    return TlsDecision(
        Action.FALL_BACK,
        mode,
        levels,
        reason=i.reason,
        result_type=i.failure or TlsResultType.VALIDATION_FAILURE,
        report=report,
        fallback=fallback,
        rfc="RFC 8461 5; RFC 7435",
    )
