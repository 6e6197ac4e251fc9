"""``relay diagnose FILE.eml``: why a message passes or fails SPF, DKIM, DMARC and ARC.

Runs the relay's own Authenticator (relay.auth.pipeline) over the configured resolver, as
if the message had arrived from ``--client-ip`` with ``--helo`` and ``--mail-from``
(default: the file's Return-Path), and prints each check's result in plain words with
advice (relay.auth.explain). ``--json`` prints the contract of docs/design.md:
``{"spf": {"result", "domain", "explanation"}, "dkim": [{"result", "domain", "selector",
"reason"}], "dmarc": {"result", "policy", "header_from", "aligned_spf", "aligned_dkim",
"reason"}, "arc": {"cv", "instances"}, "advice": [str]}``. ``[auth] enabled = false``
does not stop a diagnosis.

``--queue-id ID`` diagnoses a queued message instead of a file, with the envelope stored
with it (client IP, HELO, MAIL FROM as the client gave them); the flags still override.
When the message's newest ARC set is the relay's own seal ([arc] domain and selector), it
is set aside: the chain below it is evaluated as the relay received it, and the report
says whether the seal's key is published in DNS (``own_seal`` in JSON) rather than
calling an unpublished key an ARC failure.

Exit codes, for scripts: 0 the relay would accept the message, 1 it would refuse or
quarantine it, 2 it could not be evaluated (unreadable file, unknown queue id, a bad
flag, a config error, or DNS that could not answer for DMARC).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.auth.arc import ArcSet, arc_structure
from relay.auth.explain import Facts, advice, arc_line, dkim_line, dmarc_lines, spf_line
from relay.auth.keys import signature_tags
from relay.auth.pipeline import Authenticator, Verdict
from relay.auth.results import header_fields, split_header
from relay.auth.types import DmarcResultCode, SpfResult, SpfResultCode
from relay.config import ArcConfig, Config, load_config
from relay.dns import DnspythonResolver, Resolver
from relay.errors import DnsNoData, DnsNotFound, RelayError
from relay.model import ConnInfo, Envelope

EXIT_ACCEPT, EXIT_REFUSE, EXIT_UNKNOWN = 0, 1, 2


@dataclass(frozen=True, slots=True)
class OwnSeal:
    """The relay's own ARC set on the message, and whether its key is in DNS."""

    instance: int
    domain: str
    selector: str
    key_in_dns: bool | None  # None: DNS did not answer

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def own_arc_set(message: bytes, arc: ArcConfig) -> ArcSet | None:
    """The newest ARC set when the relay sealed it (its d= and s= are ours), else None."""
    if not arc.domain or not arc.selector:
        return None
    sets = arc_structure(message).sets
    if not sets:
        return None
    top = sets[-1]
    tags = signature_tags(top.seal)
    d = tags.get(b"d", b"").decode("ascii", "replace").lower().rstrip(".")
    sel = tags.get(b"s", b"").decode("ascii", "replace").lower()
    if d == arc.domain.lower().rstrip(".") and sel == arc.selector.lower():
        return top
    return None


def without_arc_set(message: bytes, instance: int) -> bytes:
    """message without the three ARC fields of one instance; other fields byte for byte."""
    fields, rest = split_header(message)
    names = ("arc-seal", "arc-message-signature", "arc-authentication-results")
    kept = []
    for f in fields:
        if f.name.lower() in names and _instance_of(f.name.lower(), f.value) == instance:
            continue
        kept.append(f.raw)
    return b"".join(kept) + rest


def _instance_of(name: str, value: str) -> int | None:
    if name == "arc-authentication-results":
        head = value.split(";", 1)[0].strip().replace(" ", "")
        raw = head[2:] if head.startswith("i=") else ""
    else:
        raw = signature_tags(value.encode("utf-8", "replace")).get(b"i", b"").decode()
    return int(raw) if raw.strip().isdigit() else None


async def key_published(resolver: Resolver, name: str) -> bool | None:
    """True when a DKIM key record is at name, False when none is, None when DNS failed."""
    try:
        records = await resolver.txt(name)
    except (DnsNotFound, DnsNoData):
        return False
    except Exception:  # noqa: BLE001 - a timeout or SERVFAIL: not known
        return None
    return any("p=" in r.replace(" ", "") for r in records)


def _return_path(message: bytes) -> str:
    for name, value in header_fields(message):
        if name.lower() == "return-path":
            return value.strip().strip("<>").strip()
    return ""


async def diagnose_all(
    config: Config, message: bytes, client_ip: str, helo: str, mail_from: str
) -> tuple[Verdict, OwnSeal | None]:
    """The verdict on the message as the relay received it (its own seal set aside) and
    what there is to say about that seal."""
    resolver = DnspythonResolver.from_config(config.dns)
    own = None
    mine = own_arc_set(message, config.arc)
    if mine is not None:
        message = without_arc_set(message, mine.instance)
        own = OwnSeal(mine.instance, config.arc.domain.lower(), config.arc.selector, None)
        own = dataclasses.replace(own, key_in_dns=await key_published(resolver, own.key_name))
    verdict = await diagnose(config, message, client_ip, helo, mail_from, resolver)
    return verdict, own


def exit_code(verdict: Verdict) -> int:
    """0 accept, 1 refuse or quarantine, 2 could not be decided (DMARC temperror)."""
    d = verdict.results.dmarc
    if d is not None and d.result is DmarcResultCode.TEMPERROR and verdict.action == "accept":
        return EXIT_UNKNOWN
    return EXIT_ACCEPT if verdict.action == "accept" else EXIT_REFUSE


def own_seal_line(own: OwnSeal) -> str:
    head = (
        f"ARC i={own.instance} is this relay's own seal (d={own.domain} s={own.selector}); "
        "it was set aside and the message evaluated as the relay received it"
    )
    if own.key_in_dns:
        return head + f"; its key is published at {own.key_name}."
    if own.key_in_dns is None:
        return head + f"; whether its key is at {own.key_name} could not be checked (DNS)."
    return (
        head + f". Its key is not in DNS at {own.key_name}: receivers cannot verify the seal "
        "until the TXT record `relay keygen` printed is published (this is not an ARC failure)."
    )


async def diagnose(
    config: Config,
    message: bytes,
    client_ip: str,
    helo: str,
    mail_from: str,
    resolver: Resolver | None = None,
) -> Verdict:
    if resolver is None:
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


def to_json(verdict: Verdict, facts: Facts, own: OwnSeal | None = None) -> dict[str, Any]:
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
        "verdict": {
            "action": verdict.action,
            "reply": verdict.reply or "",
            "reason": verdict.reason,
        },
        "own_seal": None
        if own is None
        else {
            "instance": own.instance,
            "domain": own.domain,
            "selector": own.selector,
            "key_in_dns": own.key_in_dns,
        },
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


def to_text(verdict: Verdict, facts: Facts, own: OwnSeal | None = None) -> str:
    r = verdict.results
    lines = [spf_line(r.spf, facts)]
    if r.dkim:
        lines.extend(dkim_line(s) for s in r.dkim)
    else:
        lines.append("DKIM none: the message carries no DKIM signature")
    lines.extend(dmarc_lines(verdict.dmarc))
    lines.append(arc_line(r.arc, facts))
    if own is not None:
        lines.append(own_seal_line(own))
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


def _fail(text: str) -> int:
    print(f"relay diagnose: {text}", file=sys.stderr)
    return EXIT_UNKNOWN


def _queued(config: Config, qid: str) -> tuple[bytes, str, str, str] | None:
    """(message, client IP, HELO, MAIL FROM) of a queued message, or None."""
    from relay.commands.queue import open_queue

    async def load() -> tuple[Any, bytes] | None:
        async with open_queue(config) as spool:
            return await spool.load(qid)

    loaded = asyncio.run(load())
    if loaded is None:
        return None
    msg, data = loaded
    mail_from = msg.env_from if msg.env_from is not None else msg.mail_from
    return data, msg.client_ip, msg.helo, mail_from


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if (args.file is None) == (args.queue_id is None):
        return _fail("give a message file or --queue-id ID (one of them)")
    client_ip, helo, mail_from = args.client_ip, args.helo, args.mail_from
    if args.queue_id is not None:
        try:
            queued = _queued(config, args.queue_id)
        except RelayError as exc:
            return _fail(str(exc))
        if queued is None:
            return _fail(f"no message {args.queue_id} in the queue")
        message, q_ip, q_helo, q_from = queued
        client_ip = client_ip if client_ip is not None else q_ip
        helo = helo if helo is not None else q_helo
        mail_from = mail_from if mail_from is not None else q_from
    else:
        try:
            message = Path(args.file).read_bytes()
        except OSError as exc:
            return _fail(f"cannot read {args.file}: {exc.strerror}")
    if b"\r\n" not in message:
        message = message.replace(b"\n", b"\r\n")
    client_ip = client_ip or ""
    helo = helo or ""
    if client_ip:
        try:
            ipaddress.ip_address(client_ip)
        except ValueError:
            return _fail(f"--client-ip {client_ip!r} is not an IP address")
    if mail_from is None:
        mail_from = _return_path(message)
    verdict, own = asyncio.run(diagnose_all(config, message, client_ip, helo, mail_from))
    facts = Facts(
        client_ip=client_ip,
        trusted_sealers=config.arc.trusted_sealers,
        spf_evaluated=bool(client_ip),
    )
    if args.json:
        print(json.dumps(to_json(verdict, facts, own), indent=2))
    else:
        print(to_text(verdict, facts, own))
    return exit_code(verdict)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "diagnose", help="explain why a message passes or fails SPF, DKIM, DMARC and ARC"
    )
    p.add_argument("file", metavar="FILE.eml", nargs="?", help="the message, as received")
    p.add_argument("--queue-id", default=None, help="a queued message, with its stored envelope")
    p.add_argument("--config", required=True, help="config.toml (for [dns], [arc], [auth])")
    p.add_argument("--client-ip", default=None, help="IP address the message came from (SPF)")
    p.add_argument("--helo", default=None, help="HELO/EHLO name the client gave")
    p.add_argument(
        "--mail-from", default=None, help="envelope sender (default: the Return-Path header)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
