"""The lab's DANE and REQUIRETLS cells (relay/lab/dane.py) on real unbound and the full
relay: every cell as its RFC requires, `policy` in the JSON, the MTA-STS policy fetched
from the policy host, the REQUIRETLS refusals read from the relay's DSNs, and a named skip
when unbound is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.lab import dane
from relay.lab.unbound import ValidatingResolver


async def test_every_dane_and_requiretls_cell_matches_its_rfc() -> None:
    cells, skipped = await dane.run_dane_lab()
    assert skipped == []
    assert {c.scenario.name for c in cells} == dane.DANE_NAMES
    assert [c.scenario.name for c in cells if not c.ok] == [], [c.problems for c in cells]
    by = {c.scenario.name: c.to_dict() for c in cells}
    assert by["dane-ee-match"]["policy"] == "dane" and by["dane-ee-match"]["delivered"]
    assert by["dane-insecure-zone"]["policy"] == "none"
    assert by["dane-and-mta-sts"]["policy"] == "dane"
    assert by["requiretls-tls-required-no"]["reply"].startswith("550 5.7.30")
    assert all(d["rfc"].startswith("RFC ") for d in by.values())
    assert not by["dane-bogus-tlsa"]["delivered"]
    assert by["dane-bogus-tlsa"]["tlsrpt_results"] == ["dnssec-invalid"]
    # the relay's outbound session of each cell is recorded
    assert "C: STARTTLS" in by["dane-ee-match"]["transcript"]
    hop = by["requiretls-hop-without"]["transcript"]
    assert "S: 250 HELP" in hop and not any(x.startswith("C: MAIL") for x in hop)
    assert by["requiretls-opportunistic"]["transcript"] == []  # refused before connecting


async def test_dane_and_mta_sts_fetches_the_policy_and_dane_wins(tmp_path: Path) -> None:
    """The "DANE + MTA-STS" cell: the relay fetched the enforce policy (which excludes the
    MX) from the lab policy host, and delivered under DANE (RFC 8461 2; RFC 7672 2.2)."""
    chosen = dane.select(["dane-and-mta-sts"])
    lab = await dane.build_lab(chosen, tmp_path)
    try:
        with ValidatingResolver([lab.signed, lab.insecure]) as unbound:
            (cell,) = await dane.play(chosen, lab, unbound, tmp_path)
    finally:
        await lab.stop()
    assert lab.policy_host is not None
    assert [(x.host, x.path, x.status) for x in lab.policy_host.served] == [
        ("mta-sts.dane-and-mta-sts.dane.lab.test", "/.well-known/mta-sts.txt", 200)
    ]
    assert cell.ok and cell.delivered and cell.policy == "dane", cell.problems


async def test_cells_are_skipped_by_name_without_unbound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dane, "missing", lambda: "unbound")
    cells, skipped = await dane.run_dane_lab(dane.select(["dane-ee-match"]))
    assert cells == []
    assert skipped == ["dane-ee-match: unbound is not installed (apt-get install unbound)"]
