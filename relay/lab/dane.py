"""The lab's DANE (RFC 7672) and REQUIRETLS (RFC 8689) cells, on real parts: zones signed
with dnspython on a lab authoritative server behind a validating unbound (lab trust
anchor, relay/lab/unbound.py), receiving MTAs on 127.0.0.3x with lab-CA certificates,
an HTTPS MTA-STS policy host (relay/lab/policyhost.py) for the "DANE + MTA-STS" cell,
and the full relay (relay.app) from an ordinary config.toml: ``[dns]`` at the unbound
with ``dnssec = "trust-ad"``, the lab CA as ``delivery.ca_file``, an inbound
certificate. Every cell's message is submitted to it over SMTP (STARTTLS, and
``MAIL FROM:<..> REQUIRETLS`` for the REQUIRETLS cells); the outcome is read from what
the lab MTAs received and from the queue (a deferred recipient's reply, or a failed
one's in the DSN the relay queued for the sender); the TLS-RPT outcomes from the
relay's ledger, the SMTP transcript from its outbound sessions.

One cell per scenario (mode ``dane``). Each cell's expectation cites the RFC section.
When unbound is missing, the cells are skipped, naming the Debian package.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.app import RelayApp
from relay.config import write_config
from relay.delivery.wiretap import WIRE_TAP
from relay.lab.mta import LabMta
from relay.lab.policyhost import PolicyHost, Site
from relay.lab.runner import LabRelayApp, Wire, lab_config_doc
from relay.lab.signedzone import SignedZone
from relay.lab.unbound import UNBOUND_PACKAGE, ValidatingResolver, missing
from relay.lists.bounces import read_bounce
from relay.model import RecipientState, TlsOutcome
from relay.queue.spool import Spool

ZONE = "dane.lab.test"
INSECURE_ZONE = "insecure.lab.test"
SENDER_DOMAIN = f"sender.{ZONE}"
SENDER = f"lab@{SENDER_DOMAIN}"
SENDER_IP = "127.0.0.28"  # the sender's MX: nothing listens, DSNs wait in the queue
POLICY_IP = "127.0.0.29"  # the MTA-STS policy host of the "DANE + MTA-STS" cell
RELAY_NAME = "relay.lab.test"
STS_POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.elsewhere.lab.test\r\nmax_age: 86400\r\n"
SETTLE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class DaneScenario:
    name: str
    what: str
    delivered: bool
    transport: str | None  # "tls" when delivered
    policy: str  # the policy the attempt must run under: dane | sts | none
    results: frozenset[str]  # TLS-RPT result types recorded
    reply: str  # the start of the reply when held ("" = any)
    rfc: str
    # how the lab is set up for it
    cert: str = "good"  # good | good+ca | none (no STARTTLS)
    tlsa: str = "ee"  # ee | ee-wrong | ta | none
    zone: str = "signed"  # signed | insecure
    bogus: bool = False
    sts: bool = False
    requiretls: bool = False
    tls_required_no: bool = False


S = frozenset
DANE_SCENARIOS: tuple[DaneScenario, ...] = (
    DaneScenario("dane-ee-match", "DANE-EE 3 1 1 of the leaf key", True, "tls", "dane",
                 S({"success"}), "", "RFC 7672 3.1.1"),
    DaneScenario("dane-ee-mismatch", "DANE-EE record of another key", False, None, "dane",
                 S({"validation-failure"}), "451 4.7.5", "RFC 7672 2.2, 3.1.1",
                 tlsa="ee-wrong"),
    DaneScenario("dane-ta-match", "DANE-TA 2 0 1 of the lab CA, sent in the chain", True, "tls",
                 "dane", S({"success"}), "", "RFC 7672 3.1.2, 3.2.2", cert="good+ca", tlsa="ta"),
    DaneScenario("dane-bogus-tlsa", "TLSA RRset with a broken RRSIG", False, None, "dane",
                 S({"dnssec-invalid"}), "451 4.7.5", "RFC 7672 2.2", bogus=True),
    DaneScenario("dane-insecure-zone", "TLSA in an unsigned zone (does not match)", True, "tls",
                 "none", S({"success"}), "", "RFC 7672 2.2", zone="insecure", tlsa="ee-wrong"),
    DaneScenario("dane-starttls-stripped", "TLSA present, the MX offers no STARTTLS", False,
                 None, "dane", S({"starttls-not-supported"}), "451 4.7.5", "RFC 7672 2.2",
                 cert="none"),
    DaneScenario("dane-and-mta-sts", "TLSA and an enforce policy excluding the MX", True, "tls",
                 "dane", S({"success"}), "", "RFC 8461 2; RFC 7672 2.2", sts=True),
    DaneScenario("requiretls-hop-without", "REQUIRETLS over DANE to a hop without REQUIRETLS",
                 False, None, "dane", S({"success"}), "550 5.7.30", "RFC 8689 4.2.1",
                 requiretls=True),
    DaneScenario("requiretls-opportunistic", "REQUIRETLS, only opportunistic TLS available",
                 False, None, "none", S(), "550 5.7.30", "RFC 8689 4.2.1",
                 zone="insecure", tlsa="none", requiretls=True),
    DaneScenario("requiretls-tls-required-no", "REQUIRETLS and TLS-Required: No: REQUIRETLS wins",
                 False, None, "none", S(), "550 5.7.30", "RFC 8689 5",
                 zone="insecure", tlsa="none", requiretls=True, tls_required_no=True),
)  # fmt: skip
DANE_NAMES = {s.name for s in DANE_SCENARIOS}


@dataclass(frozen=True, slots=True)
class DaneCellResult:
    scenario: DaneScenario
    domain: str
    delivered: bool
    transport: str | None
    tls_version: str | None
    policy: str
    results: tuple[str, ...]
    reply: str
    problems: tuple[str, ...]
    # the TLS-RPT outcomes of the attempt, RFC 8460 section 4.4 field names
    outcomes: tuple[dict[str, Any], ...] = ()
    transcript: tuple[str, ...] = ()  # the relay's outbound SMTP session(s) of the cell

    @property
    def ok(self) -> bool:
        return not self.problems

    def grid_text(self) -> str:
        word = ("TLS" if self.transport == "tls" else "CLEAR") if self.delivered else "held"
        return f"{word} {'ok' if self.ok else 'MISMATCH'}"

    def to_dict(self) -> dict[str, Any]:
        s = self.scenario
        return {
            "scenario": s.name,
            "mode": "dane",
            "domain": self.domain,
            "delivered": self.delivered,
            "transport": self.transport,
            "tls_version": self.tls_version,
            "attacker": False,
            "tlsrpt_results": list(self.results),
            "reply": self.reply,
            "policy": self.policy,
            "expected": {
                "delivered": s.delivered,
                "transport": s.transport,
                "attacker": False,
                "tlsrpt_results": sorted(s.results),
                "policy": s.policy,
                "note": f"{s.what} ({s.rfc})",
            },
            "rfc": s.rfc,
            "matches_rfc": self.ok,
            "problems": list(self.problems),
            "tlsrpt_outcomes": list(self.outcomes),
            "transcript": list(self.transcript),
        }


def _outcome_dict(o: TlsOutcome) -> dict[str, Any]:
    return {
        "policy-type": o.policy_type.value,
        "policy-string": list(o.policy_strings),
        "receiving-mx-hostname": o.mx_host,
        "receiving-ip": o.receiving_ip,
        "result-type": o.result_type.value if o.result_type else "success",
        "failure-reason-code": o.failure_reason,
    }


def select(names: Sequence[str] | None) -> list[DaneScenario]:
    if not names:
        return list(DANE_SCENARIOS)
    return [s for s in DANE_SCENARIOS if s.name in names]


def _spki(pem: bytes) -> str:
    key = x509.load_pem_x509_certificate(pem).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _cert_digest(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _tls(ca: trustme.CA, name: str, kind: str, tmp: Path) -> tuple[ssl.SSLContext | None, bytes]:
    leaf = ca.issue_cert(name)
    pem = leaf.cert_chain_pems[0].bytes()
    if kind == "none":
        return None, pem
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if kind == "good+ca":
        chain, key = tmp / f"{name}.pem", tmp / f"{name}.key"
        chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes())
        key.write_bytes(leaf.private_key_pem.bytes())
        ctx.load_cert_chain(str(chain), str(key))
    else:
        leaf.configure_cert(ctx)
    return ctx, pem


async def run_dane_lab(
    scenarios: Sequence[DaneScenario] | None = None,
) -> tuple[list[DaneCellResult], list[str]]:
    """Play the DANE/REQUIRETLS cells; ([], [why]) when unbound is missing."""
    chosen = list(scenarios if scenarios is not None else DANE_SCENARIOS)
    if not chosen:
        return [], []
    if missing():
        names = ", ".join(s.name for s in chosen)
        return [], [f"{names}: unbound is not installed (apt-get install {UNBOUND_PACKAGE})"]
    with tempfile.TemporaryDirectory(prefix="relay-dane-lab-") as d:
        return await _run(chosen, Path(d)), []


@dataclass
class DaneLabSetup:
    """The built lab: signed and insecure zones, one MTA per cell, the lab CA, the MTA-STS
    policy host of the "DANE + MTA-STS" cell (None when that cell is not played)."""

    signed: SignedZone
    insecure: SignedZone
    mtas: dict[str, LabMta]
    port: int
    ca: trustme.CA
    ca_file: Path
    policy_host: PolicyHost | None = None

    async def stop(self) -> None:
        for m in self.mtas.values():
            await m.stop()
        if self.policy_host is not None:
            await self.policy_host.stop()


def _domain(s: DaneScenario) -> str:
    return f"{s.name}.{ZONE if s.zone == 'signed' else INSECURE_ZONE}"


async def build_lab(
    chosen: Sequence[DaneScenario], tmp: Path, *, tlsa_ports: Sequence[int] = (25,)
) -> DaneLabSetup:
    """Certificates, MTAs on 127.0.0.3x (one port for all) and the zones of the cells;
    TLSA records at ``_<port>._tcp.<mx>`` for each of ``tlsa_ports`` and the MTAs' port
    (Postfix looks them up at the port it connects to). The sender's domain (for the
    DSNs) has an MX with TLSA where nothing listens: a DSN waits in the queue there.
    A cell with ``sts`` gets ``_mta-sts`` and ``mta-sts`` records and its policy on an
    HTTPS policy host (relay.lab.policyhost) at POLICY_IP."""
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    signed, insecure = SignedZone(ZONE), SignedZone(INSECURE_ZONE, signed=False)
    mtas: dict[str, LabMta] = {}
    port = 0
    pems: dict[str, bytes] = {}
    for i, s in enumerate(chosen):
        mx = f"mx.{_domain(s)}"
        ctx, pems[s.name] = _tls(ca, mx, s.cert, tmp)
        mta = LabMta(f"127.0.0.{30 + i}", port, tls_context=ctx, hostname=mx)
        await mta.start()
        port = mta.port  # every MTA on the same port ([delivery] port)
        mtas[s.name] = mta
    ports = list(dict.fromkeys([*tlsa_ports, port]))
    for s in chosen:
        zone = signed if s.zone == "signed" else insecure
        domain = _domain(s)
        mx = f"mx.{domain}"
        zone.add(f"{domain}.", "MX", f"10 {mx}.").add(f"{mx}.", "A", mtas[s.name].host)
        for p in ports:
            owner = f"_{p}._tcp.{mx}."
            if s.tlsa == "ee":
                zone.add(owner, "TLSA", f"3 1 1 {_spki(pems[s.name])}")
            elif s.tlsa == "ee-wrong":
                zone.add(owner, "TLSA", "3 1 1 " + "00" * 32)
            elif s.tlsa == "ta":
                zone.add(owner, "TLSA", f"2 0 1 {_cert_digest(ca.cert_pem.bytes())}")
            if s.bogus:
                signed.bogus.add((owner, "TLSA"))
    sender_mx = f"mx.{SENDER_DOMAIN}"
    signed.add(f"{SENDER_DOMAIN}.", "MX", f"10 {sender_mx}.").add(f"{sender_mx}.", "A", SENDER_IP)
    for p in ports:
        signed.add(f"_{p}._tcp.{sender_mx}.", "TLSA", "3 1 1 " + "00" * 32)
    policy_host = None
    sts = [s for s in chosen if s.sts]
    if sts:
        names = [f"mta-sts.{_domain(s)}" for s in sts]
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)
        policy_host = await PolicyHost(ctx, (POLICY_IP, 0)).start()
        for s in sts:
            signed.add(f"_mta-sts.{_domain(s)}.", "TXT", '"v=STSv1; id=lab1;"')
            signed.add(f"mta-sts.{_domain(s)}.", "A", POLICY_IP)
            # an enforce policy whose mx patterns exclude the DANE host (RFC 8461 4.1)
            policy_host.set(f"mta-sts.{_domain(s)}", Site(STS_POLICY))
    return DaneLabSetup(signed, insecure, mtas, port, ca, ca_file, policy_host)


def config_doc(lab: DaneLabSetup, unbound: ValidatingResolver, tmp: Path) -> dict[str, Any]:
    """The relay's ordinary config.toml for the cells: [dns] at the validating unbound
    (trust-ad: loopback), the lab CA as ``delivery.ca_file``, an inbound certificate
    (REQUIRETLS is offered only over TLS, RFC 8689 4.1)."""
    leaf = lab.ca.issue_cert(RELAY_NAME)
    cert, key = tmp / "relay.pem", tmp / "relay.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ph = lab.policy_host
    return lab_config_doc(
        {
            "server": {
                "listen": ["127.0.0.1:0"],
                "hostname": RELAY_NAME,
                "tls_cert": str(cert),
                "tls_key": str(key),
            },
            "relay": {"trusted_networks": ["127.0.0.1/32"], "local_domains": []},
            "storage": {"path": str(tmp / "relay.sqlite3")},
            "dns": {"nameservers": [unbound.address], "timeout": 3, "dnssec": "trust-ad"},
        },
        mx_port=lab.port,
        ca_file=lab.ca_file,
        connect_timeout=2,
        https_port=ph.port if ph is not None else 443,
    )


async def _run(chosen: list[DaneScenario], tmp: Path) -> list[DaneCellResult]:
    lab = await build_lab(chosen, tmp)
    try:
        with ValidatingResolver([lab.signed, lab.insecure]) as unbound:
            return await play(chosen, lab, unbound, tmp)
    finally:
        await lab.stop()


def _message(s: DaneScenario) -> bytes:
    data = f"From: {SENDER}\r\nTo: x@{_domain(s)}\r\nSubject: {s.name}\r\n\r\nlab\r\n"
    if s.tls_required_no:
        data = "TLS-Required: No\r\n" + data  # RFC 8689 5
    return data.encode()


async def _submit(app: RelayApp, chosen: Sequence[DaneScenario], ca_file: Path) -> None:
    """Every cell's message over one SMTP session with STARTTLS; MAIL FROM:<..> REQUIRETLS
    for the REQUIRETLS cells (RFC 8689 4.1)."""
    host, port = app.bound[0]
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10)
    async with client:
        await client.starttls(
            tls_context=ssl.create_default_context(cafile=str(ca_file)),
            server_hostname=RELAY_NAME,
        )
        for s in chosen:
            opts = ["REQUIRETLS"] if s.requiretls else []
            await client.sendmail(SENDER, [f"x@{_domain(s)}"], _message(s), mail_options=opts)


async def _settle(
    app: RelayApp, lab: DaneLabSetup, chosen: Sequence[DaneScenario]
) -> dict[str, tuple[RecipientState, str]]:
    """Each cell's recipient: arrived at its MTA, deferred in the queue after one attempt,
    or failed (then the message is gone from the queue and the DSN the relay queued for
    the sender, waiting at the sender's unreachable MX, names it and its reply)."""
    spool = Spool(app.store)
    rcpts = {f"x@{_domain(s)}": s for s in chosen}
    done: dict[str, tuple[RecipientState, str]] = {}
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while len(done) < len(rcpts) and time.monotonic() < deadline:
        for r, s in rcpts.items():
            if r not in done and any(r in m.rcpt_tos for m in lab.mtas[s.name].messages):
                done[r] = (RecipientState.DELIVERED, "")
        for msg in await spool.list():
            for q in msg.recipients:
                held = q.state in (RecipientState.DEFERRED, RecipientState.FAILED)
                if q.address in rcpts and q.address not in done and held and q.attempts:
                    done[q.address] = (q.state, q.last_reply)
            if msg.mail_from == "" and any(q.address == SENDER for q in msg.recipients):
                loaded = await spool.load(msg.id)
                if loaded is None:
                    continue
                bounce = read_bounce(loaded[1])
                reply = bounce.detail.removeprefix("smtp;").strip()
                for r in bounce.recipients:
                    if r in rcpts and r not in done:
                        done[r] = (RecipientState.FAILED, reply)
        await asyncio.sleep(0.05)
    return done


async def play(
    chosen: Sequence[DaneScenario], lab: DaneLabSetup, unbound: ValidatingResolver, tmp: Path
) -> list[DaneCellResult]:
    """Run the relay (relay.app, from an ordinary config.toml) against the built lab, send
    every cell's message to it over SMTP, and read each outcome from the lab MTAs and the
    queue; the TLS-RPT outcomes from the relay's ledger (tapped), the transcripts from
    its outbound sessions (relay.delivery.wiretap)."""
    config = write_config(tmp / "config.toml", config_doc(lab, unbound, tmp))
    outcomes: list[TlsOutcome] = []
    wire = Wire()
    token = WIRE_TAP.set(wire)  # the relay's tasks, started below, inherit the tap
    app = LabRelayApp(config, outcomes.append, poll_interval=0.05)
    mail_log = logging.getLogger("mail.log")  # aiosmtpd: the MTAs see refused sessions
    old_level = mail_log.level
    mail_log.setLevel(logging.CRITICAL)
    try:
        await app.start()
        await _submit(app, chosen, lab.ca_file)
        states = await _settle(app, lab, chosen)
    finally:
        await app.stop(grace=2)
        WIRE_TAP.reset(token)
        mail_log.setLevel(old_level)
    results = []
    for s in chosen:
        r = _result(s, lab.mtas[s.name], states.get(f"x@{_domain(s)}"), outcomes, wire)
        if s.sts and not _policy_fetched(lab, s):
            r = dataclasses.replace(r, problems=(*r.problems, "the MTA-STS policy was not fetched"))
        results.append(r)
    return results


def _policy_fetched(lab: DaneLabSetup, s: DaneScenario) -> bool:
    ph = lab.policy_host
    name = f"mta-sts.{_domain(s)}"
    return ph is not None and any(x.host == name and x.status == 200 for x in ph.served)


_POLICY_TYPES = {"tlsa": "dane", "sts": "sts", "no-policy-found": "none"}


def _result(
    s: DaneScenario,
    mta: LabMta,
    state: tuple[RecipientState, str] | None,
    all_outcomes: Sequence[TlsOutcome],
    wire: Wire,
) -> DaneCellResult:
    domain = _domain(s)
    rcpt = f"x@{domain}"
    outcomes = [o for o in all_outcomes if o.policy_domain == domain]
    got = next((m for m in mta.messages if rcpt in m.rcpt_tos), None)
    delivered = got is not None
    transport = ("tls" if got.tls_version else "clear") if got is not None else None
    seen = tuple(sorted({o.result_type.value if o.result_type else "success" for o in outcomes}))
    types = {_POLICY_TYPES.get(o.policy_type.value, "none") for o in outcomes}
    policy = "dane" if "dane" in types else "sts" if "sts" in types else "none"
    reply = state[1] if state is not None and not delivered else ""
    problems = []
    if state is None:
        problems.append("not settled: neither delivered nor held in time")
    if delivered != s.delivered:
        problems.append(f"delivered {delivered}, expected {s.delivered}")
    if delivered and transport != s.transport:
        problems.append(f"transport {transport}, expected {s.transport}")
    if policy != s.policy:
        problems.append(f"policy {policy}, expected {s.policy}")
    if set(seen) != set(s.results):
        problems.append(f"TLS-RPT results {list(seen)}, expected {sorted(s.results)}")
    if not delivered and s.reply and not reply.startswith(s.reply):
        problems.append(f"reply {reply!r}, expected {s.reply}")
    return DaneCellResult(
        s, domain, delivered, transport, got.tls_version if got else None, policy, seen,
        reply, tuple(problems), tuple(_outcome_dict(o) for o in outcomes),
        wire.of(f"mx.{domain}"),
    )  # fmt: skip


def format_cells(cells: Sequence[DaneCellResult]) -> str:
    if not cells:
        return ""
    w = max(len(c.scenario.name) for c in cells) + 2
    lines = [f"{'DANE / REQUIRETLS':<{w}} dane              policy  RFC"]
    for c in cells:
        lines.append(f"{c.scenario.name:<{w}} {c.grid_text():<17} {c.policy:<7} {c.scenario.rfc}")
    for c in cells:
        for p in c.problems:
            lines.append(f"MISMATCH {c.scenario.name}: {p}")
    return "\n".join(lines)
