"""The downgrade lab's whole matrix, in the test suite: every scenario under every
policy mode against a relay built from its ordinary config, on loopback. Every cell
must match what RFC 8461/8460 require; the assertions read the structured results."""

from __future__ import annotations

import time

import pytest

from relay.lab.attacks import legacy_tls_supported
from relay.lab.runner import CellResult, LabRun, compare, format_matrix, run_lab
from relay.lab.scenarios import MODES, SCENARIOS, Expect, Mode, clear, held, tls
from relay.tlsrpt.report import parse_report, validate_report

pytestmark = pytest.mark.timeout(90)

STNS = "starttls-not-supported"


async def test_every_cell_of_the_matrix_matches_the_rfcs() -> None:
    t0 = time.monotonic()
    run = await run_lab()
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"the matrix took {elapsed:.1f} s"
    # an OpenSSL that still speaks TLS 1.1 (this machine's does) plays every scenario
    legacy = legacy_tls_supported()
    assert run.skipped == (() if legacy else (run.skipped[0],))
    assert len(run.cells) == (len(SCENARIOS) - (0 if legacy else 1)) * len(MODES) >= 15 * 4
    bad = [(c.scenario, c.mode.value, c.problems) for c in run.cells if not c.ok]
    assert bad == [], format_matrix(run)

    def cell(s: str, m: Mode) -> CellResult:
        return run.cell(s, m)

    # good TLS: verified TLS 1.2+ everywhere, a success recorded
    for m in MODES:
        c = cell("good-tls", m)
        assert c.delivered and c.tls_version in ("TLSv1.2", "TLSv1.3")
        assert c.results == ("success",)

    # stripping / no STARTTLS: clear text without enforce, held (4.7.5) under enforce
    for s in ("strip-starttls", "no-starttls"):
        for m in (Mode.NO_POLICY, Mode.NONE, Mode.TESTING):
            assert cell(s, m).delivered and cell(s, m).transport == "clear"
        e = cell(s, Mode.ENFORCE)
        assert not e.delivered and "4.7.5" in e.reply and e.results == (STNS,)

    # certificate failures: reported under testing, refused under enforce
    for s, rt in (
        ("expired-cert", "certificate-expired"),
        ("wrong-name", "certificate-host-mismatch"),
        ("unknown-ca", "certificate-not-trusted"),
        ("legacy-tls", "validation-failure"),
    ):
        if s == "legacy-tls" and not legacy:
            continue
        assert cell(s, Mode.NONE).results == ("success",)
        t = cell(s, Mode.TESTING)
        assert t.delivered and t.transport == "tls" and t.results == (rt,)
        e = cell(s, Mode.ENFORCE)
        assert not e.delivered and e.results == (rt,) and "4.7.5" in e.reply
    if legacy:
        assert cell("legacy-tls", Mode.NO_POLICY).tls_version == "TLSv1.1"

    # STARTTLS reply injection: delivered inside TLS, the injected line never used
    for m in MODES:
        c = cell("starttls-injection", m)
        assert c.delivered and c.tls_version in ("TLSv1.2", "TLSv1.3")

    # spoofed MX: the attacker gets the mail unless the policy is enforced
    for m in (Mode.NO_POLICY, Mode.NONE, Mode.TESTING):
        assert cell("dns-spoof-mx", m).attacker
    e = cell("dns-spoof-mx", Mode.ENFORCE)
    assert not e.delivered and not e.attacker and e.results == ("validation-failure",)

    # a cached policy survives the policy host going down (and a relay restart)
    assert not cell("policy-down-cached", Mode.ENFORCE).delivered
    # ... but on first contact there is nothing to hold on to (the TOFU gap)
    f = cell("policy-down-first-contact", Mode.ENFORCE)
    assert f.delivered and f.transport == "clear"
    assert f.results == (STNS, "sts-policy-fetch-error")

    # policy fetch failures: no policy, the right result type, delivered as usual
    for s, rt in (
        ("policy-redirect", "sts-policy-fetch-error"),
        ("policy-wrong-type", "sts-policy-fetch-error"),
        ("policy-404", "sts-policy-fetch-error"),
        ("policy-oversized", "sts-policy-fetch-error"),
        ("policy-invalid", "sts-policy-invalid"),
    ):
        c = cell(s, Mode.ENFORCE)
        assert c.delivered and c.transport == "tls" and set(c.results) == {rt, "success"}

    # a new TXT id brings the new mode; a removed TXT record keeps the cached one
    assert not cell("txt-id-changed", Mode.ENFORCE).delivered
    assert cell("txt-id-changed", Mode.TESTING).transport == "clear"
    assert cell("txt-id-changed", Mode.NONE).transport == "clear"
    assert not cell("txt-id-changed", Mode.NO_POLICY).delivered

    # TLS-RPT: one valid RFC 8460 report per lab domain, counts equal what happened
    by_domain = {r.policy_domain: r for r in run.reports}
    assert set(by_domain) == {c.domain for c in run.cells}
    for r in run.reports:
        assert validate_report(r.to_dict(), strict=True) == []
        assert parse_report(r.to_json()).report_id == r.report_id
    strip_enf = by_domain["strip-starttls.enforce.lab.test"]
    assert (strip_enf.total_successful, strip_enf.total_failed) == (0, 1)
    [pol] = strip_enf.policies
    assert pol.policy_type == "sts" and pol.mx_hosts == ("mx.strip-starttls.enforce.lab.test",)
    assert [d.result_type for d in pol.failure_details] == [STNS]
    assert pol.failure_details[0].receiving_ip == "127.0.0.13"  # the stripping proxy
    cached = by_domain["policy-down-cached.enforce.lab.test"]  # phase 1 success + the attack
    assert (cached.total_successful, cached.total_failed) == (1, 1)
    nopol = by_domain["good-tls.no-policy.lab.test"]
    assert [p.policy_type for p in nopol.policies] == ["no-policy-found"]

    text = format_matrix(run)
    assert f"{len(run.cells)}/{len(run.cells)} cells match RFC 8461/8460" in text
    assert "MISMATCH" not in text


def test_compare_names_every_mismatch() -> None:
    assert compare(tls(), True, "tls", False, frozenset({"success"})) == ()
    assert compare(held(STNS), True, "clear", False, frozenset({STNS})) == ("expected held",)
    probs = compare(clear(STNS), True, "tls", True, frozenset({"success"}))
    assert probs[0] == "expected delivery over clear, got tls"
    assert probs[1] == "delivered to the attacker"
    assert "TLS-RPT results" in probs[2]


def test_a_mismatch_is_printed_and_fails_the_run() -> None:
    exp = held(STNS)
    bad = CellResult(
        "strip-starttls", Mode.ENFORCE, "strip-starttls.enforce.lab.test", True, "clear",
        None, False, (STNS,), "", exp, compare(exp, True, "clear", False, frozenset({STNS})),
    )  # fmt: skip
    good = CellResult(
        "strip-starttls", Mode.NONE, "strip-starttls.none.lab.test", True, "clear",
        None, False, (STNS,), "", Expect(True, "clear", False, frozenset({STNS})), (),
    )  # fmt: skip
    run = LabRun((good, bad), (), "relay.lab.test", 1.0)
    assert not run.ok and run.to_dict()["mismatches"] == 1
    text = format_matrix(run)
    assert "CLEAR MISMATCH" in text and "MISMATCH: expected held" in text
    assert "1/2 cells match" in text
