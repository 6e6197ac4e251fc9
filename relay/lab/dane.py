"""The lab's DANE (RFC 7672) and REQUIRETLS (RFC 8689) cells, on real parts: zones signed
with dnspython on a lab authoritative server behind a validating unbound (lab trust
anchor, relay/lab/unbound.py), receiving MTAs on 127.0.0.3x with lab-CA certificates,
and the relay's own delivery code (relay.delivery.courier, resolving through unbound).

One cell per scenario (mode ``dane``). Each cell's expectation cites the RFC section.
What is not the full relay here: messages go to the courier as the scheduler would hand
them over (the REQUIRETLS flag read back from a real spool after the real intake), and
the MTA-STS policy of the "DANE + MTA-STS" cell is given to the courier (an enforce
policy whose mx patterns exclude the host), not fetched from a policy host.

When unbound is missing, the cells are skipped, naming the Debian package.
"""

from __future__ import annotations

import hashlib
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.config import Config, DeliveryConfig, ServerConfig
from relay.delivery.courier import Courier
from relay.dns import CachingResolver, DnspythonResolver
from relay.lab.mta import LabMta
from relay.lab.signedzone import SignedZone
from relay.lab.unbound import UNBOUND_PACKAGE, ValidatingResolver, missing
from relay.model import (
    ConnInfo,
    DeliveryJob,
    Envelope,
    RecipientState,
    StsMode,
    TlsOutcome,
    TlsPolicy,
)

ZONE = "dane.lab.test"
INSECURE_ZONE = "insecure.lab.test"


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


async def _requiretls_flags(tmp: Path, data: bytes) -> tuple[bool, bool]:
    """(requiretls, tls_required) as the real intake stores them and the scheduler reads
    them, for a message sent with MAIL FROM ... REQUIRETLS."""
    from relay.intake import Intake
    from relay.queue.spool import FLAG_NO_TLS_REQUIRED, FLAG_REQUIRETLS, Spool
    from relay.store import Store

    store = Store(tmp / "intake.sqlite3").open()
    try:
        spool = Spool(store)
        env = Envelope("lab@sender.lab.test", ("x@example.org",), requiretls=True)
        conn = ConnInfo("127.0.0.1", 1, "client.lab.test", tls_version="TLSv1.3", trusted=True)
        reply = await Intake(Config(path=tmp / "c.toml"), spool).submit(conn, env, data)
        msg = await spool.get(reply.rsplit(" ", 1)[-1])
        assert msg is not None
        return bool(msg.flags & FLAG_REQUIRETLS), not msg.flags & FLAG_NO_TLS_REQUIRED
    finally:
        store.close()


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
    """The built lab: signed and insecure zones, one MTA per cell, the relay config."""

    signed: SignedZone
    insecure: SignedZone
    mtas: dict[str, LabMta]
    port: int
    config: Config

    async def stop(self) -> None:
        for m in self.mtas.values():
            await m.stop()


async def build_lab(
    chosen: Sequence[DaneScenario], tmp: Path, *, tlsa_ports: Sequence[int] = (25,)
) -> DaneLabSetup:
    """Certificates, MTAs on 127.0.0.3x (one port for all) and the zones of the cells;
    TLSA records at ``_<port>._tcp.<mx>`` for each of ``tlsa_ports`` and the MTAs' port
    (Postfix looks them up at the port it connects to)."""
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    signed, insecure = SignedZone(ZONE), SignedZone(INSECURE_ZONE, signed=False)
    mtas: dict[str, LabMta] = {}
    port = 0
    pems: dict[str, bytes] = {}
    for i, s in enumerate(chosen):
        zone = signed if s.zone == "signed" else insecure
        mx = f"mx.{s.name}.{zone.origin}"
        ctx, pems[s.name] = _tls(ca, mx, s.cert, tmp)
        mta = LabMta(f"127.0.0.{30 + i}", port, tls_context=ctx, hostname=mx)
        await mta.start()
        port = mta.port  # every MTA on the same port ([delivery] port)
        mtas[s.name] = mta
    for s in chosen:
        zone = signed if s.zone == "signed" else insecure
        domain = f"{s.name}.{zone.origin}"
        mx = f"mx.{domain}"
        zone.add(f"{domain}.", "MX", f"10 {mx}.").add(f"{mx}.", "A", mtas[s.name].host)
        for p in dict.fromkeys([*tlsa_ports, port]):
            owner = f"_{p}._tcp.{mx}."
            if s.tlsa == "ee":
                zone.add(owner, "TLSA", f"3 1 1 {_spki(pems[s.name])}")
            elif s.tlsa == "ee-wrong":
                zone.add(owner, "TLSA", "3 1 1 " + "00" * 32)
            elif s.tlsa == "ta":
                zone.add(owner, "TLSA", f"2 0 1 {_cert_digest(ca.cert_pem.bytes())}")
            if s.bogus:
                signed.bogus.add((owner, "TLSA"))
    config = Config(
        path=tmp / "config.toml",
        server=ServerConfig(hostname="relay.lab.test"),
        delivery=DeliveryConfig(
            port=port, ca_file=ca_file, connect_timeout=2.0, attempt_timeout=10.0
        ),
    )
    return DaneLabSetup(signed, insecure, mtas, port, config)


async def _run(chosen: list[DaneScenario], tmp: Path) -> list[DaneCellResult]:
    lab = await build_lab(chosen, tmp)
    results: list[DaneCellResult] = []
    try:
        with ValidatingResolver([lab.signed, lab.insecure]) as unbound:
            for s in chosen:
                results.append(await _cell(s, lab.config, unbound, lab.mtas[s.name], tmp))
    finally:
        await lab.stop()
    return results


async def _cell(
    s: DaneScenario, config: Config, unbound: ValidatingResolver, mta: LabMta, tmp: Path
) -> DaneCellResult:
    zone = ZONE if s.zone == "signed" else INSECURE_ZONE
    domain = f"{s.name}.{zone}"
    outcomes: list[TlsOutcome] = []
    policy = None
    if s.sts:  # an enforce policy whose mx patterns exclude the DANE host
        policy = TlsPolicy(domain, StsMode.ENFORCE, ("mx.elsewhere.lab.test",), 86400, "lab1")

    async def lookup(d: str) -> TlsPolicy:
        return policy or TlsPolicy(d)

    data = f"From: lab@sender.lab.test\r\nTo: x@{domain}\r\nSubject: {s.name}\r\n\r\nlab\r\n"
    if s.tls_required_no:
        data = "TLS-Required: No\r\n" + data
    requiretls, tls_required = False, True
    if s.requiretls:
        requiretls, tls_required = await _requiretls_flags(tmp / s.name, data.encode())
    job = DeliveryJob(
        f"L{int(time.time() * 1000) % 10**9}", domain, "lab@sender.lab.test", (f"x@{domain}",),
        data.encode(), tls_required=tls_required, requiretls=requiretls,
    )  # fmt: skip
    resolver = CachingResolver(DnspythonResolver([unbound.address], timeout=3))
    courier = Courier(
        config, resolver, policy_lookup=lookup, outcome_sink=outcomes.append, idle_timeout=0
    )
    before = len(mta.messages)
    try:
        res = await courier.deliver(job)
    finally:
        await courier.close()
    r = res.recipients[0]
    delivered = r.state is RecipientState.DELIVERED and len(mta.messages) > before
    got = mta.messages[-1] if delivered else None
    transport = ("tls" if got.tls_version else "clear") if got is not None else None
    seen = tuple(sorted({o.result_type.value if o.result_type else "success" for o in outcomes}))
    problems = []
    if delivered != s.delivered:
        problems.append(f"delivered {delivered}, expected {s.delivered}")
    if delivered and transport != s.transport:
        problems.append(f"transport {transport}, expected {s.transport}")
    if res.tls_policy and res.tls_policy != s.policy:
        problems.append(f"policy {res.tls_policy}, expected {s.policy}")
    if set(seen) != set(s.results):
        problems.append(f"TLS-RPT results {list(seen)}, expected {sorted(s.results)}")
    if not delivered and s.reply and not r.reply.startswith(s.reply):
        problems.append(f"reply {r.reply!r}, expected {s.reply}")
    return DaneCellResult(
        s, domain, delivered, transport, got.tls_version if got else None,
        res.tls_policy or s.policy, seen, "" if delivered else r.reply, tuple(problems),
        tuple(_outcome_dict(o) for o in outcomes),
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
