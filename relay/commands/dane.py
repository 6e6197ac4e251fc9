"""`relay dane check DOMAIN`: DANE for SMTP (RFC 7672) from the shell.

Looks up the domain's MX hosts through the configured (validating) resolver, with the
DNSSEC status of each step: the MX RRset, each host's addresses, its TLSA RRset at
``_25._tcp.<host>`` (the secure CNAME target first, RFC 7671 section 7) and the
usability of each record (RFC 7672 section 3.1); then a live STARTTLS probe of each MX
host (its first address, ``[delivery] port``) and whether its certificate chain matches
a usable TLSA record, as delivery would check it.

Exit codes: 0 DANE applies (some MX host has usable TLSA records) and every such host
matched; 1 no DANE (the MX RRset or the hosts are not DNSSEC-secure, or no TLSA
records); 2 a failure (DNS error, a bogus answer, a DANE host without STARTTLS or whose
certificate matches no record). ``--json`` prints one object: ``{"domain",
"mx_secure", "hosts": [{"host", "address_secure", "tlsa": [{"usage", "selector",
"mtype", "data", "usable"}], "probe": {"starttls", "matched", "error"}}], "verdict"}``
(``matched`` is null for a host without usable records); the verdict is ``dane``,
``no-dane``, ``dane-failure`` or ``dns-error``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from relay import logs
from relay.config import Config, load_config
from relay.dane.lookup import DaneHost, mx_status, route_dane
from relay.dane.policy import DaneState, Lookup
from relay.dane.tlsa import match_chain, usable
from relay.delivery.client import SessionError, SmtpSession, StartTlsMissing
from relay.delivery.route import resolve_route
from relay.delivery.tls import dane_context
from relay.dns import DnspythonResolver

EXIT_DANE, EXIT_NONE, EXIT_FAIL = 0, 1, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dane", help="DANE (RFC 7672): check a domain's TLSA records")
    ds = p.add_subparsers(dest="dane_command", required=True)
    chk = ds.add_parser("check", help="DNSSEC status, TLSA records and a STARTTLS probe")
    chk.add_argument("domain")
    chk.add_argument("--config", required=True)
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(func=run_check)


async def _probe(config: Config, dane: DaneHost, ip: str) -> dict[str, Any]:
    d = config.delivery
    try:
        session = await SmtpSession.open(
            mx_host=dane.host,
            ip=ip,
            port=d.port,
            helo=config.server.hostname,
            tls_context=dane_context(),
            require_tls=True,
            connect_timeout=d.connect_timeout,
            command_timeout=min(d.attempt_timeout, 30.0),
        )
    except StartTlsMissing as exc:
        return {"starttls": False, "matched": None, "error": exc.detail}
    except SessionError as exc:
        return {"starttls": None, "matched": None, "error": exc.detail}
    try:
        chain = session.tls.peer_chain if session.tls is not None else ()
        records = [r for r in dane.records if usable(r)]
        if not records:
            return {"starttls": True, "matched": None, "error": None}
        m = match_chain(records, chain, dane.names)
        return {"starttls": True, "matched": m.matched, "error": m.reason or None}
    finally:
        await session.quit()


async def check(config: Config, domain: str) -> tuple[dict[str, Any], int]:
    resolver = DnspythonResolver.from_config(config.dns)
    domain = domain.rstrip(".").lower()
    route, mx = await asyncio.gather(
        resolve_route(
            resolver,
            domain,
            port=config.delivery.port,
            max_mx=config.delivery.max_mx,
            allow_loopback=config.delivery.port != 25,
        ),
        mx_status(resolver, domain),
    )
    out: dict[str, Any] = {
        "domain": domain,
        "mx_secure": mx is Lookup.SECURE,
        "hosts": [],
        "verdict": "no-dane",
    }
    if route.failure is not None:
        out["verdict"] = "dns-error" if mx is not Lookup.SECURE else "dane-failure"
        out["error"] = route.failure.reply
        return out, EXIT_FAIL if not route.failure.permanent or mx is Lookup.BOGUS else EXIT_NONE
    danes = await route_dane(resolver, domain, route.hosts)
    applies = failed = False
    for host in route.hosts:
        dh = danes.get(host.name)
        if dh is None:
            continue
        probe = await _probe(config, dh, host.addresses[0]) if host.addresses else None
        if dh.state is DaneState.DEFER:
            failed = True
        if dh.state in (DaneState.DANE, DaneState.ENCRYPT):
            applies = True
            if probe is None or probe["starttls"] is not True:
                failed = True
            elif dh.state is DaneState.DANE and not probe["matched"]:
                failed = True
        out["hosts"].append(
            {
                "host": host.name,
                "address_secure": dh.address_status == "secure",
                "tlsa": [
                    {
                        "usage": r.usage,
                        "selector": r.selector,
                        "mtype": r.mtype,
                        "data": r.data.hex(),
                        "usable": usable(r),
                    }
                    for r in dh.records
                ],
                "state": dh.state.value,
                "reason": dh.policy.reason,
                "rfc": dh.policy.rfc,
                "probe": probe or {"starttls": None, "matched": None, "error": "no address"},
            }
        )
    if failed:
        out["verdict"] = "dane-failure"
        return out, EXIT_FAIL
    if applies:
        out["verdict"] = "dane"
        return out, EXIT_DANE
    return out, EXIT_NONE


def run_check(args: argparse.Namespace) -> int:
    logs.setup(level="error", fmt="console", stream=sys.stderr)
    config = load_config(args.config)
    out, code = asyncio.run(check(config, args.domain))
    if args.json:
        print(json.dumps(out, indent=2))
        return code
    print(f"{out['domain']}: MX RRset {'secure' if out['mx_secure'] else 'not secure'}")
    for h in out["hosts"]:
        print(f"  {h['host']}: addresses {'secure' if h['address_secure'] else 'not secure'}")
        for t in h["tlsa"]:
            flag = "usable" if t["usable"] else "unusable"
            print(f"    TLSA {t['usage']} {t['selector']} {t['mtype']} {t['data']} ({flag})")
        p = h["probe"]
        print(
            f"    {h['state']} ({h['rfc']}): STARTTLS {p['starttls']}, matched {p['matched']}"
            + (f", {p['error']}" if p["error"] else "")
        )
    if "error" in out:
        print(f"  error: {out['error']}")
    print(f"verdict: {out['verdict']}")
    return code
