"""`relay diagnose` end to end: real lab DNS server, real SPF/DKIM/ARC/DMARC, relay.cli.main.

The lab zone publishes SPF, a DKIM key and a DMARC p=reject policy for example.com and an
ARC key for the mailing list lists.test. Messages are signed with DkimSigner and sealed
with ArcSealer (keys made here), written to tmp_path, and diagnosed through the CLI with
a config whose [dns] nameservers point at the lab server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.auth.arc import ArcSealer
from relay.auth.dkim import DkimSigner
from relay.auth.types import ArcCv, ArcResult
from relay.cli import main
from relay.commands.keygen import generate
from relay.lab.dnsserver import LabDnsServer, Zone

SENDER_IP = "192.0.2.1"
LIST_IP = "198.51.100.7"
MESSAGE = (
    b"From: Ann Example <ann@example.com>\r\n"
    b"To: list@lists.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"Date: Mon, 1 Jun 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"dkim": generate("rsa"), "arc": generate("rsa")}


@pytest.fixture(scope="module")
def lab(keys: dict[str, Any]) -> Iterator[LabDnsServer]:
    zone = Zone()
    zone.add("example.com", "TXT", f"v=spf1 ip4:{SENDER_IP} -all")
    zone.add("example.com", "A", SENDER_IP)
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; rua=mailto:d@example.com")
    zone.add("s1._domainkey.example.com", "TXT", keys["dkim"].record())
    zone.add("lists.test", "TXT", f"v=spf1 ip4:{LIST_IP} -all")
    zone.add("arc1._domainkey.lists.test", "TXT", keys["arc"].record())
    with LabDnsServer(zone) as server:
        yield server


def _config(tmp: Path, lab: LabDnsServer, trusted: list[str]) -> Path:
    path = tmp / "config.toml"
    sealers = ", ".join(json.dumps(t) for t in trusted)
    path.write_text(
        '[server]\nhostname = "relay.lab.test"\n'
        f'[dns]\nnameservers = ["{lab.address}"]\ntimeout = 2\n'
        f"[arc]\ntrusted_sealers = [{sealers}]\n"
        "[auth]\nenabled = false\n"  # diagnose evaluates anyway
    )
    return path


def _signed(keys: dict[str, Any]) -> bytes:
    return DkimSigner("example.com", "s1", keys["dkim"].private_pem).sign(MESSAGE)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["diagnose", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_direct_mail_passes(
    tmp_path: Path, lab: LabDnsServer, keys: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    eml = tmp_path / "direct.eml"
    eml.write_bytes(_signed(keys))
    cfg = _config(tmp_path, lab, [])
    out = _run(
        capsys, str(eml), "--config", str(cfg), "--client-ip", SENDER_IP,
        "--helo", "mail.example.com", "--mail-from", "ann@example.com",
    )  # fmt: skip
    assert set(out) == {"spf", "dkim", "dmarc", "arc", "advice"}
    assert out["spf"] == {"result": "pass", "domain": "example.com", "explanation": ""}
    assert out["dkim"] == [
        {"result": "pass", "domain": "example.com", "selector": "s1", "reason": ""}
    ]
    assert out["dmarc"] == {
        "result": "pass",
        "policy": "reject",
        "header_from": "example.com",
        "aligned_spf": True,
        "aligned_dkim": True,
        "reason": "SPF and DKIM aligned with example.com",
        # issue 13: how the policy was found (RFC 9989 4.10 tree walk)
        "org_domain": "example.com",
        "policy_domain": "example.com",
        "walk": ["_dmarc.example.com", "_dmarc.com"],
        "testing": False,
        "discovery": "treewalk",
        "ignored_tags": [],
    }
    assert out["arc"] == {"cv": "none", "instances": 0}
    assert out["advice"] == ["Nothing to do: the message passes DMARC for example.com."]


def _forwarded(keys: dict[str, Any]) -> bytes:
    """What a mailing list makes of it: a subject tag and a footer (body changed)."""
    signed = _signed(keys)
    head, body = signed.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n" + body + b"--\r\nlist footer\r\n"


def test_forwarded_and_modified_fails_with_reasons(
    tmp_path: Path, lab: LabDnsServer, keys: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    eml = tmp_path / "fwd.eml"
    eml.write_bytes(b"Return-Path: <ann@example.com>\r\n" + _forwarded(keys))
    cfg = _config(tmp_path, lab, [])
    out = _run(capsys, str(eml), "--config", str(cfg), "--client-ip", LIST_IP)
    assert out["spf"]["result"] == "fail" and out["spf"]["domain"] == "example.com"
    assert LIST_IP in out["spf"]["explanation"]
    assert out["dkim"][0]["result"] == "fail"
    assert out["dkim"][0]["reason"] == "body hash mismatch"
    assert out["dmarc"]["result"] == "fail" and out["dmarc"]["policy"] == "reject"
    assert not out["dmarc"]["aligned_spf"] and not out["dmarc"]["aligned_dkim"]
    advice = " ".join(out["advice"])
    assert "looks like forwarding" in advice and "SRS" in advice
    assert "body hash mismatch" in advice
    # the plain-words form says the same, and that the relay would refuse it
    assert main(["diagnose", str(eml), "--config", str(cfg), "--client-ip", LIST_IP]) == 0
    text = capsys.readouterr().out
    assert "SPF fail for example.com (mailfrom)" in text
    assert "body hash mismatch: the body was changed after it was signed" in text
    assert "DKIM d=example.com s=s1 aligns with example.com (relaxed: same name)" in text
    assert "The relay would refuse this message (550 5.7.1" in text


def _sealed(keys: dict[str, Any]) -> bytes:
    sealer = ArcSealer("lists.test", "arc1", keys["arc"].private_pem, "lists.test")
    ar = (
        "lists.test; spf=pass smtp.mailfrom=ann@example.com; dkim=pass header.d=example.com; "
        "dmarc=pass (p=reject) header.from=example.com"
    )
    return sealer.seal(_forwarded(keys), ar, ArcResult(ArcCv.NONE))


def test_arc_chain_rescue_depends_on_trust(
    tmp_path: Path, lab: LabDnsServer, keys: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    eml = tmp_path / "sealed.eml"
    eml.write_bytes(_sealed(keys))
    argv = [str(eml), "--client-ip", LIST_IP, "--mail-from", "list-bounces@lists.test"]
    out = _run(capsys, *argv, "--config", str(_config(tmp_path, lab, [])))
    assert out["arc"] == {"cv": "pass", "instances": 1}
    assert out["spf"]["result"] == "pass" and out["dmarc"]["result"] == "fail"
    assert any("add it to [arc] trusted_sealers" in a for a in out["advice"])
    assert any("SPF passed for lists.test, which does not align" in a for a in out["advice"])
    trusted = _config(tmp_path, lab, ["lists.test"])
    out = _run(capsys, *argv, "--config", str(trusted))
    assert out["dmarc"]["result"] == "fail"
    assert any("trusted sealer" in a and "accepts it" in a for a in out["advice"])
    assert main(["diagnose", *argv, "--config", str(trusted)]) == 0
    text = capsys.readouterr().out
    assert "ARC pass: 1 set(s) sealed by lists.test (trusted: lists.test)" in text
    assert "The relay would accept this message." in text


def test_no_client_ip_and_bad_input(
    tmp_path: Path, lab: LabDnsServer, keys: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    eml = tmp_path / "lf.eml"
    eml.write_bytes(_signed(keys).replace(b"\r\n", b"\n"))  # LF-only files are accepted
    cfg = _config(tmp_path, lab, [])
    out = _run(capsys, str(eml), "--config", str(cfg))
    assert out["spf"]["result"] == "none" and "no client IP" in out["spf"]["explanation"]
    assert out["dkim"][0]["result"] == "pass" and out["dmarc"]["result"] == "pass"
    assert main(["diagnose", str(tmp_path / "missing.eml"), "--config", str(cfg)]) == 2
    assert main(["diagnose", str(eml), "--config", str(cfg), "--client-ip", "nope"]) == 2
    assert main(["diagnose", str(eml), "--config", str(tmp_path / "none.toml")]) == 2
