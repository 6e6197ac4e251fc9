"""`relay check DOMAIN`: the records a receiver reads, checked before mail fails.

One module per area, each a small pure function from fetched records to findings
(``Finding``); ``relay.check.fetch`` does the DNS and HTTPS work once. Check ids are
stable (README, "relay check").
"""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, ERROR = "ok", "warn", "error"


@dataclass(frozen=True, slots=True)
class Finding:
    area: str
    id: str
    severity: str  # ok | warn | error
    message: str
    advice: str = ""

    def as_json(self) -> dict[str, str]:
        return {
            "area": self.area,
            "id": self.id,
            "severity": self.severity,
            "message": self.message,
            "advice": self.advice,
        }
