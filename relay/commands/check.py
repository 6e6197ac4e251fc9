"""``relay check DOMAIN [--json] [--selector S ...] [--no-probe]``: what a receiver and a
sender's relay will meet at DOMAIN (relay.check), with one line of advice per finding.

Exit 0: no errors; 1: errors found; 2: could not check (DNS down) or bad input. ``--json``
prints ``{"domain", "checks": [{"area", "id", "severity", "message", "advice"}],
"summary": {"ok", "warn", "error"}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import re
import sys
from typing import Any

from relay.check import ERROR, OK, WARN, Finding
from relay.check.fetch import CannotCheck, run_checks
from relay.config import Config, load_config
from relay.dns import DnspythonResolver
from relay.http import SafeHttpClient, make_ssl_context

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MARK = {OK: "✔", WARN: "⚠", ERROR: "✘"}
_COLOUR = {OK: "\033[32m", WARN: "\033[33m", ERROR: "\033[31m"}


def domain_problem(text: str) -> str:
    """Why text is not a domain to check, or ""."""
    try:
        ipaddress.ip_address(text.strip("[]"))
        return f"{text} is an IP address, not a domain"
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return f"{text!r} is not a domain name"
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253 or not all(_LABEL.match(x) for x in labels):
        return f"{text!r} is not a domain name"
    return ""


def summary(findings: list[Finding]) -> dict[str, int]:
    return {s: sum(1 for f in findings if f.severity == s) for s in (OK, WARN, ERROR)}


def to_json(domain: str, findings: list[Finding]) -> dict[str, Any]:
    return {
        "domain": domain,
        "checks": [f.as_json() for f in findings],
        "summary": summary(findings),
    }


def to_text(domain: str, findings: list[Finding], colour: bool) -> str:
    lines = [f"relay check {domain}"]
    area = ""
    for f in findings:
        if f.area != area:
            area = f.area
            lines.append(f"\n{area}")
        mark = _MARK[f.severity]
        if colour:
            mark = f"{_COLOUR[f.severity]}{mark}\033[0m"
        lines.append(f"  {mark} [{f.id}] {f.message}")
        if f.advice and f.severity != OK:
            lines.append(f"      → {f.advice}")
    s = summary(findings)
    lines.append(f"\n{s[OK]} ok, {s[WARN]} warnings, {s[ERROR]} errors")
    return "\n".join(lines)


async def check(config: Config, domain: str, selectors: list[str], probe: bool) -> list[Finding]:
    resolver = DnspythonResolver.from_config(config.dns)  # DNSSEC status for DANE
    http = SafeHttpClient.from_config(config, resolver, timeout=config.mta_sts.fetch_timeout)
    return await run_checks(
        resolver,
        domain,
        selectors=selectors,
        http=http,
        https_port=config.mta_sts.https_port,
        probe=probe,
        smtp_port=config.delivery.port,
        ctx=make_ssl_context(config.delivery.ca_file),
    )


def run(args: argparse.Namespace) -> int:
    problem = domain_problem(args.domain)
    if problem:
        print(f"relay check: {problem}", file=sys.stderr)
        return 2
    domain = args.domain.lower().rstrip(".").encode("idna").decode("ascii")
    config = load_config(args.config)
    try:
        findings = asyncio.run(check(config, domain, args.selector, not args.no_probe))
    except CannotCheck as exc:
        print(f"relay check: could not check {domain}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(domain, findings), indent=2, ensure_ascii=False))
    else:
        print(to_text(domain, findings, sys.stdout.isatty()))
    return 1 if any(f.severity == ERROR for f in findings) else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("check", help="check a domain's mail records and MX hosts")
    p.add_argument("domain")
    p.add_argument("--config", required=True, help="config.toml (for [dns], [delivery] port)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--selector", action="append", default=[], help="DKIM selector (repeat)")
    p.add_argument("--no-probe", action="store_true", help="do not connect to the MX hosts")
    p.set_defaults(func=run)
