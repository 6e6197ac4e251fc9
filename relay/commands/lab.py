"""``relay lab``: the downgrade lab (RFC 8461, RFC 8460) from the shell.

- ``run [--scenario NAME]... [--json] [--out DIR] [--html FILE]``: build the whole lab
  on loopback in this process (relay.lab.runner), play every scenario under every policy
  mode, then the DANE and REQUIRETLS cells (relay.lab.dane), print the matrix and the
  TLS-RPT reports the relay would send (``--out``: write them, as RFC 8460 gzip
  attachments and readable JSON; ``--html``: the matrix as one page, relay.lab.html).
  Exit 0 when every cell matches what the RFCs require, 1 on any mismatch, 2 on a usage
  error.
- ``list [--json]``: each scenario in a sentence: the attack, what RFC 8461 says a
  sender must do, what a sender without MTA-STS does.
- ``strip --listen HOST:PORT --upstream HOST:PORT``: the STARTTLS-stripping proxy
  (relay.lab.strip), to put between two MTAs of your own.
- ``policy-host --listen HOST:PORT --policy FILE --cert CERT --key KEY [--name NAME]...
  [--mode MODE]``: an HTTPS MTA-STS policy host (relay.lab.policyhost).

``strip`` and ``policy-host`` run until Ctrl-C or SIGTERM; both print one line saying
where they listen once they do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay import logs


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from relay.lab.policyhost import SiteMode

    p = sub.add_parser("lab", help="the downgrade lab: TLS attacks MTA-STS must stop")
    ls = p.add_subparsers(dest="lab_command", required=True)

    run = ls.add_parser("run", help="build the lab on loopback and play the scenario matrix")
    run.add_argument("--scenario", action="append", metavar="NAME", help="only this scenario")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--out", metavar="DIR", help="write the TLS-RPT reports here")
    run.add_argument("--html", metavar="FILE", help="write the matrix as one HTML page")
    run.set_defaults(func=run_lab)

    lst = ls.add_parser("list", help="describe each scenario")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=run_list)

    st = ls.add_parser("strip", help="run the STARTTLS-stripping proxy")
    st.add_argument("--listen", required=True, metavar="HOST:PORT")
    st.add_argument("--upstream", required=True, metavar="HOST:PORT")
    st.set_defaults(func=run_strip)

    ph = ls.add_parser("policy-host", help="run an HTTPS MTA-STS policy host")
    ph.add_argument("--listen", required=True, metavar="HOST:PORT")
    ph.add_argument("--policy", required=True, metavar="FILE", help="the policy text")
    ph.add_argument("--cert", required=True, metavar="CERT", help="PEM certificate chain")
    ph.add_argument("--key", required=True, metavar="KEY", help="PEM private key")
    ph.add_argument(
        "--name", action="append", default=[], metavar="NAME",
        help="serve only this host name (mta-sts.<domain>); repeatable; default: any",
    )  # fmt: skip
    ph.add_argument(
        "--mode", default=SiteMode.NORMAL.value, choices=[m.value for m in SiteMode],
        help="how the policy is served (default normal)",
    )  # fmt: skip
    ph.set_defaults(func=run_policy_host)


def hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SystemExit(f"relay lab: {text!r}: expected HOST:PORT")
    return host, int(port)


# ---------------------------------------------------------------------- run / list


def run_lab(args: argparse.Namespace) -> int:
    import dataclasses

    from relay.lab import dane, runner

    names = args.scenario or []
    dane_names = [n for n in names if n in dane.DANE_NAMES]
    other = [n for n in names if n not in dane.DANE_NAMES]
    try:
        scenarios = runner.select(other) if other or not names else []
    except KeyError as exc:
        print(f"relay lab: unknown scenario: {exc.args[0]} (see relay lab list)", file=sys.stderr)
        return 2
    logs.setup("error", "json", stream=sys.stderr)

    def progress(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    if scenarios:
        result = asyncio.run(runner.run_lab(scenarios, progress=progress))
    else:
        result = runner.LabRun((), (), "", 0.0)
    # the DANE and REQUIRETLS cells (relay.lab.dane): a validating unbound in front of
    # signed lab zones; skipped, naming the package, when unbound is missing
    wanted = dane.select(dane_names) if dane_names or not names else []
    progress(f"DANE/REQUIRETLS cells: {len(wanted)}")
    dane_cells, dane_skipped = asyncio.run(dane.run_dane_lab(wanted))
    result = dataclasses.replace(
        result, dane_cells=tuple(dane_cells), skipped=result.skipped + tuple(dane_skipped)
    )
    written: list[Path] = []
    if args.html:
        from relay.lab.html import render

        Path(args.html).write_text(render(result), encoding="utf-8")
    if args.out:
        written = runner.write_reports(result, Path(args.out))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        if result.cells or not result.dane_cells:
            print(runner.format_matrix(result))
        if result.dane_cells:
            print()
            print(dane.format_cells(result.dane_cells))
        print()
        print(runner.format_reports(result))
        if args.out:
            print(f"wrote {len(written)} files to {args.out}")
        else:
            print("(full reports: --json, or --out DIR)")
    return 0 if result.ok else 1


def run_list(args: argparse.Namespace) -> int:
    from relay.lab.scenarios import MODES, SCENARIOS

    if args.json:
        out = [
            {
                "name": s.name,
                "attack": s.attack,
                "rfc8461": s.rfc,
                "without_mta_sts": s.legacy,
                "expected": {
                    m.value: {
                        "delivered": s.expect[m].delivered,
                        "transport": s.expect[m].transport,
                        "attacker": s.expect[m].attacker,
                        "tlsrpt_results": sorted(s.expect[m].results),
                        "note": s.expect[m].note,
                    }
                    for m in MODES
                },
            }
            for s in SCENARIOS
        ]
        print(json.dumps(out, indent=2))
        return 0
    for s in SCENARIOS:
        print(f"{s.name}: {s.describe()}")
    return 0


# ---------------------------------------------------------------------- standalone pieces


async def _until_signal(
    start: Callable[[], Awaitable[str]], stop: Callable[[], Awaitable[None]]
) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    where = await start()
    print(where, flush=True)
    try:
        await done.wait()
    finally:
        await stop()


def run_strip(args: argparse.Namespace) -> int:
    from relay.lab.strip import StripProxy

    proxy = StripProxy(hostport(args.upstream), hostport(args.listen))

    async def start() -> str:
        await proxy.start()
        return (
            f"relay lab strip: listening on {proxy.host}:{proxy.port}, "
            f"forwarding to {args.upstream}, STARTTLS -> XXXXXXXA"
        )

    try:
        asyncio.run(_until_signal(start, proxy.stop))
    except OSError as exc:
        print(f"relay lab strip: {exc}", file=sys.stderr)
        return 1
    print(f"relay lab strip: {proxy.connections} connections, {proxy.stripped} rewritten")
    return 0


def run_policy_host(args: argparse.Namespace) -> int:
    import ssl

    from relay.lab.policyhost import PolicyHost, Site, SiteMode, server_context

    try:
        policy = Path(args.policy).read_text()
        ctx = server_context(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        print(f"relay lab policy-host: {exc}", file=sys.stderr)
        return 2
    site = Site(policy, SiteMode(args.mode))
    host = PolicyHost(
        ctx,
        hostport(args.listen),
        sites={n: site for n in args.name},
        default=None if args.name else site,
    )

    async def start() -> str:
        await host.start()
        names = ", ".join(args.name) or "any name"
        return f"relay lab policy-host: https://{host.host}:{host.port} for {names} ({args.mode})"

    try:
        asyncio.run(_until_signal(start, host.stop))
    except OSError as exc:
        print(f"relay lab policy-host: {exc}", file=sys.stderr)
        return 1
    print(f"relay lab policy-host: {len(host.served)} requests")
    return 0
