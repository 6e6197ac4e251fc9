"""The lab's DANE and REQUIRETLS cells (relay/lab/dane.py) on real unbound: every cell as
its RFC requires, `policy` in the JSON, and a named skip when unbound is missing."""

from __future__ import annotations

import pytest

from relay.lab import dane


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


async def test_cells_are_skipped_by_name_without_unbound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dane, "missing", lambda: "unbound")
    cells, skipped = await dane.run_dane_lab(dane.select(["dane-ee-match"]))
    assert cells == []
    assert skipped == ["dane-ee-match: unbound is not installed (apt-get install unbound)"]
