"""The downgrade lab runner: builds the whole lab on loopback in one process, plays every
scenario under every policy mode against a relay configured through its ordinary
config.toml, and compares each cell with what RFC 8461/8460 require.

The lab (nothing outside 127.0.0.0/8):
- a lab DNS server (relay.lab.dnsserver) on 127.0.0.1, the relay's only resolver;
- a lab CA (trustme) that the relay trusts through ``[delivery] ca_file``, and a rogue
  CA it does not;
- one HTTPS policy host (relay.lab.policyhost) on 127.0.0.2 for every
  ``mta-sts.<domain>``, at ``[mta_sts] https_port``;
- receiving MTAs, one per kind, each on its own 127.0.0.x and all on the same port
  (``[delivery] port``): good, plain, expired, wrong name, unknown CA, TLS 1.0/1.1,
  STARTTLS injection, the attacker's MX, and the STARTTLS-stripping proxy in front of
  the good MX;
- the relay under test (relay.app.RelayApp) from a config.toml written to a temporary
  directory, with ``[http] allow_private_addresses = true`` and short timeouts.

Each (scenario, mode) cell has its own domain ``<scenario>.<mode>.lab.test`` with MX
``mx.<domain>`` and a policy listing exactly that MX. Phase 1 (only for scenarios that
need a cached policy): honest set-up, one message per primed cell, delivered. The relay
is then restarted (the policy cache is durable), the attacks are applied (DNS records,
policy host modes), and phase 2 sends one message per cell. A cell is settled when the
message reached a receiving MTA, or when the queue shows the recipient deferred after
one attempt (``[delivery] retry_first`` is long, so nothing is retried). The TLS-RPT
result types of phase 2 are taken from the relay's outcome sink (the TLS-RPT ledger);
the reports are built from the ledger by relay.tlsrpt's report builder.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import trustme

from relay.app import RelayApp
from relay.config import Config, write_config
from relay.delivery.wiretap import WIRE_TAP
from relay.lab.attacks import InjectionMta, legacy_tls_context, legacy_tls_supported
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta, Received
from relay.lab.policyhost import PolicyHost, Site, SiteMode
from relay.lab.scenarios import MODES, SCENARIOS, Expect, Mode, Scenario, Target
from relay.lab.strip import StripProxy
from relay.model import RecipientState, TlsOutcome
from relay.queue.spool import Spool
from relay.tlsrpt.ledger import TlsRptLedger, utc_day
from relay.tlsrpt.report import TlsReport, attachment_filename, build_report, make_report_id
from relay.tlsrpt.sender import report_meta

LAB_SUFFIX = "lab.test"
DNS_IP = "127.0.0.1"
RELAY_IP = "127.0.0.1"
POLICY_IP = "127.0.0.2"
TARGET_IPS: dict[Target, str] = {
    Target.GOOD: "127.0.0.11",
    Target.PLAIN: "127.0.0.12",
    Target.STRIP: "127.0.0.13",
    Target.INJECT: "127.0.0.14",
    Target.EXPIRED: "127.0.0.15",
    Target.WRONG_NAME: "127.0.0.16",
    Target.UNKNOWN_CA: "127.0.0.17",
    Target.LEGACY_TLS: "127.0.0.18",
    Target.EVIL: "127.0.0.19",
}
SENDER = "lab@sender.lab.test"
RUA = "mailto:tlsrpt@reports.lab.test"
SETTLE_TIMEOUT = 30.0


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Cell:
    scenario: Scenario
    mode: Mode

    @property
    def id(self) -> str:
        return f"{self.scenario.name}.{self.mode.value}"

    @property
    def domain(self) -> str:
        return f"{self.id}.{LAB_SUFFIX}"

    @property
    def mx(self) -> str:
        return f"mx.{self.domain}"

    @property
    def evil_mx(self) -> str:
        return f"mx.{self.id}.evil.test"

    @property
    def expect(self) -> Expect:
        return self.scenario.expect[self.mode]

    def policy(self, mode: Mode) -> str:
        return f"version: STSv1\r\nmode: {mode.value}\r\nmx: {self.mx}\r\nmax_age: 86400\r\n"


@dataclass(frozen=True, slots=True)
class CellResult:
    scenario: str
    mode: Mode
    domain: str
    delivered: bool
    transport: str | None  # "tls" | "clear" when delivered
    tls_version: str | None
    attacker: bool
    results: tuple[str, ...]  # TLS-RPT result types recorded in the attack phase, sorted
    reply: str  # the queue's last reply when held
    expected: Expect
    problems: tuple[str, ...]  # mismatches with the expectation; empty: matches the RFC
    transcript: tuple[str, ...] = ()  # the relay's outbound SMTP sessions of the cell

    @property
    def ok(self) -> bool:
        return not self.problems

    def outcome_text(self) -> str:
        if not self.delivered:
            code = self.reply.split(" ", 2)[1] if self.reply.count(" ") >= 1 else ""
            return f"held ({code})" if code[:1].isdigit() else "held"
        how = self.tls_version or "TLS" if self.transport == "tls" else "clear"
        return f"{'ATTACKER ' if self.attacker else ''}{how}"

    def grid_text(self) -> str:
        if not self.delivered:
            word = "held"
        else:
            word = "TLS" if self.transport == "tls" else "CLEAR"
            if self.tls_version in ("TLSv1", "TLSv1.1"):
                word = self.tls_version.replace("TLSv", "TLS")
            if self.attacker:
                word = "EVIL:" + word
        mark = "*" if self.expected.note.startswith("TOFU") else ""
        return f"{word} {'ok' if self.ok else 'MISMATCH'}{mark}"

    def to_dict(self) -> dict[str, Any]:
        e = self.expected
        return {
            "scenario": self.scenario,
            "mode": self.mode.value,
            "domain": self.domain,
            "delivered": self.delivered,
            "transport": self.transport,
            "tls_version": self.tls_version,
            "attacker": self.attacker,
            "tlsrpt_results": list(self.results),
            "reply": self.reply,
            "expected": {
                "delivered": e.delivered,
                "transport": e.transport,
                "attacker": e.attacker,
                "tlsrpt_results": sorted(e.results),
                "note": e.note,
            },
            "matches_rfc": self.ok,
            "problems": list(self.problems),
            # the transport policy of the attempt (RFC 8460 policy types): MTA-STS here;
            # the DANE cells (relay.lab.dane) say "dane"
            "policy": "sts" if self.mode in (Mode.TESTING, Mode.ENFORCE) else "none",
            "transcript": list(self.transcript),
        }


@dataclass(frozen=True, slots=True)
class LabRun:
    cells: tuple[CellResult, ...]
    reports: tuple[TlsReport, ...]
    submitter: str
    seconds: float
    skipped: tuple[str, ...] = ()  # "scenario: why", when this machine cannot play it
    dane_cells: tuple[Any, ...] = ()  # relay.lab.dane.DaneCellResult

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cells) and all(c.ok for c in self.dane_cells)

    def cell(self, scenario: str, mode: Mode | str) -> CellResult:
        for c in self.cells:
            if c.scenario == scenario and c.mode == mode:
                return c
        raise KeyError((scenario, mode))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "cells": [c.to_dict() for c in self.cells] + [c.to_dict() for c in self.dane_cells],
            "mismatches": sum(1 for c in (*self.cells, *self.dane_cells) if not c.ok),
            "seconds": round(self.seconds, 2),
            "skipped": list(self.skipped),
            "tlsrpt_reports": [r.to_dict() for r in self.reports],
        }


def compare(
    expect: Expect,
    delivered: bool,
    transport: str | None,
    attacker: bool,
    results: frozenset[str],
) -> tuple[str, ...]:
    problems = []
    if delivered != expect.delivered:
        problems.append(f"expected {'delivered' if expect.delivered else 'held'}")
    elif delivered and transport != expect.transport:
        problems.append(f"expected delivery over {expect.transport}, got {transport}")
    if attacker != expect.attacker:
        problems.append("delivered to the attacker" if attacker else "expected the attacker")
    if results != expect.results:
        problems.append(f"TLS-RPT results {sorted(results)} != expected {sorted(expect.results)}")
    return tuple(problems)


# ---------------------------------------------------------------------- the relay


class TappedLedger(TlsRptLedger):
    """The relay's TLS-RPT ledger, also telling the lab about every outcome."""

    def __init__(self, store: Any, clock: Callable[[], float], tap: Callable[[TlsOutcome], None]):
        super().__init__(store, clock=clock)
        self.tap = tap

    def record(self, outcome: TlsOutcome) -> None:
        self.tap(outcome)
        super().record(outcome)


class LabRelayApp(RelayApp):
    """RelayApp whose outcome sink (the TLS-RPT ledger) is tapped by the lab."""

    def __init__(self, config: Config, tap: Callable[[TlsOutcome], None], **kw: Any) -> None:
        super().__init__(config, **kw)
        self.tap = tap

    def _build_ledger(self) -> Any:
        return TappedLedger(self.store, self.clock, self.tap)


# ---------------------------------------------------------------------- the lab


class Wire:
    """The relay's outbound SMTP lines (relay.delivery.wiretap), per MX host name."""

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {}

    def __call__(self, mx_host: str, who: str, line: str) -> None:
        self.lines.setdefault(mx_host.lower().rstrip("."), []).append(f"{who}: {line}")

    def of(self, *mx_hosts: str) -> tuple[str, ...]:
        out: list[str] = []
        for h in mx_hosts:
            out += self.lines.get(h.lower().rstrip("."), [])
        return tuple(out)

    def clear(self) -> None:
        self.lines.clear()


def _server_ctx(leaf: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    return ctx


class Lab:
    """Every lab server for ``cells``; ``start()`` / ``stop()``."""

    def __init__(self, cells: Sequence[Cell], workdir: Path) -> None:
        self.cells = list(cells)
        self.workdir = workdir
        self.ca = trustme.CA(organization_name="relay downgrade lab CA")
        self.rogue_ca = trustme.CA(organization_name="unknown CA")
        self.ca_file = workdir / "lab-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.zone = Zone()
        self.dns = LabDnsServer(self.zone, host=DNS_IP)
        self.mx_port = 0
        self.mtas: dict[Target, LabMta | InjectionMta] = {}
        self.proxy: StripProxy | None = None
        self.policy_host: PolicyHost | None = None
        self.outcomes: list[TlsOutcome] = []
        self.wire = Wire()

    # ------------------------------------------------------------ servers

    def _contexts(self) -> dict[Target, ssl.SSLContext]:
        names = [c.mx for c in self.cells]
        now = dt.datetime.now(dt.UTC)
        good = _server_ctx(self.ca.issue_cert(*names))
        expired = _server_ctx(
            self.ca.issue_cert(
                *names,
                not_before=now - dt.timedelta(days=60),
                not_after=now - dt.timedelta(days=1),
            )
        )
        legacy = legacy_tls_context()
        self.ca.issue_cert(*names).configure_cert(legacy)
        return {
            Target.GOOD: good,
            Target.EXPIRED: expired,
            Target.WRONG_NAME: _server_ctx(self.ca.issue_cert("mx.elsewhere.example.test")),
            Target.UNKNOWN_CA: _server_ctx(self.rogue_ca.issue_cert(*names)),
            Target.LEGACY_TLS: legacy,
            Target.INJECT: _server_ctx(self.ca.issue_cert(*names)),
            Target.EVIL: _server_ctx(self.ca.issue_cert(*[c.evil_mx for c in self.cells])),
        }

    async def _start_mtas(self, port: int) -> None:
        ctxs = self._contexts()
        for target, ip in TARGET_IPS.items():
            if target is Target.STRIP:
                continue
            name = f"{target.value}.mx.lab.test"
            mta: LabMta | InjectionMta
            if target is Target.INJECT:
                mta = InjectionMta(ip, port, tls_context=ctxs[target], hostname=name)
            else:
                mta = LabMta(ip, port, tls_context=ctxs.get(target), hostname=name)
            await mta.start()
            port = mta.port
            self.mtas[target] = mta
        self.mx_port = port
        good = TARGET_IPS[Target.GOOD]
        self.proxy = await StripProxy((good, port), (TARGET_IPS[Target.STRIP], port)).start()

    async def start(self) -> None:
        self.dns.start()
        for _ in range(5):  # the shared MX port must be free on every 127.0.0.x
            try:
                await self._start_mtas(0)
                break
            except OSError:
                await self._stop_mtas()
        else:
            raise RuntimeError("no port free on every lab MX address")
        names = [f"mta-sts.{c.domain}" for c in self.cells]
        policy_ctx = _server_ctx(self.ca.issue_cert(*names))
        self.policy_host = await PolicyHost(policy_ctx, (POLICY_IP, 0)).start()

    async def _stop_mtas(self) -> None:
        for m in self.mtas.values():
            await m.stop()
        self.mtas.clear()
        if self.proxy is not None:
            await self.proxy.stop()
            self.proxy = None

    async def stop(self) -> None:
        await self._stop_mtas()
        if self.policy_host is not None:
            await self.policy_host.stop()
        self.dns.stop()

    # ------------------------------------------------------------ DNS and policies

    def configure(
        self, cell: Cell, mode: Mode, target: Target, site: SiteMode, txt_id: str
    ) -> None:
        """Publish cell's domain: MX, the MX host's address, the policy."""
        z, d = self.zone, cell.domain
        mx = cell.evil_mx if target is Target.EVIL else cell.mx
        z.set(d, "MX", [(10, mx)])
        z.set(mx, "A", [TARGET_IPS[target]])
        z.set(f"_smtp._tls.{d}", "TXT", [f"v=TLSRPTv1; rua={RUA}"])
        if mode is Mode.NO_POLICY:
            z.remove(f"_mta-sts.{d}")
        else:
            z.set(f"_mta-sts.{d}", "TXT", [f"v=STSv1; id=lab{txt_id};"])
            z.set(f"mta-sts.{d}", "A", [POLICY_IP])
            assert self.policy_host is not None
            self.policy_host.set(f"mta-sts.{d}", Site(cell.policy(mode), site))

    def config_doc(self) -> dict[str, dict[str, Any]]:
        assert self.policy_host is not None
        return lab_config_doc(
            {
                "server": {"listen": [f"{RELAY_IP}:0"], "hostname": "relay.lab.test"},
                "relay": {"trusted_networks": [f"{RELAY_IP}/32"], "local_domains": []},
                "storage": {"path": str(self.workdir / "relay.sqlite3")},
                "dns": {"nameservers": [self.dns.address], "timeout": 2},
            },
            mx_port=self.mx_port,
            ca_file=self.ca_file,
            connect_timeout=3,
            https_port=self.policy_host.port,
        )

    # ------------------------------------------------------------ observing

    def arrivals(self, rcpt: str) -> list[tuple[Target, Received]]:
        out = []
        for target, mta in self.mtas.items():
            for r in mta.messages:
                if rcpt in r.rcpt_tos:
                    out.append((target, r))
        return out


def lab_config_doc(
    head: dict[str, dict[str, Any]],
    *,
    mx_port: int,
    ca_file: Path,
    connect_timeout: int,
    https_port: int,
) -> dict[str, dict[str, Any]]:
    """A lab relay's config.toml: ``head`` (its server, relay, storage and dns sections),
    then what every lab shares: delivery to the lab MTAs on ``mx_port`` trusting the lab
    CA, MTA-STS fetched from the policy host on ``https_port``, private addresses allowed,
    TLS-RPT on, and no auth, ARC or SRS."""
    return {
        **head,
        "delivery": {
            "port": mx_port,
            "ca_file": str(ca_file),
            "connect_timeout": connect_timeout,
            "attempt_timeout": 10,
            "retry_first": 3600,
            "dead_after": 100,
        },
        "mta_sts": {"enabled": True, "https_port": https_port, "fetch_timeout": 5},
        "http": {"allow_private_addresses": True},
        "tlsrpt": {
            "enabled": True,
            "organization": "relay downgrade lab",
            "contact": "mailto:tlsrpt@relay.lab.test",
            "submitter": "relay.lab.test",
        },
        "auth": {"enabled": False},
        "arc": {"enabled": False},
        "srs": {"enabled": False},
        "logging": {"level": "error"},
    }


def _message(cell: Cell, phase: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: victim@{cell.domain}\r\n"
        f"Subject: downgrade lab {cell.id} ({phase})\r\n"
        f"Message-ID: <{phase}.{cell.id}@sender.lab.test>\r\n\r\n"
        f"lab message for {cell.id}\r\n"
    ).encode()


async def _send(app: RelayApp, mails: list[tuple[str, bytes]]) -> None:
    host, port = app.bound[0]
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    async with client:
        for rcpt, data in mails:
            await client.sendmail(SENDER, [rcpt], data)


async def _settle(
    lab: Lab, app: RelayApp, rcpts: list[str], timeout: float = SETTLE_TIMEOUT
) -> dict[str, tuple[RecipientState, str]]:
    return await settle(app, rcpts, lambda r: bool(lab.arrivals(r)), timeout)


async def settle(
    app: RelayApp, rcpts: list[str], arrived: Callable[[str], bool], timeout: float
) -> dict[str, tuple[RecipientState, str]]:
    """Wait until each recipient arrived (``arrived``) or is held after one attempt."""
    spool = Spool(app.store)
    done: dict[str, tuple[RecipientState, str]] = {}
    deadline = time.monotonic() + timeout
    while True:
        for r in rcpts:
            if r not in done and arrived(r):
                done[r] = (RecipientState.DELIVERED, "")
        if len(done) < len(rcpts):
            for msg in await spool.list():
                for q in msg.recipients:
                    held = q.state in (RecipientState.DEFERRED, RecipientState.FAILED)
                    if q.address in rcpts and q.address not in done and held and q.attempts:
                        done[q.address] = (q.state, q.last_reply)
        if len(done) == len(rcpts) or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.05)


async def _start_relay(lab: Lab, config: Config) -> LabRelayApp:
    app = LabRelayApp(config, lab.outcomes.append, poll_interval=0.05)
    await app.start()
    return app


# ---------------------------------------------------------------------- running


def select(names: Sequence[str] | None = None) -> list[Scenario]:
    if not names:
        return list(SCENARIOS)
    known = {s.name: s for s in SCENARIOS}
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(", ".join(missing))
    return [known[n] for n in names]


async def run_lab(
    scenarios: Sequence[Scenario] | None = None,
    *,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> LabRun:
    """Build the lab, play every cell, tear everything down; the structured results."""
    say = progress or (lambda _m: None)
    t0 = time.monotonic()
    chosen = list(scenarios) if scenarios is not None else list(SCENARIOS)
    skipped: list[str] = []
    if any(s.target is Target.LEGACY_TLS for s in chosen) and not legacy_tls_supported():
        chosen = [s for s in chosen if s.target is not Target.LEGACY_TLS]
        skipped.append("legacy-tls: this OpenSSL cannot speak TLS 1.0/1.1 any more")
    cells = [Cell(s, m) for s in chosen for m in MODES]
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="relay-lab-")
        workdir = Path(tmp.name)
    lab = Lab(cells, workdir)
    app: LabRelayApp | None = None
    wire_token = None
    mail_log = logging.getLogger("mail.log")  # aiosmtpd: lab MTAs see failed handshakes
    old_level = mail_log.level
    mail_log.setLevel(logging.CRITICAL)
    try:
        await lab.start()
        ph_port = lab.policy_host.port if lab.policy_host else 0
        say(
            f"lab up: DNS {lab.dns.address}, MX port {lab.mx_port}, "
            f"policy host {POLICY_IP}:{ph_port}"
        )
        primed = [c for c in cells if c.scenario.prime.get(c.mode) is not None]
        for c in cells:
            first = c.scenario.prime.get(c.mode)
            if first is not None:
                lab.configure(c, first, Target.GOOD, SiteMode.NORMAL, "1")
            else:
                lab.configure(c, c.mode, c.scenario.target, c.scenario.site, "1")
        config = write_config(workdir / "config.toml", lab.config_doc())
        prime_problems: dict[str, str] = {}
        if primed:
            say(f"phase 1: {len(primed)} honest deliveries to learn policies")
            app = await _start_relay(lab, config)
            rcpts = [f"prime@{c.domain}" for c in primed]
            await _send(
                app, [(r, _message(c, "prime")) for r, c in zip(rcpts, primed, strict=True)]
            )
            states = await _settle(lab, app, rcpts)
            for r, c in zip(rcpts, primed, strict=True):
                if states.get(r, (None, ""))[0] is not RecipientState.DELIVERED:
                    prime_problems[c.id] = f"phase 1 delivery failed: {states.get(r)}"
            await app.stop(grace=2)
            app = None
            for c in primed:
                lab.configure(c, c.mode, c.scenario.target, c.scenario.site, "2")
        lab.outcomes.clear()
        wire_token = WIRE_TAP.set(lab.wire)  # the relay's tasks, started below, inherit the tap
        say(f"phase 2: {len(cells)} cells (relay restarted, attacks applied)")
        app = await _start_relay(lab, config)
        rcpts = [f"victim@{c.domain}" for c in cells]
        await _send(app, [(r, _message(c, "attack")) for r, c in zip(rcpts, cells, strict=True)])
        states = await _settle(lab, app, rcpts)
        assert app.ledger is not None
        await app.ledger.flush()
        reports = await _reports(app.ledger, config)
        results = tuple(
            _result(lab, c, states.get(f"victim@{c.domain}"), prime_problems.get(c.id))
            for c in cells
        )
        return LabRun(
            results,
            reports,
            report_meta(config).submitter,
            time.monotonic() - t0,
            tuple(skipped),
        )
    finally:
        if app is not None:
            await app.stop(grace=2)
        await lab.stop()
        mail_log.setLevel(old_level)
        if wire_token is not None:
            WIRE_TAP.reset(wire_token)
        if tmp is not None:
            tmp.cleanup()


def _result(
    lab: Lab, cell: Cell, state: tuple[RecipientState, str] | None, prime_problem: str | None
) -> CellResult:
    rcpt = f"victim@{cell.domain}"
    arrived = lab.arrivals(rcpt)
    results = frozenset(
        o.result_type.value if o.result_type is not None else "success"
        for o in lab.outcomes
        if o.policy_domain == cell.domain
    )
    delivered = bool(arrived)
    transport = tls_version = None
    attacker = False
    if arrived:
        target, rec = arrived[0]
        tls_version = rec.tls_version
        transport = "tls" if rec.tls_version else "clear"
        attacker = target is Target.EVIL
    problems = list(compare(cell.expect, delivered, transport, attacker, results))
    if state is None:
        problems.insert(0, "not settled: neither delivered nor deferred in time")
    if len(arrived) > 1:
        problems.append(f"delivered {len(arrived)} times")
    if prime_problem:
        problems.append(prime_problem)
    problems += _check(lab, cell)
    return CellResult(
        scenario=cell.scenario.name,
        mode=cell.mode,
        domain=cell.domain,
        delivered=delivered,
        transport=transport,
        tls_version=tls_version,
        attacker=attacker,
        results=tuple(sorted(results)),
        reply=state[1] if state is not None else "",
        expected=cell.expect,
        problems=tuple(problems),
        transcript=lab.wire.of(cell.mx, cell.evil_mx),
    )


def _check(lab: Lab, cell: Cell) -> list[str]:
    check = cell.scenario.check
    if check == "stripped" and (lab.proxy is None or lab.proxy.stripped == 0):
        return ["the stripping proxy rewrote nothing"]
    if check == "injection":
        mta = lab.mtas.get(Target.INJECT)
        if not isinstance(mta, InjectionMta) or mta.injected == 0:
            return ["no STARTTLS reply was injected"]
        if mta.desynced:
            return [f"{mta.desynced} client(s) acted on the injected plaintext reply"]
    return []


async def _reports(ledger: TlsRptLedger, config: Config) -> tuple[TlsReport, ...]:
    meta = report_meta(config)
    day = utc_day(time.time())
    out = []
    for d in sorted(await ledger.domains(day)):
        rows = await ledger.counts(day, d)
        if any(r.count > 0 for r in rows):
            rid = make_report_id(day, d, meta.submitter, "lab")
            out.append(build_report(meta, day, d, rows, rid))
    return tuple(out)


# ---------------------------------------------------------------------- output


def format_matrix(run: LabRun) -> str:
    """The matrix as ``relay lab run`` prints it: a grid, then one line per cell."""
    scen = list(dict.fromkeys(c.scenario for c in run.cells))
    w = max([len(s) for s in scen] + [len("scenario")]) + 2
    cw = 18
    lines = ["scenario".ljust(w) + "".join(m.value.ljust(cw) for m in MODES).rstrip()]
    for s in scen:
        row = s.ljust(w)
        for m in MODES:
            try:
                row += run.cell(s, m).grid_text().ljust(cw)
            except KeyError:
                row += "-".ljust(cw)
        lines.append(row.rstrip())
    lines.append(
        "TLS/CLEAR: delivered over TLS or in clear text; held: deferred, not delivered; "
        "EVIL: delivered to the attacker; ok: as RFC 8461/8460 require"
    )
    if any(c.expected.note.startswith("TOFU") for c in run.cells):
        lines.append(
            "*: the trust-on-first-use gap: with no policy ever fetched, RFC 8461 (3.3, 10) "
            "lets the sender go on as without MTA-STS"
        )
    lines.append("")
    head = f"{'scenario':<{w}}{'mode':<11}{'outcome':<20}{'TLS-RPT result types recorded':<52}RFC"
    lines.append(head)
    for c in run.cells:
        res = ", ".join(c.results) or "-"
        verdict = "ok" if c.ok else "MISMATCH: " + "; ".join(c.problems)
        line = f"{c.scenario:<{w}}{c.mode.value:<11}{c.outcome_text():<20}{res:<52}{verdict}"
        if c.expected.note and c.ok:
            line += f" ({c.expected.note})"
        lines.append(line)
    bad = sum(1 for c in run.cells if not c.ok)
    lines.append("")
    lines += [f"skipped {s}" for s in run.skipped]
    lines.append(
        f"{len(run.cells) - bad}/{len(run.cells)} cells match RFC 8461/8460 ({run.seconds:.1f} s)"
    )
    return "\n".join(lines)


def format_reports(run: LabRun) -> str:
    lines = [f"TLS-RPT reports the relay would send ({len(run.reports)}):"]
    for r in run.reports:
        kinds: dict[str, int] = {}
        for p in r.policies:
            for d in p.failure_details:
                kinds[d.result_type] = kinds.get(d.result_type, 0) + d.failed_session_count
        types = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
        ptypes = "/".join(sorted({p.policy_type for p in r.policies}))
        lines.append(
            f"  {r.policy_domain:<44} {ptypes:<16} ok {r.total_successful:>2}  "
            f"failed {r.total_failed:>2}" + (f"  [{types}]" if types else "")
        )
    return "\n".join(lines)


def write_reports(run: LabRun, out: Path) -> list[Path]:
    """Each report as the gzip attachment a mail report carries (RFC 8460 5.3 name),
    and as readable JSON beside it."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in run.reports:
        day = r.start_datetime[:10]
        gz = out / attachment_filename(run.submitter, r.policy_domain, day, r.report_id)
        gz.write_bytes(r.to_gzip())
        js = gz.with_name(gz.name.removesuffix(".gz"))
        js.write_bytes(r.to_json(indent=2))
        written += [gz, js]
    return written


__all__ = [
    "Cell",
    "CellResult",
    "Lab",
    "LabRun",
    "format_matrix",
    "format_reports",
    "run_lab",
    "select",
    "write_reports",
]
