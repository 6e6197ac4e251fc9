"""The TLS policy decision (relay.delivery.tlspolicy.decide): every branch, as a table.

Each row: the inputs, then the action, effective mode, RFC 8460 result to record,
whether it is reported, whether it counts as enforced, and the fall-back level."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from relay.delivery.tls import MX_NOT_IN_POLICY, STARTTLS_MISSING_REASON
from relay.delivery.tlspolicy import (
    LEVELS_ALL,
    LEVELS_VERIFIED,
    Action,
    Mode,
    Offer,
    PolicyMode,
    TlsInputs,
    decide,
    policy_mode,
)
from relay.model import StsMode, TlsPolicy, TlsResultType

P, OF, A, M, R = PolicyMode, Offer, Action, Mode, TlsResultType
EXP = R.CERTIFICATE_EXPIRED

# (policy, tls_required_no, mx_in_policy, offer, verifying, failure)
#   -> (action, mode, result_type, report, enforced, fallback)
TABLE: list[tuple[tuple[object, ...], tuple[object, ...]]] = [
    # the policy could not be read: defer, whatever else is known (RFC 8461 5)
    (
        (P.UNAVAILABLE, False, None, OF.UNKNOWN, False, None),
        (A.DEFER, M.ENFORCE, None, False, True, ""),
    ),
    (
        (P.UNAVAILABLE, True, True, OF.VERIFIED, True, None),
        (A.DEFER, M.ENFORCE, None, False, True, ""),
    ),
    # job level (mx_in_policy None)
    (
        (P.ENFORCE, False, None, OF.UNKNOWN, False, None),
        (A.REQUIRE_TLS, M.ENFORCE, None, False, False, ""),
    ),
    (
        (P.ENFORCE, True, None, OF.UNKNOWN, False, None),
        (A.VERIFY, M.TESTING, None, False, False, ""),
    ),
    (
        (P.TESTING, False, None, OF.UNKNOWN, False, None),
        (A.VERIFY, M.TESTING, None, False, False, ""),
    ),
    (
        (P.NONE, False, None, OF.UNKNOWN, False, None),
        (A.OPPORTUNISTIC, M.OPPORTUNISTIC, None, False, False, ""),
    ),
    # host level (RFC 8461 4.1)
    (
        (P.ENFORCE, False, False, OF.UNKNOWN, False, None),
        (A.REFUSE_HOST, M.ENFORCE, R.VALIDATION_FAILURE, True, True, ""),
    ),
    (
        (P.ENFORCE, False, True, OF.UNKNOWN, False, None),
        (A.REQUIRE_TLS, M.ENFORCE, None, False, False, ""),
    ),
    (
        (P.ENFORCE, True, False, OF.UNKNOWN, False, None),
        (A.OPPORTUNISTIC, M.TESTING, R.VALIDATION_FAILURE, True, False, ""),
    ),
    (
        (P.TESTING, False, False, OF.UNKNOWN, False, None),
        (A.OPPORTUNISTIC, M.TESTING, R.VALIDATION_FAILURE, True, False, ""),
    ),
    (
        (P.TESTING, False, True, OF.UNKNOWN, False, None),
        (A.VERIFY, M.TESTING, None, False, False, ""),
    ),
    (
        (P.NONE, False, True, OF.UNKNOWN, False, None),
        (A.OPPORTUNISTIC, M.OPPORTUNISTIC, None, False, False, ""),
    ),
    # after the handshake, enforce (RFC 8461 4.2, 5)
    ((P.ENFORCE, False, True, OF.VERIFIED, True, None), (A.SEND, M.ENFORCE, None, True, False, "")),
    (
        (P.ENFORCE, False, True, OF.NOT_OFFERED, True, None),
        (A.REFUSE_HOST, M.ENFORCE, R.STARTTLS_NOT_SUPPORTED, True, True, ""),
    ),
    (
        (P.ENFORCE, False, True, OF.FAILED, True, EXP),
        (A.REFUSE_HOST, M.ENFORCE, EXP, True, True, ""),
    ),
    (
        (P.ENFORCE, False, True, OF.FAILED, True, None),
        (A.REFUSE_HOST, M.ENFORCE, R.VALIDATION_FAILURE, True, True, ""),
    ),
    (
        (P.ENFORCE, False, True, OF.ENCRYPTED, False, None),
        (A.REFUSE_HOST, M.ENFORCE, R.VALIDATION_FAILURE, True, True, ""),
    ),
    # after the handshake, testing: the verification pass reports, the retry does not
    ((P.TESTING, False, True, OF.VERIFIED, True, None), (A.SEND, M.TESTING, None, True, False, "")),
    (
        (P.TESTING, False, True, OF.NOT_OFFERED, True, None),
        (A.SEND, M.TESTING, R.STARTTLS_NOT_SUPPORTED, True, False, ""),
    ),
    (
        (P.TESTING, False, True, OF.FAILED, True, EXP),
        (A.FALL_BACK, M.TESTING, EXP, True, False, "encrypted"),
    ),
    (
        (P.TESTING, False, True, OF.FAILED, False, EXP),
        (A.FALL_BACK, M.TESTING, EXP, False, False, "clear"),
    ),
    (
        (P.TESTING, False, False, OF.ENCRYPTED, False, None),
        (A.SEND, M.TESTING, None, False, False, ""),
    ),
    (
        (P.TESTING, False, False, OF.NOT_OFFERED, False, None),
        (A.SEND, M.TESTING, R.STARTTLS_NOT_SUPPORTED, False, False, ""),
    ),
    (
        (P.ENFORCE, True, True, OF.NOT_OFFERED, True, None),
        (A.SEND, M.TESTING, R.STARTTLS_NOT_SUPPORTED, True, False, ""),
    ),
    # after the handshake, no policy (RFC 3207, RFC 7435)
    (
        (P.NONE, False, True, OF.VERIFIED, False, None),
        (A.SEND, M.OPPORTUNISTIC, None, True, False, ""),
    ),
    (
        (P.NONE, False, True, OF.ENCRYPTED, False, None),
        (A.SEND, M.OPPORTUNISTIC, None, True, False, ""),
    ),
    (
        (P.NONE, False, True, OF.NOT_OFFERED, False, None),
        (A.SEND, M.OPPORTUNISTIC, R.STARTTLS_NOT_SUPPORTED, True, False, ""),
    ),
    (
        (P.NONE, False, True, OF.FAILED, False, EXP),
        (A.FALL_BACK, M.OPPORTUNISTIC, EXP, True, False, "clear"),
    ),
]


@pytest.mark.parametrize(("inputs", "want"), TABLE, ids=lambda v: "-".join(map(str, v)))
def test_decision_table(inputs: tuple[object, ...], want: tuple[object, ...]) -> None:
    policy, no_tls, in_policy, offer, verifying, failure = inputs
    d = decide(
        TlsInputs(
            policy,  # type: ignore[arg-type]
            tls_required_no=bool(no_tls),
            mx_in_policy=in_policy,  # type: ignore[arg-type]
            offer=offer,  # type: ignore[arg-type]
            verifying=bool(verifying),
            failure=failure,  # type: ignore[arg-type]
        )
    )
    got = (d.action, d.mode, d.result_type, d.report, d.enforced, d.fallback)
    assert got == want
    assert d.rfc.startswith("RFC "), d  # every branch names its section
    assert d.levels == (LEVELS_VERIFIED if d.mode is M.ENFORCE else LEVELS_ALL)


def test_every_action_and_policy_mode_is_in_the_table() -> None:
    actions = {want[0] for _, want in TABLE}
    assert actions == set(Action)
    assert {inp[0] for inp, _ in TABLE} == set(PolicyMode)
    assert {inp[3] for inp, _ in TABLE} == set(Offer)


def test_reasons() -> None:
    d = decide(TlsInputs(P.UNAVAILABLE, reason="cache unreadable: database is locked"))
    assert d.reason == "cache unreadable: database is locked"
    assert decide(TlsInputs(P.ENFORCE, mx_in_policy=False)).reason == MX_NOT_IN_POLICY
    stripped = decide(TlsInputs(P.ENFORCE, mx_in_policy=True, offer=OF.NOT_OFFERED))
    assert stripped.reason == STARTTLS_MISSING_REASON
    refused = decide(
        TlsInputs(P.NONE, mx_in_policy=True, offer=OF.NOT_OFFERED, reason="STARTTLS refused")
    )
    assert refused.reason == "STARTTLS refused"
    with pytest.raises(FrozenInstanceError):
        d.reason = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        (None, P.NONE),
        (TlsPolicy("d.test"), P.NONE),
        (TlsPolicy("d.test", fetch_error=R.STS_POLICY_FETCH_ERROR), P.NONE),
        (TlsPolicy("d.test", StsMode.NONE), P.NONE),
        (TlsPolicy("d.test", StsMode.TESTING), P.TESTING),
        (TlsPolicy("d.test", StsMode.ENFORCE), P.ENFORCE),
    ],
)
def test_policy_mode(policy: TlsPolicy | None, want: PolicyMode) -> None:
    assert policy_mode(policy) is want
