"""``relay lab run --html FILE``: the lab matrix as one self-contained HTML page (no
external resource, no script): a row per scenario, a column per mode, each cell green
(as the RFCs require) or red, with the expectation, what happened and the RFC section;
the cell's TLS-RPT report (RFC 8460), the relay's outbound SMTP transcript (C: what the
relay sent, S: what it read, *: connection and TLS events) and delivery details one
click away (<details>).
"""

from __future__ import annotations

import html
import json
from typing import Any

from relay.lab.runner import LabRun

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111}
h1{font-size:1.4em} table{border-collapse:collapse;margin-bottom:2em}
th,td{border:1px solid #999;padding:.35em .5em;vertical-align:top;text-align:left}
th{background:#eee} td.ok{background:#d8f5d8} td.bad{background:#f8d0d0}
td.none{background:#f4f4f4;color:#777} .what{font-weight:600}
.exp,.rfc{font-size:.85em;color:#333} details{font-size:.8em;margin-top:.3em}
pre{white-space:pre-wrap;max-width:42em;background:#fafafa;border:1px solid #ddd;padding:.4em}
"""


def _cell_html(c: dict[str, Any], report: dict[str, Any] | None) -> str:
    cls = "ok" if c["matches_rfc"] else "bad"
    e = c["expected"]
    if c["delivered"]:
        what = ("TLS " + (c.get("tls_version") or "")) if c["transport"] == "tls" else "CLEAR"
        what = ("to the ATTACKER, " if c.get("attacker") else "") + "delivered " + what
    else:
        what = "held: " + (c.get("reply") or "")[:60]
    exp = "delivered" if e["delivered"] else "held"
    if e["delivered"] and e.get("transport"):
        exp += f" over {e['transport']}"
    rfc = c.get("rfc") or ("RFC 8461/8460" if c["mode"] != "dane" else "")
    detail = {
        "policy": c.get("policy"),
        "domain": c["domain"],
        "reply": c.get("reply"),
        "tlsrpt_results": c["tlsrpt_results"],
        "expected": e,
        "problems": c["problems"],
    }
    parts = [
        f'<td class="{cls}" id="{html.escape(c["scenario"] + "." + c["mode"])}">',
        f'<div class="what">{html.escape(what)} {"ok" if cls == "ok" else "MISMATCH"}</div>',
        f'<div class="exp">expected: {html.escape(exp)}; TLS-RPT '
        f"{html.escape(', '.join(e['tlsrpt_results']) or '-')}</div>",
        f'<div class="rfc">{html.escape(rfc)} — policy {html.escape(str(c.get("policy")))}</div>',
        "<details><summary>delivery</summary><pre>"
        + html.escape(json.dumps(detail, indent=2))
        + "</pre></details>",
    ]
    rep = report if report is not None else {"outcomes": c.get("tlsrpt_outcomes", [])}
    parts.append(
        "<details><summary>TLS-RPT</summary><pre>"
        + html.escape(json.dumps(rep, indent=2))
        + "</pre></details>"
    )
    lines = c.get("transcript") or ["(no outbound SMTP session)"]
    parts.append(
        '<details class="transcript"><summary>SMTP transcript</summary><pre>'
        + html.escape("\n".join(lines))
        + "</pre></details></td>"
    )
    return "".join(parts)


def render(run: LabRun) -> str:
    d = run.to_dict()
    reports = {r.policy_domain: r.to_dict() for r in run.reports}
    modes = list(dict.fromkeys(c["mode"] for c in d["cells"]))
    scenarios = list(dict.fromkeys(c["scenario"] for c in d["cells"]))
    by = {(c["scenario"], c["mode"]): c for c in d["cells"]}
    ok = sum(1 for c in d["cells"] if c["matches_rfc"])
    rows = []
    for s in scenarios:
        cells = []
        for m in modes:
            c = by.get((s, m))
            cells.append(
                _cell_html(c, reports.get(c["domain"])) if c else '<td class="none">-</td>'
            )
        rows.append(f"<tr><th>{html.escape(s)}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(m)}</th>" for m in modes)
    skipped = "".join(f"<li>{html.escape(x)}</li>" for x in d["skipped"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>relay downgrade lab</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>relay downgrade lab: MTA-STS, DANE, REQUIRETLS</h1>"
        f"<p>{ok}/{len(d['cells'])} cells as RFC 8461, 8460, 7672 and 8689 require "
        f"({d['seconds']} s). Green: as required; red: a mismatch. Each cell: what "
        "happened, the expectation, the RFC section; delivery details and the TLS-RPT "
        "report and the SMTP transcript one click away.</p>"
        f'<table id="matrix"><tr><th>scenario</th>{head}</tr>{"".join(rows)}</table>'
        + (f"<h2>Skipped</h2><ul>{skipped}</ul>" if skipped else "")
        + "</body></html>\n"
    )
