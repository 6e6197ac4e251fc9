"""``relay tlsrpt preview|send``: look at and send the RFC 8460 reports from the shell.

- ``preview --config PATH [--day YYYY-MM-DD] [--domain D]`` prints the JSON report(s) of
  a day (default yesterday, UTC), one JSON object per line; the stored one when already
  built, else built now. No DNS, nothing written.
- ``send --config PATH [--day YYYY-MM-DD] [--domain D]`` builds and sends the reports of
  a past day now (default yesterday), or of today when asked for it explicitly with
  ``--day <today>`` (labs). https reports are POSTed from this process; mailto reports
  are written to the store's queue, where the running relay delivers them. A report
  already sent is not sent again. Prints one line per (domain, URI); exits 0 when every
  report was delivered or queued, 1 when one failed or is left for retry.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Sequence

from relay.commands import open_store
from relay.config import Config, load_config
from relay.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tlsrpt", help="TLS-RPT reports (RFC 8460)")
    ts = p.add_subparsers(dest="tlsrpt_command", required=True)
    pv = ts.add_parser("preview", help="print the JSON report(s) of a day")
    pv.add_argument("--config", required=True)
    pv.add_argument("--day", help="YYYY-MM-DD (UTC); default yesterday")
    pv.add_argument("--domain", help="only this policy domain")
    pv.add_argument("--indent", type=int, default=None, help="pretty-print with this indent")
    pv.set_defaults(func=run_preview)
    sd = ts.add_parser("send", help="send the report(s) of a day now")
    sd.add_argument("--config", required=True)
    sd.add_argument("--day", help="YYYY-MM-DD (UTC); default yesterday; today only if named")
    sd.add_argument("--domain", help="only this policy domain")
    sd.set_defaults(func=run_send)


def _day(arg: str | None, now: float) -> str:
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if arg is None:
        return (today - dt.timedelta(days=1)).isoformat()
    try:
        day = dt.date.fromisoformat(arg)
    except ValueError:
        raise SystemExit(f"relay tlsrpt: --day {arg!r}: expected YYYY-MM-DD") from None
    if day > today:
        raise SystemExit(f"relay tlsrpt: --day {arg}: a future day has no report")
    return day.isoformat()


def _setup(path: str) -> Config:
    """The config, and logs (JSON lines) on standard error: standard output is the result."""
    from relay import logs

    config = load_config(path)
    logs.setup(config.logging.level, config.logging.format, stream=sys.stderr)
    return config


def run_preview(args: argparse.Namespace) -> int:
    config = _setup(args.config)
    day = _day(args.day, time.time())
    return asyncio.run(_preview(config, day, args.domain, args.indent))


async def _preview(config: Config, day: str, domain: str | None, indent: int | None) -> int:
    from relay.dns import StaticResolver
    from relay.tlsrpt.ledger import open_ledger
    from relay.tlsrpt.sender import TlsRptSender, load_signer, no_key_reason, report_meta

    if load_signer(config) is None:  # RFC 8460 section 3: mailto reports need a key
        print(f"relay tlsrpt: {no_key_reason(report_meta(config).submitter)}", file=sys.stderr)
    async with open_store(config, "tlsrpt") as store:
        ledger = open_ledger(store)

        async def no_inject(_f: str, _r: Sequence[str], _d: bytes) -> str:
            raise RuntimeError("preview sends nothing")

        sender = TlsRptSender(
            config, ledger, StaticResolver({}), _NoHttp(), no_inject, signer=_NoSigner()
        )
        reports = await sender.preview(day, domain=domain)
    for r in reports:
        print(json.dumps(r.to_dict(), indent=indent))
    if not reports:
        print(f"relay tlsrpt: no sessions recorded on {day}", file=sys.stderr)
    return 0


class _NoHttp:
    async def post(self, url: str, body: bytes, content_type: str, **_: object) -> None:
        raise RuntimeError("preview sends nothing")


class _NoSigner:
    def sign(self, message: bytes) -> bytes:
        return message


def run_send(args: argparse.Namespace) -> int:
    config = _setup(args.config)
    day = _day(args.day, time.time())
    return asyncio.run(_send(config, day, args.domain))


async def _send(config: Config, day: str, domain: str | None) -> int:
    from relay.dns import DnspythonResolver
    from relay.http import SafeHttpClient
    from relay.queue.base import QueueSpool
    from relay.queue.pgspool import PgSpool
    from relay.queue.spool import FLAG_NO_DSN, FLAG_NO_TLS_REQUIRED, NewMessage, Spool
    from relay.tlsrpt.ledger import DeliveryStatus, open_ledger
    from relay.tlsrpt.sender import TlsRptSender

    async with open_store(config, "tlsrpt") as store:
        spool: QueueSpool
        if isinstance(store, Store):
            spool = Spool(store)
        else:
            spool = PgSpool(store, node_id=config.server.node_id)

        async def inject(mail_from: str, recipients: Sequence[str], data: bytes) -> str:
            # report mail carries "TLS-Required: No" and is itself a report: no DSN
            flags = FLAG_NO_TLS_REQUIRED | FLAG_NO_DSN
            return await spool.enqueue(NewMessage(mail_from, tuple(recipients), data, (), flags))

        resolver = DnspythonResolver.from_config(config.dns)
        http = SafeHttpClient.from_config(config, resolver, timeout=60.0)
        ledger = open_ledger(store, owner=f"{config.server.node_id}:cli")
        sender = TlsRptSender(config, ledger, resolver, http, inject)
        records = await sender.send_day(day, domain=domain)
    ok = True
    if not records:
        print(f"relay tlsrpt: no sessions recorded on {day}" + (f" for {domain}" if domain else ""))
    for rec in records:
        if not rec.deliveries:
            print(f"{day} {rec.policy_domain} {rec.state.value} {rec.last_error}".rstrip())
            ok = ok and rec.state.value == "no-record"
            continue
        for d in rec.deliveries:
            extra = f" qid={d.qid}" if d.qid else ""
            if d.last_error and d.status is not DeliveryStatus.DELIVERED:
                extra += f" error={d.last_error}"
            print(f"{day} {rec.policy_domain} {d.uri} {d.status.value}{extra}")
            ok = ok and d.status in (DeliveryStatus.DELIVERED, DeliveryStatus.QUEUED)
    return 0 if ok else 1
