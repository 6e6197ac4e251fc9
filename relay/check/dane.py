"""DANE: not checked by `relay check` yet. DANE delivery (wt-dane) landed on main just
before this branch's deadline; wiring its TLSA/DNSSEC lookups in here is left to do."""

from __future__ import annotations

from relay.check import WARN, Finding


def check_dane() -> list[Finding]:
    return [
        Finding(
            "DANE",
            "dane.not_checked",
            WARN,
            "DANE: not checked (relay check does not read TLSA yet)",
            "check TLSA records with another tool until relay has DANE",
        )
    ]
