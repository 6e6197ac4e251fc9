"""`relay diagnose` shows RFC 9989 DMARC: the tree walk, t=y testing and the ignored
pct/rf/ri tags, in --json (the keys issue 13 adds under "dmarc") and in the text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cli import main
from relay.lab.dnsserver import LabDnsServer, Zone

MESSAGE = (
    b"From: Ann <ann@news.example.com>\r\nTo: b@x.test\r\nSubject: s\r\n"
    b"Message-ID: <1@example.com>\r\n\r\nbody\r\n"
)


@pytest.fixture(scope="module")
def lab() -> Iterator[LabDnsServer]:
    zone = Zone()
    zone.add("example.com", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    zone.add("news.example.com", "A", "192.0.2.1")
    zone.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; t=y; pct=50; ri=3600; rf=afrf")
    with LabDnsServer(zone) as server:
        yield server


def _args(tmp: Path, lab: LabDnsServer) -> list[str]:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f'[server]\nhostname = "relay.lab.test"\n[dns]\nnameservers = ["{lab.address}"]\n'
    )
    eml = tmp / "m.eml"
    eml.write_bytes(MESSAGE)
    return ["diagnose", str(eml), "--config", str(cfg), "--client-ip", "198.51.100.9",
            "--mail-from", "ann@news.example.com"]  # fmt: skip


def test_json_has_walk_testing_and_ignored_tags(
    tmp_path: Path, lab: LabDnsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*_args(tmp_path, lab), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["dmarc"]
    assert (d["result"], d["policy"]) == ("fail", "quarantine")  # t=y: reject lowered
    assert d["testing"] is True and d["discovery"] == "treewalk"
    assert (d["policy_domain"], d["org_domain"]) == ("example.com", "example.com")
    assert d["walk"] == ["_dmarc.news.example.com", "_dmarc.example.com", "_dmarc.com"]
    assert d["ignored_tags"] == ["pct=50", "ri=3600", "rf=afrf"]


def test_text_says_testing_and_ignored(
    tmp_path: Path, lab: LabDnsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args(tmp_path, lab)) == 0
    out = capsys.readouterr().out
    assert "t=y (testing), so quarantine" in out
    assert "ignored: pct=50, ri=3600, rf=afrf (RFC 9989 removed pct, rf and ri)" in out
    assert "discovery by DNS tree walk (RFC 9989): asked _dmarc.news.example.com" in out
    assert "remove t=y once legitimate mail passes" in out
