"""`relay sts check DOMAIN` and `relay sts cache`: MTA-STS (RFC 8461) from the shell.

``check`` does a live discovery, fetch and parse (it neither reads nor writes the cache),
looks up the domain's MX hosts and says which the policy allows. Exit codes: 0 a valid
policy, 1 the domain has no policy, 2 an error (DNS failure, fetch failure, invalid
policy). ``--json`` prints one object: ``{"domain", "txt": {"id"} | null, "policy":
{"mode", "mx", "max_age"} | null, "error": str | null, "mx_hosts": [{"host",
"matches"}], "verdict"}``; ``matches`` is null when there is no valid policy. The verdict
is the policy mode (``enforce``, ``testing``, ``none``), ``no-policy``, or the error kind
(``dns-error``, ``sts-policy-fetch-error``, ``sts-policy-invalid``,
``sts-webpki-invalid``).

``cache`` lists the durable policy cache: ``[{"domain", "id", "mode", "mx",
"fetched_at", "expires_at"}]`` with UTC ISO 8601 times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from relay import logs
from relay.commands import open_store
from relay.config import Config, load_config
from relay.dns import DnspythonResolver, MxRecord
from relay.errors import DnsError, DnsNoData, DnsNotFound, PolicyError
from relay.http import SafeHttpClient
from relay.mtasts.cache import CachedPolicy, open_cache
from relay.mtasts.fetch import (
    Discovery,
    DiscoveryStatus,
    PolicyFetchError,
    discover,
    fetch_policy,
    policy_domain,
    policy_url,
)
from relay.mtasts.policy import StsPolicy, policy_allows

EXIT_POLICY, EXIT_NONE, EXIT_ERROR = 0, 1, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sts", help="MTA-STS: check a domain, list the policy cache")
    ss = p.add_subparsers(dest="sts_command", required=True)
    chk = ss.add_parser("check", help="discover, fetch and parse a domain's MTA-STS policy")
    chk.add_argument("domain")
    chk.add_argument("--config", required=True)
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(func=run_check)
    cache = ss.add_parser("cache", help="list cached MTA-STS policies")
    cache.add_argument("--config", required=True)
    cache.add_argument("--json", action="store_true")
    cache.set_defaults(func=run_cache)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _quiet_logs() -> None:
    logs.setup(level="error", fmt="console", stream=sys.stderr)


# ---------------------------------------------------------------- check


@dataclass(frozen=True, slots=True)
class CheckResult:
    domain: str
    discovery: Discovery | None
    policy: StsPolicy | None
    error: str | None
    verdict: str
    mx: tuple[MxRecord, ...]
    mx_error: str | None
    exit_code: int

    def as_json(self) -> dict[str, Any]:
        record = self.discovery.record if self.discovery else None
        return {
            "domain": self.domain,
            "txt": {"id": record.id} if record else None,
            "policy": (
                {
                    "mode": str(self.policy.mode),
                    "mx": list(self.policy.mx),
                    "max_age": self.policy.max_age,
                }
                if self.policy
                else None
            ),
            "error": self.error,
            "mx_hosts": [
                {
                    "host": m.host,
                    "matches": policy_allows(self.policy, m.host) if self.policy else None,
                }
                for m in self.mx
            ],
            "verdict": self.verdict,
        }


async def check(config: Config, domain: str) -> CheckResult:
    resolver = DnspythonResolver.from_config(config.dns)
    http = SafeHttpClient.from_config(config, resolver)
    try:
        d = policy_domain(domain)
    except PolicyError as exc:
        return CheckResult(domain, None, None, f"not a domain name: {exc}", "error", (), None, 2)
    mx: tuple[MxRecord, ...] = ()
    mx_error: str | None = None
    disc_task = asyncio.ensure_future(discover(resolver, d))
    try:
        mx = tuple(sorted(await resolver.mx(d), key=lambda m: (m.preference, m.host)))
    except (DnsNotFound, DnsNoData) as exc:
        mx_error = f"no MX records ({exc.kind})"
    except DnsError as exc:
        mx_error = str(exc)
    disc = await disc_task
    if disc.status is DiscoveryStatus.ERROR:
        return CheckResult(d, disc, None, disc.reason, "dns-error", mx, mx_error, EXIT_ERROR)
    if disc.status is DiscoveryStatus.NONE:
        return CheckResult(d, disc, None, None, "no-policy", mx, mx_error, EXIT_NONE)
    try:
        policy = await fetch_policy(
            http, d, port=config.mta_sts.https_port, timeout=config.mta_sts.fetch_timeout
        )
    except PolicyFetchError as exc:
        return CheckResult(
            d, disc, None, exc.reason, str(exc.result_type), mx, mx_error, EXIT_ERROR
        )
    return CheckResult(d, disc, policy, None, str(policy.mode), mx, mx_error, EXIT_POLICY)


def _human(r: CheckResult, config: Config) -> str:
    out = [f"domain:    {r.domain}"]
    disc = r.discovery
    if disc is not None:
        if disc.txt:
            for t in disc.txt:
                out.append(f"TXT:       _mta-sts.{r.domain} {json.dumps(t)}")
        else:
            out.append(f"TXT:       _mta-sts.{r.domain}: none")
        if disc.record is not None:
            out.append(f"  id:      {disc.record.id}")
            for k, v in disc.record.extensions:
                out.append(f"  {k}: {v} (ignored)")
        elif disc.reason:
            out.append(f"  ({disc.reason})")
    if r.policy is not None or (disc is not None and disc.record is not None):
        out.append(f"policy:    {policy_url(r.domain)} (port {config.mta_sts.https_port})")
    if r.policy is not None:
        p = r.policy
        out.append(f"  version: {p.version}")
        out.append(f"  mode:    {p.mode}")
        out.append(f"  mx:      {', '.join(p.mx) if p.mx else '(none)'}")
        out.append(f"  max_age: {p.max_age} s ({p.max_age / 86400:.1f} days)")
        for k, v in p.extensions:
            out.append(f"  {k}: {v} (unknown field, ignored)")
    if r.error:
        out.append(f"error:     {r.error}")
    out.append("MX hosts:")
    if r.mx_error:
        out.append(f"  {r.mx_error}")
    for m in r.mx:
        if r.policy is None:
            note = ""
        elif policy_allows(r.policy, m.host):
            note = "  matches the policy"
        else:
            note = "  does NOT match the policy"
        out.append(f"  {m.preference:>5} {m.host or '.'}{note}")
    out.append(f"verdict:   {r.verdict}")
    return "\n".join(out)


def run_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _quiet_logs()
    result = asyncio.run(check(config, args.domain))
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(_human(result, config))
    return result.exit_code


# ---------------------------------------------------------------- cache


def run_cache(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _quiet_logs()

    async def read() -> list[CachedPolicy]:
        async with open_store(config, "mtasts") as store:
            return await open_cache(store).all()

    entries = asyncio.run(read())
    rows = [
        {
            "domain": e.domain,
            "id": e.policy_id,
            "mode": str(e.policy.mode),
            "mx": list(e.policy.mx),
            "fetched_at": _iso(e.fetched_at),
            "expires_at": _iso(e.expires_at),
        }
        for e in entries
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no cached MTA-STS policies")
        return 0
    now = time.time()
    for e, row in zip(entries, rows, strict=True):
        state = "" if e.fresh(now) else "  (expired)"
        print(
            f"{row['domain']}  id={row['id']}  mode={row['mode']}  mx={','.join(row['mx'])}  "
            f"fetched={row['fetched_at']}  expires={row['expires_at']}{state}"
        )
    return 0
