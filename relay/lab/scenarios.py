"""The downgrade lab's scenarios: each attack MTA-STS (RFC 8461) exists to stop, what the
RFC says a sender must do, what a sender without MTA-STS does, and the outcome RFC
8461/8460 require under each policy mode.

A scenario is played once per policy mode (``no-policy``: the domain publishes no TXT
record; ``none``, ``testing``, ``enforce``: it publishes a policy of that mode listing
its real MX). It has an optional first phase (``prime``: an honest delivery that lets
the relay learn a policy) and an attack phase: which receiving host the MX name leads
to (``Target``) and how the policy host answers (``SiteMode``).

Expected outcomes are data (``Expect``): delivered or held, over TLS or clear text, to
the real MX or the attacker, and the set of TLS-RPT result types recorded for the
attack phase (``success`` for a good TLS session). The runner compares them cell by
cell.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from relay.lab.policyhost import SiteMode


class Mode(enum.StrEnum):
    NO_POLICY = "no-policy"
    NONE = "none"
    TESTING = "testing"
    ENFORCE = "enforce"


MODES: tuple[Mode, ...] = (Mode.NO_POLICY, Mode.NONE, Mode.TESTING, Mode.ENFORCE)


class Target(enum.StrEnum):
    """The host the MX name leads to in the attack phase."""

    GOOD = "good"  # STARTTLS, lab-CA certificate for the MX name, TLS 1.2+
    PLAIN = "plain"  # no STARTTLS at all
    STRIP = "strip"  # the good MX behind the STARTTLS-stripping proxy
    INJECT = "inject"  # plaintext injected after the STARTTLS 220 reply
    EXPIRED = "expired"  # certificate expired
    WRONG_NAME = "wrong-name"  # certificate for another name
    UNKNOWN_CA = "unknown-ca"  # certificate from a CA the sender does not trust
    LEGACY_TLS = "legacy-tls"  # TLS 1.0/1.1 only
    EVIL = "evil"  # spoofed MX record: an attacker host outside the policy's patterns


SUCCESS = "success"
STNS = "starttls-not-supported"
FETCH = "sts-policy-fetch-error"
INVALID = "sts-policy-invalid"


@dataclass(frozen=True, slots=True)
class Expect:
    delivered: bool
    transport: str | None = None  # "tls" | "clear" when delivered
    attacker: bool = False  # delivered to the attacker's host
    results: frozenset[str] = frozenset()
    note: str = ""


def tls(*results: str, note: str = "") -> Expect:
    return Expect(True, "tls", False, frozenset(results or (SUCCESS,)), note)


def clear(*results: str, note: str = "") -> Expect:
    return Expect(True, "clear", False, frozenset(results), note)


def held(*results: str, note: str = "") -> Expect:
    return Expect(False, None, False, frozenset(results), note)


def to_attacker(*results: str, note: str = "") -> Expect:
    return Expect(True, "tls", True, frozenset(results or (SUCCESS,)), note)


def same(e: Expect) -> dict[Mode, Expect]:
    return {m: e for m in MODES}


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    attack: str  # the attack, one sentence
    rfc: str  # what RFC 8461 says a sender must do
    legacy: str  # what a sender without MTA-STS does
    target: Target
    expect: Mapping[Mode, Expect]
    site: SiteMode = SiteMode.NORMAL
    # phase 1 (honest delivery) per cell mode: the policy mode served then; cells not
    # listed have no phase 1. A primed cell's TXT id changes for the attack phase.
    prime: Mapping[Mode, Mode] = field(default_factory=dict)
    check: str = ""  # attack-specific check: "stripped" | "injection"

    def describe(self) -> str:
        return f"{self.attack} RFC 8461: {self.rfc} Without MTA-STS: {self.legacy}"


def _cert_failure(result: str, what: str) -> dict[Mode, Expect]:
    return {
        Mode.NO_POLICY: tls(note=f"opportunistic TLS does not check {what}"),
        Mode.NONE: tls(note=f"opportunistic TLS does not check {what}"),
        Mode.TESTING: tls(result, note="delivered, failure reported"),
        Mode.ENFORCE: held(result),
    }


def _fetch_failure(result: str) -> dict[Mode, Expect]:
    e = tls(result, SUCCESS, note="no usable policy: as without MTA-STS")
    return {Mode.NO_POLICY: tls(), Mode.NONE: e, Mode.TESTING: e, Mode.ENFORCE: e}


_DOWNGRADE = {
    Mode.NO_POLICY: clear(STNS),
    Mode.NONE: clear(STNS),
    Mode.TESTING: clear(STNS, note="delivered, failure reported"),
    Mode.ENFORCE: held(STNS, note="deferred 4.7.5, never sent in clear"),
}

TOFU_NOTE = "TOFU gap: nothing to learn on first contact (RFC 8461 3.3, 10)"

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "good-tls",
        "No attack: the MX offers STARTTLS with a valid certificate for its name.",
        "deliver over TLS 1.2+ after checking the certificate against the MX name.",
        "delivers over TLS without checking the certificate.",
        Target.GOOD,
        same(tls()),
    ),
    Scenario(
        "no-starttls",
        "The MX does not offer STARTTLS (a misconfigured or downgraded host).",
        "under enforce, never deliver in clear: defer and report starttls-not-supported.",
        "delivers in clear text.",
        Target.PLAIN,
        _DOWNGRADE,
    ),
    Scenario(
        "strip-starttls",
        "A man in the middle rewrites STARTTLS in the EHLO reply to XXXXXXXA.",
        "under enforce, treat the missing STARTTLS as a failure: defer, never clear text.",
        "sees no STARTTLS and delivers in clear text to the attacker's path.",
        Target.STRIP,
        _DOWNGRADE,
        check="stripped",
    ),
    Scenario(
        "starttls-injection",
        "The MX path appends a plaintext '250 injected' reply to the STARTTLS 220 reply.",
        "(RFC 3207 4.2) discard everything read before TLS; deliver inside TLS only.",
        "a careless client reads the injected reply as if it came inside TLS.",
        Target.INJECT,
        same(tls(note="injected bytes discarded at STARTTLS")),
        check="injection",
    ),
    Scenario(
        "expired-cert",
        "The MX presents an expired certificate.",
        "under enforce, refuse the host and defer; report certificate-expired.",
        "delivers over unauthenticated TLS.",
        Target.EXPIRED,
        _cert_failure("certificate-expired", "dates"),
    ),
    Scenario(
        "wrong-name",
        "The MX presents a valid certificate for another host name.",
        "under enforce, refuse the host and defer; report certificate-host-mismatch.",
        "delivers over unauthenticated TLS.",
        Target.WRONG_NAME,
        _cert_failure("certificate-host-mismatch", "names"),
    ),
    Scenario(
        "unknown-ca",
        "The MX presents a certificate from a CA the sender does not trust (self-made).",
        "under enforce, refuse the host and defer; report certificate-not-trusted.",
        "delivers over unauthenticated TLS.",
        Target.UNKNOWN_CA,
        _cert_failure("certificate-not-trusted", "the issuer"),
    ),
    Scenario(
        "legacy-tls",
        "The MX speaks only TLS 1.0/1.1.",
        "(7.2) require TLS 1.2 or newer: under enforce, defer; report validation-failure.",
        "delivers over the old TLS version.",
        Target.LEGACY_TLS,
        _cert_failure("validation-failure", "the TLS version"),
    ),
    Scenario(
        "dns-spoof-mx",
        "Spoofed DNS points the MX at an attacker host (valid certificate for its own "
        "name) outside the policy's mx patterns.",
        "(5) deliver only to MX hosts matching the policy: under enforce, defer.",
        "delivers to the attacker, even over valid TLS.",
        Target.EVIL,
        {
            Mode.NO_POLICY: to_attacker(),
            Mode.NONE: to_attacker(),
            Mode.TESTING: to_attacker("validation-failure", note="mx-host-not-in-policy"),
            Mode.ENFORCE: held("validation-failure", note="mx-host-not-in-policy"),
        },
    ),
    Scenario(
        "policy-down-cached",
        "With a policy already cached, the policy host goes down, the TXT id changes and a "
        "man in the middle strips STARTTLS.",
        "(3.3, 5.1) keep applying the unexpired cached policy; under enforce, defer.",
        "delivers in clear text.",
        Target.STRIP,
        {**_DOWNGRADE, Mode.ENFORCE: held(STNS, note="the cached policy holds")},
        site=SiteMode.DOWN,
        prime={Mode.NONE: Mode.NONE, Mode.TESTING: Mode.TESTING, Mode.ENFORCE: Mode.ENFORCE},
        check="stripped",
    ),
    Scenario(
        "policy-down-first-contact",
        "On first contact the policy host is unreachable and a man in the middle strips STARTTLS.",
        "(3.3) with no policy fetched and none cached, deliver as if the domain had no "
        "policy (report sts-policy-fetch-error).",
        "delivers in clear text.",
        Target.STRIP,
        {
            Mode.NO_POLICY: clear(STNS),
            Mode.NONE: clear(FETCH, STNS, note=TOFU_NOTE),
            Mode.TESTING: clear(FETCH, STNS, note=TOFU_NOTE),
            Mode.ENFORCE: clear(FETCH, STNS, note=TOFU_NOTE),
        },
        site=SiteMode.DOWN,
        check="stripped",
    ),
    Scenario(
        "policy-redirect",
        "The policy host answers with a 301 redirect to another server.",
        "(3.3) never follow redirects: no policy; report sts-policy-fetch-error.",
        "does not fetch policies.",
        Target.GOOD,
        _fetch_failure(FETCH),
        site=SiteMode.REDIRECT,
    ),
    Scenario(
        "policy-wrong-type",
        "The policy is served as text/html.",
        "(3.2) accept only text/plain: no policy; report sts-policy-fetch-error.",
        "does not fetch policies.",
        Target.GOOD,
        _fetch_failure(FETCH),
        site=SiteMode.WRONG_CONTENT_TYPE,
    ),
    Scenario(
        "policy-invalid",
        "The policy body does not parse (an unknown mode).",
        "(3.2) reject the policy: no policy; report sts-policy-invalid.",
        "does not fetch policies.",
        Target.GOOD,
        _fetch_failure(INVALID),
        site=SiteMode.INVALID,
    ),
    Scenario(
        "policy-404",
        "The policy host answers 404 Not Found.",
        "(3.3) only a 200 answer carries a policy: no policy; report sts-policy-fetch-error.",
        "does not fetch policies.",
        Target.GOOD,
        _fetch_failure(FETCH),
        site=SiteMode.NOT_FOUND,
    ),
    Scenario(
        "policy-oversized",
        "The policy body is over 64 KiB.",
        "(3.3) a sender may cap the size; we refuse (never truncate): report "
        "sts-policy-fetch-error.",
        "does not fetch policies.",
        Target.GOOD,
        _fetch_failure(FETCH),
        site=SiteMode.OVERSIZED,
    ),
    Scenario(
        "txt-id-changed",
        "The domain publishes a new policy mode under a new TXT id (or removes its TXT "
        "record) while a man in the middle strips STARTTLS.",
        "(3.3) refetch on a new id and apply the new mode; a removed record does not end "
        "a cached policy before max_age.",
        "delivers in clear text.",
        Target.STRIP,
        {
            Mode.NO_POLICY: held(STNS, note="TXT removed: the cached enforce policy still holds"),
            Mode.NONE: clear(STNS, note="enforce -> none applied"),
            Mode.TESTING: clear(STNS, note="enforce -> testing applied"),
            Mode.ENFORCE: held(STNS, note="testing -> enforce applied"),
        },
        prime={
            Mode.NO_POLICY: Mode.ENFORCE,
            Mode.NONE: Mode.ENFORCE,
            Mode.TESTING: Mode.ENFORCE,
            Mode.ENFORCE: Mode.TESTING,
        },
        check="stripped",
    ),
)


def by_name(name: str) -> Scenario:
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise KeyError(name)
