"""DANE: not checked until the DANE work (branch wt-dane) lands."""

from __future__ import annotations

from relay.check import WARN, Finding


def check_dane() -> list[Finding]:
    return [
        Finding(
            "DANE",
            "dane.not_checked",
            WARN,
            "DANE: not checked (not built yet)",
            "check TLSA records with another tool until relay has DANE",
        )
    ]
