"""BIMI checks (``default._bimi``): record syntax, l= https, a= present, DMARC at
enforcement (quarantine or reject, not t=y) as BIMI requires, and the logo itself: an
SVG Tiny PS document (root ``<svg>`` with ``baseProfile="tiny-ps"``), no scripts, no
larger than 32 KiB (the BIMI group's limit)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.auth.dmarc_record import DmarcRecord
from relay.check import ERROR, OK, WARN, Finding

MAX_SVG_BYTES = 32 * 1024
_SVG_ROOT = re.compile(rb"<svg\b[^>]*>", re.I)
_SCRIPT = re.compile(rb"<script\b|\bon[a-z]+\s*=|javascript:", re.I)


@dataclass(frozen=True, slots=True)
class Logo:
    """The l= logo as fetched: its bytes, or why it could not be had."""

    body: bytes = b""
    content_type: str = ""
    error: str = ""


def logo_url(records: list[str] | None) -> str:
    for t in records or []:
        if t.replace(" ", "").lower().startswith("v=bimi1"):
            for part in t.split(";"):
                k, _, v = part.partition("=")
                if k.strip().lower() == "l":
                    return v.strip()
    return ""


def check_logo(url: str, logo: Logo) -> list[Finding]:
    a = "BIMI"
    if logo.error:
        return [
            Finding(
                a,
                "bimi.svg_fetch",
                ERROR,
                f"logo {url}: {logo.error}",
                "serve the logo over https with a valid certificate",
            )
        ]
    out: list[Finding] = []
    if len(logo.body) > MAX_SVG_BYTES:
        out.append(
            Finding(
                a,
                "bimi.svg_too_large",
                WARN,
                f"the logo is {len(logo.body)} bytes",
                "keep the SVG under 32 KiB",
            )
        )
    root = _SVG_ROOT.search(logo.body)
    if root is None or not re.search(rb"baseProfile\s*=\s*[\"']tiny-ps[\"']", root.group(0)):
        out.append(
            Finding(
                a,
                "bimi.svg_not_tiny_ps",
                ERROR,
                'the logo is not SVG Tiny PS (no <svg baseProfile="tiny-ps">)',
                "export the logo as SVG Tiny Portable/Secure",
            )
        )
    if _SCRIPT.search(logo.body):
        out.append(
            Finding(
                a,
                "bimi.svg_script",
                ERROR,
                "the logo contains script",
                "SVG Tiny PS allows no scripts or event handlers; remove them",
            )
        )
    if not out:
        out.append(
            Finding(a, "bimi.svg_ok", OK, f"logo {url}: SVG Tiny PS, {len(logo.body)} bytes")
        )
    return out


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
