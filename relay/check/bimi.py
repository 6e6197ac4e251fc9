"""BIMI checks (``default._bimi``): record syntax, l= https, a= present, and DMARC at
enforcement (quarantine or reject, not t=y) as BIMI requires."""

from __future__ import annotations

from relay.auth.dmarc_record import DmarcRecord
from relay.check import ERROR, OK, WARN, Finding


def check_bimi(domain: str, records: list[str] | None, dmarc: DmarcRecord | None) -> list[Finding]:
    a = "BIMI"
    txts = [t for t in records or [] if t.replace(" ", "").lower().startswith("v=bimi1")]
    if not txts:
        return [Finding(a, "bimi.missing", OK, "no BIMI record (optional)", "")]
    tags = {}
    for part in txts[0].split(";"):
        k, _, v = part.partition("=")
        tags[k.strip().lower()] = v.strip()
    out: list[Finding] = []
    logo = tags.get("l", "")
    if logo and not logo.lower().startswith("https://"):
        out.append(
            Finding(
                a,
                "bimi.logo_not_https",
                ERROR,
                f"l={logo}",
                "serve the logo over https as SVG Tiny PS",
            )
        )
    if not tags.get("a"):
        out.append(
            Finding(
                a,
                "bimi.no_authority",
                WARN,
                "no a= (mark certificate)",
                "most mailbox providers show logos only with a VMC or CMC",
            )
        )
    if dmarc is None or dmarc.p == "none" or dmarc.t:
        out.append(
            Finding(
                a,
                "bimi.dmarc_not_enforced",
                ERROR,
                "DMARC is not at enforcement",
                "BIMI needs p=quarantine or p=reject without t=y",
            )
        )
    if not out:
        out.append(Finding(a, "bimi.ok", OK, f"BIMI logo {logo}"))
    return out
