"""``relay diagnose FILE.eml``: why a message passes or fails SPF, DKIM, DMARC and ARC.

Runs the relay's own Authenticator (relay.auth.pipeline) over the configured resolver, as
if the message had arrived from ``--client-ip`` with ``--helo`` and ``--mail-from``
(default: the file's Return-Path), and prints each check's result in plain words with
advice (relay.auth.explain). ``--json`` prints the contract of docs/design.md:
``{"spf": {"result", "domain", "explanation"}, "dkim": [{"result", "domain", "selector",
"reason"}], "dmarc": {"result", "policy", "header_from", "aligned_spf", "aligned_dkim",
"reason"}, "arc": {"cv", "instances"}, "advice": [str]}``. ``[auth] enabled = false``
does not stop a diagnosis.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

from relay.auth.explain import Facts, advice, arc_line, dkim_line, dmarc_lines, spf_line
from relay.auth.pipeline import Authenticator, Verdict
from relay.auth.results import header_fields
from relay.auth.types import SpfResult, SpfResultCode
from relay.config import Config, load_config
from relay.dns import DnspythonResolver
from relay.model import ConnInfo, Envelope


def _return_path(message: bytes) -> str:
    for name, value in header_fields(message):
        if name.lower() == "return-path":
            return value.strip().strip("<>").strip()
    return ""


async def diagnose(
    config: Config, message: bytes, client_ip: str, helo: str, mail_from: str
) -> Verdict:
    resolver = DnspythonResolver.from_config(config.dns)
    config = dataclasses.replace(config, auth=dataclasses.replace(config.auth, enabled=True))
    spf_check = None
    if not client_ip:

        async def no_spf(ip: str, mf: str, h: str) -> SpfResult:
            domain = mf.rpartition("@")[2] if mf else h
            identity = "mailfrom" if mf else "helo"
            return SpfResult(SpfResultCode.NONE, domain, identity, "not evaluated: no client IP")

        spf_check = no_spf
    auth = Authenticator(config, resolver, spf_check=spf_check)
    conn = ConnInfo(peer_ip=client_ip or "0.0.0.0", peer_port=0, helo=helo)
    env = Envelope(mail_from=mail_from, rcpt_tos=())
    return await auth.evaluate(conn, env, message)


def to_json(verdict: Verdict, facts: Facts) -> dict[str, Any]:
    r = verdict.results
    spf = r.spf
    d = r.dmarc
    return {
        "spf": {
            "result": str(spf.result) if spf else "none",
            "domain": spf.domain if spf else "",
            "explanation": spf.explanation if spf else "",
        },
        "dkim": [
            {"result": s.result, "domain": s.domain, "selector": s.selector, "reason": s.reason}
            for s in r.dkim
        ],
        "dmarc": {
            "result": str(d.result) if d else "none",
            "policy": d.policy if d else "none",
            "header_from": d.header_from if d else "",
            "aligned_spf": d.aligned_spf if d else False,
            "aligned_dkim": d.aligned_dkim if d else False,
            "reason": d.reason if d else "",
            **dmarc_discovery_json(verdict),
        },
        "arc": {
            "cv": str(r.arc.cv) if r.arc else "none",
            "instances": r.arc.instances if r.arc else 0,
        },
        "advice": advice(r, verdict.dmarc, facts),
    }


def dmarc_discovery_json(verdict: Verdict) -> dict[str, Any]:
    """The keys issue 13 adds under "dmarc": how the policy was found (RFC 9989 4.10)."""
    ev = verdict.dmarc
    rec = ev.record if ev is not None else None
    return {
        "org_domain": ev.org_domain if ev is not None else "",
        "policy_domain": ev.record_domain if ev is not None else "",
        "walk": list(ev.walk) if ev is not None else [],
        "testing": ev.testing if ev is not None else False,
        "discovery": ev.discovery if ev is not None else "",
        "ignored_tags": list(rec.removed) if rec is not None else [],
    }


def to_text(verdict: Verdict, facts: Facts) -> str:
    r = verdict.results
    lines = [spf_line(r.spf, facts)]
    if r.dkim:
        lines.extend(dkim_line(s) for s in r.dkim)
    else:
        lines.append("DKIM none: the message carries no DKIM signature")
    lines.extend(dmarc_lines(verdict.dmarc))
    lines.append(arc_line(r.arc, facts))
    what = {"accept": "accept", "quarantine": "accept, marked for quarantine", "reject": "refuse"}
    verdict_line = f"The relay would {what[verdict.action]} this message"
    if verdict.reply:
        verdict_line += f" ({verdict.reply})"
    elif verdict.reason:
        verdict_line += f" ({verdict.reason})"
    lines.append(verdict_line + ".")
    tips = advice(r, verdict.dmarc, facts)
    if tips:
        lines.append("What can be done:")
        lines.extend(f"  - {t}" for t in tips)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        message = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"relay diagnose: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    if b"\r\n" not in message:
        message = message.replace(b"\n", b"\r\n")
    if args.client_ip:
        try:
            ipaddress.ip_address(args.client_ip)
        except ValueError:
            print(
                f"relay diagnose: --client-ip {args.client_ip!r} is not an IP address",
                file=sys.stderr,
            )
            return 2
    mail_from = args.mail_from if args.mail_from is not None else _return_path(message)
    verdict = asyncio.run(diagnose(config, message, args.client_ip, args.helo, mail_from))
    facts = Facts(
        client_ip=args.client_ip,
        trusted_sealers=config.arc.trusted_sealers,
        spf_evaluated=bool(args.client_ip),
    )
    if args.json:
        print(json.dumps(to_json(verdict, facts), indent=2))
    else:
        print(to_text(verdict, facts))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "diagnose", help="explain why a message passes or fails SPF, DKIM, DMARC and ARC"
    )
    p.add_argument("file", metavar="FILE.eml", help="the message, as received")
    p.add_argument("--config", required=True, help="config.toml (for [dns], [arc], [auth])")
    p.add_argument("--client-ip", default="", help="IP address the message came from (SPF)")
    p.add_argument("--helo", default="", help="HELO/EHLO name the client gave")
    p.add_argument(
        "--mail-from", default=None, help="envelope sender (default: the Return-Path header)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
