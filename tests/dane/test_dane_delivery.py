"""DANE in delivery, end to end on real parts: the courier resolves through a validating
unbound (lab trust anchor, zones signed with dnspython) and delivers to aiosmtpd MTAs
on 127.0.0.x with trustme certificates. Each test names the RFC 7672 rule it shows."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.config import Config, DeliveryConfig, ServerConfig
from relay.delivery.courier import Courier
from relay.dns import CachingResolver, DnspythonResolver
from relay.lab.signedzone import SignedZone
from relay.lab.unbound import ValidatingResolver
from relay.model import (
    AttemptResult,
    DeliveryJob,
    PolicyType,
    RecipientState,
    StsMode,
    TlsOutcome,
    TlsPolicy,
)
from tests.delivery.mxlab import MxServer, Recorder, free_port
from tests.smtp.test_inbound_harness import make_config, running

pytestmark = pytest.mark.asyncio(loop_scope="module")

DATA = b"From: a@sender.test\r\nTo: b@x\r\nSubject: dane\r\n\r\nhello\r\n"


def _spki_sha256(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _cert_sha256(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@dataclass
class DaneLab:
    tmp: Path
    port: int
    ca: trustme.CA
    unbound: ValidatingResolver
    servers: dict[str, MxServer] = field(default_factory=dict)
    outcomes: list[TlsOutcome] = field(default_factory=list)

    rt_ctx: ssl.SSLContext | None = None  # the REQUIRETLS-capable hop (relay's own server)

    def config(self, port: int | None = None) -> Config:
        ca_file = self.tmp / "lab-ca.pem"
        self.ca.cert_pem.write_to_path(str(ca_file))
        return Config(
            path=self.tmp / "config.toml",
            server=ServerConfig(hostname="relay.lab.test"),
            delivery=DeliveryConfig(
                port=port or self.port, ca_file=ca_file, connect_timeout=2.0, attempt_timeout=10.0
            ),
        )

    def courier(
        self, policy: TlsPolicy | None = None, port: int | None = None, idle: float = 0
    ) -> Courier:
        resolver = CachingResolver(DnspythonResolver([self.unbound.address], timeout=3))

        async def lookup(domain: str) -> TlsPolicy:
            return policy or TlsPolicy(domain)

        return Courier(
            self.config(port),
            resolver,
            policy_lookup=lookup,
            outcome_sink=self.outcomes.append,
            idle_timeout=idle,
        )


# (domain, MX hosts as (name, ip suffix, server cert kind, TLSA records as text))
HOSTS = {
    "mx.ee-ok": (10, "good", "ee"),
    "mx.ee-bad": (11, "good", "ee-wrong"),
    "mx.ta-ok": (12, "good+ca", "ta"),
    "mx.bogus": (13, "good", "ee"),
    "mx.stripped": (14, "none", "ee"),
    "mx1.two": (15, "good", "ee-wrong"),
    "mx2.two": (16, "good", "ee"),
    "mx.unusable": (17, "good", "pkix"),
    "mx.unusable-clear": (18, "none", "pkix"),
    "mx.sts": (19, "good", "ee"),
}


def _server_tls(
    ca: trustme.CA, name: str, kind: str, tmp: Path
) -> tuple[ssl.SSLContext | None, bytes]:
    """The server's SSL context and the leaf certificate it presents (PEM)."""
    leaf = ca.issue_cert(name)
    leaf_pem = leaf.cert_chain_pems[0].bytes()
    if kind == "none":
        return None, leaf_pem
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if kind == "good+ca":  # DANE-TA: the server sends the trust anchor too (RFC 7672 3.1.2)
        chain = tmp / f"{name}.pem"
        chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes())
        key = tmp / f"{name}.key"
        key.write_bytes(leaf.private_key_pem.bytes())
        ctx.load_cert_chain(str(chain), str(key))
    else:
        leaf.configure_cert(ctx)
    return ctx, leaf_pem


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dane_lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DaneLab]:
    tmp = tmp_path_factory.mktemp("dane")
    ca = trustme.CA()
    port = free_port()
    zone = SignedZone("dane.test")
    servers: dict[str, MxServer] = {}
    for short, (n, kind, tlsa) in HOSTS.items():
        name = f"{short}.dane.test"
        ctx, leaf_pem = _server_tls(ca, name, kind, tmp)
        srv = MxServer(f"127.0.0.{n}", port, name, ctx, Recorder())
        await srv.start()
        servers[short] = srv
        domain = short.split(".", 1)[1] + ".dane.test"
        zone.add(domain + ".", "MX", f"{20 if short.startswith('mx2') else 10} {name}.")
        zone.add(name + ".", "A", srv.ip)
        owner = f"_25._tcp.{name}."
        if tlsa == "ee":
            zone.add(owner, "TLSA", f"3 1 1 {_spki_sha256(leaf_pem)}")
        elif tlsa == "ee-wrong":
            zone.add(owner, "TLSA", "3 1 1 " + "00" * 32)
        elif tlsa == "ta":
            zone.add(owner, "TLSA", f"2 0 1 {_cert_sha256(ca.cert_pem.bytes())}")
        elif tlsa == "pkix":  # PKIX-EE: unusable for SMTP (RFC 7672 3.1.3)
            zone.add(owner, "TLSA", f"1 1 1 {_spki_sha256(leaf_pem)}")
    zone.bogus.add(("_25._tcp.mx.bogus.dane.test.", "TLSA"))
    # an unsigned zone whose TLSA record would not match: ignored (RFC 7672 2.2)
    ctx, _ = _server_tls(ca, "mx.insecure.test", "good", tmp)
    ins = MxServer("127.0.0.20", port, "mx.insecure.test", ctx, Recorder())
    await ins.start()
    servers["insecure"] = ins
    insecure = SignedZone("insecure.test", signed=False)
    insecure.add("@", "MX", "10 mx.insecure.test.").add("mx", "A", ins.ip)
    insecure.add("_25._tcp.mx", "TLSA", "3 1 1 " + "00" * 32)
    # the REQUIRETLS-capable hop: relay's own SMTP server on 127.0.0.1 (its own port),
    # reached through DANE (rt.dane.test) or through MTA-STS (rt.insecure.test)
    rt_leaf = ca.issue_cert("mx.rt.dane.test", "mx.rt.insecure.test")
    rt_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    rt_leaf.configure_cert(rt_ctx)
    zone.add("rt.dane.test.", "MX", "10 mx.rt.dane.test.").add("mx.rt.dane.test.", "A", "127.0.0.1")
    spki = _spki_sha256(rt_leaf.cert_chain_pems[0].bytes())
    zone.add("_25._tcp.mx.rt.dane.test.", "TLSA", f"3 1 1 {spki}")
    insecure.add("rt", "MX", "10 mx.rt.insecure.test.").add("mx.rt", "A", "127.0.0.1")
    with ValidatingResolver([zone, insecure]) as unbound:
        yield DaneLab(tmp, port, ca, unbound, servers, rt_ctx=rt_ctx)
    for s in servers.values():
        await s.stop()


def _job(domain: str, requiretls: bool = False) -> DeliveryJob:
    return DeliveryJob(
        "Q1", domain, "alice@sender.test", (f"bob@{domain}",), DATA, "<m@x>",
        requiretls=requiretls,
    )  # fmt: skip


async def _deliver(
    lab: DaneLab,
    domain: str,
    policy: TlsPolicy | None = None,
    *,
    requiretls: bool = False,
    port: int | None = None,
) -> AttemptResult:
    courier = lab.courier(policy, port)
    lab.outcomes.clear()
    try:
        return await courier.deliver(_job(domain, requiretls))
    finally:
        await courier.close()


def _got(lab: DaneLab, short: str) -> int:
    return len(lab.servers[short].recorder.messages)


async def test_dane_ee_match_delivers_over_dane(dane_lab: DaneLab) -> None:
    """RFC 7672 3.1.1: a DANE-EE record matching the leaf's key authenticates the host."""
    before = _got(dane_lab, "mx.ee-ok")
    res = await _deliver(dane_lab, "ee-ok.dane.test")
    assert res.recipients[0].state is RecipientState.DELIVERED, res
    assert res.tls_policy == "dane"
    assert _got(dane_lab, "mx.ee-ok") == before + 1
    (out,) = dane_lab.outcomes
    assert out.policy_type is PolicyType.TLSA and out.result_type is None
    assert out.policy_strings and out.policy_strings[0].startswith("3 1 1 ")


async def test_dane_ee_mismatch_defers_never_clear(dane_lab: DaneLab) -> None:
    """RFC 7672 2.2, 3: no TLSA record matches: the host is refused, mail deferred."""
    before = _got(dane_lab, "mx.ee-bad")
    res = await _deliver(dane_lab, "ee-bad.dane.test")
    r = res.recipients[0]
    assert r.state is RecipientState.DEFERRED and r.reply.startswith("451 4.7.5"), r
    assert "DANE" in r.reply and res.tls_policy == "dane"
    assert _got(dane_lab, "mx.ee-bad") == before
    (out,) = dane_lab.outcomes
    assert (out.policy_type, out.result_type) == (PolicyType.TLSA, "validation-failure")
    assert out.enforced


async def test_dane_ta_match_with_name_check(dane_lab: DaneLab) -> None:
    """RFC 7672 3.1.2, 3.2.2: DANE-TA: the chain leads to the TA, the leaf names the MX."""
    res = await _deliver(dane_lab, "ta-ok.dane.test")
    assert res.recipients[0].state is RecipientState.DELIVERED, res
    assert res.tls_policy == "dane"


async def test_bogus_tlsa_defers_without_connecting(dane_lab: DaneLab) -> None:
    """RFC 7672 2.2: a TLSA RRset that fails validation: the host is not used."""
    conns = dane_lab.servers["mx.bogus"].connections
    res = await _deliver(dane_lab, "bogus.dane.test")
    r = res.recipients[0]
    assert r.state is RecipientState.DEFERRED and r.reply.startswith("451 4.7.5"), r
    assert dane_lab.servers["mx.bogus"].connections == conns
    (out,) = dane_lab.outcomes
    assert (out.policy_type, out.result_type) == (PolicyType.TLSA, "dnssec-invalid")


async def test_starttls_stripped_with_tlsa_defers(dane_lab: DaneLab) -> None:
    """RFC 7672 2.2: TLSA records make STARTTLS mandatory; no clear text."""
    before = _got(dane_lab, "mx.stripped")
    res = await _deliver(dane_lab, "stripped.dane.test")
    assert res.recipients[0].state is RecipientState.DEFERRED, res
    assert _got(dane_lab, "mx.stripped") == before
    (out,) = dane_lab.outcomes
    assert out.result_type == "starttls-not-supported"


async def test_next_mx_is_tried_after_a_dane_failure(dane_lab: DaneLab) -> None:
    res = await _deliver(dane_lab, "two.dane.test")
    assert res.recipients[0].state is RecipientState.DELIVERED, res
    assert res.mx_host == "mx2.two.dane.test"
    assert [o.result_type for o in dane_lab.outcomes] == ["validation-failure", None]


async def test_only_unusable_records_mean_mandatory_unauthenticated_tls(
    dane_lab: DaneLab,
) -> None:
    """RFC 7672 2.2, 3.1.3: PKIX-EE only: encrypted TLS required, no authentication."""
    res = await _deliver(dane_lab, "unusable.dane.test")
    assert res.recipients[0].state is RecipientState.DELIVERED, res
    assert [o.result_type for o in dane_lab.outcomes] == ["tlsa-invalid"]
    before = _got(dane_lab, "mx.unusable-clear")
    res = await _deliver(dane_lab, "unusable-clear.dane.test")
    assert res.recipients[0].state is RecipientState.DEFERRED, res
    assert _got(dane_lab, "mx.unusable-clear") == before


async def test_insecure_zone_tlsa_is_ignored(dane_lab: DaneLab) -> None:
    """RFC 7672 2.2: a TLSA RRset that is not DNSSEC-secure is not used: opportunistic."""
    res = await _deliver(dane_lab, "insecure.test")
    assert res.recipients[0].state is RecipientState.DELIVERED, res
    assert res.tls_policy == "none"
    assert all(o.policy_type is not PolicyType.TLSA for o in dane_lab.outcomes)


async def test_dane_takes_precedence_over_mta_sts(dane_lab: DaneLab) -> None:
    """RFC 8461 2: an enforce policy whose mx patterns exclude the host does not stop a
    DANE host (DANE wins); the attempt records policy dane."""
    policy = TlsPolicy(
        "sts.dane.test", StsMode.ENFORCE, ("elsewhere.example",), 86400, "id1", ("version: STSv1",)
    )
    res = await _deliver(dane_lab, "sts.dane.test", policy)
    assert res.recipients[0].state is RecipientState.DELIVERED, res
    assert res.tls_policy == "dane"
    assert [o.policy_type for o in dane_lab.outcomes] == [PolicyType.TLSA]


# ---------------------------------------------------------------- relay dane check


async def _dane_check(
    lab: DaneLab, domain: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, object]]:
    from relay.cli import main

    cfg = lab.tmp / "dane-check.toml"
    cfg.write_text(
        f'[dns]\nnameservers = ["{lab.unbound.address}"]\ntimeout = 3\n'
        f"[delivery]\nport = {lab.port}\nconnect_timeout = 2\n"
    )
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["dane", "check", domain, "--config", str(cfg), "--json"])
    return code, json.loads(capsys.readouterr().out)


def main_text(argv: list[str]) -> int:
    from relay.cli import main

    return main(argv)


async def test_dane_check_match(dane_lab: DaneLab, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = await _dane_check(dane_lab, "ee-ok.dane.test", capsys)
    assert code == 0 and out["verdict"] == "dane" and out["mx_secure"] is True
    assert set(out) >= {"domain", "mx_secure", "hosts", "verdict"}
    (host,) = out["hosts"]  # type: ignore[misc]
    assert host["host"] == "mx.ee-ok.dane.test" and host["address_secure"] is True
    assert host["tlsa"][0]["usage"] == 3 and host["tlsa"][0]["usable"] is True
    assert set(host["tlsa"][0]) == {"usage", "selector", "mtype", "data", "usable"}
    assert host["probe"] == {"starttls": True, "matched": True, "error": None}
    code = await asyncio.to_thread(
        main_text,
        ["dane", "check", "ee-ok.dane.test", "--config", str(dane_lab.tmp / "dane-check.toml")],
    )
    text = capsys.readouterr().out
    assert code == 0 and "verdict: dane" in text and "TLSA 3 1 1" in text, text


async def test_dane_check_mismatch_stripped_bogus_are_failures(
    dane_lab: DaneLab, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await _dane_check(dane_lab, "ee-bad.dane.test", capsys)
    assert (code, out["verdict"]) == (2, "dane-failure")
    assert out["hosts"][0]["probe"]["matched"] is False  # type: ignore[index]
    code, out = await _dane_check(dane_lab, "stripped.dane.test", capsys)
    assert code == 2 and out["hosts"][0]["probe"]["starttls"] is False  # type: ignore[index]
    code, out = await _dane_check(dane_lab, "bogus.dane.test", capsys)
    assert code == 2 and out["hosts"][0]["state"] == "defer"  # type: ignore[index]


async def test_dane_check_insecure_zone_is_no_dane(
    dane_lab: DaneLab, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await _dane_check(dane_lab, "insecure.test", capsys)
    assert (code, out["verdict"], out["mx_secure"]) == (1, "no-dane", False)


# ---------------------------------------------------------------- REQUIRETLS (RFC 8689)


async def test_requiretls_to_a_dane_hop_without_requiretls_fails_5_7_30(dane_lab: DaneLab) -> None:
    """RFC 8689 4.2.1 item 4: the next hop must advertise REQUIRETLS."""
    before = _got(dane_lab, "mx.ee-ok")
    res = await _deliver(dane_lab, "ee-ok.dane.test", requiretls=True)
    r = res.recipients[0]
    assert r.state is RecipientState.FAILED and r.reply.startswith("550 5.7.30"), r
    assert "does not advertise REQUIRETLS" in r.reply
    assert _got(dane_lab, "mx.ee-ok") == before


async def test_requiretls_with_only_opportunistic_tls_fails_5_7_30(dane_lab: DaneLab) -> None:
    """RFC 8689 4.2.1 items 1-2: no DANE, no MTA-STS: not even a connection."""
    conns = dane_lab.servers["insecure"].connections
    res = await _deliver(dane_lab, "insecure.test", requiretls=True)
    r = res.recipients[0]
    assert r.state is RecipientState.FAILED and r.reply.startswith("550 5.7.30"), r
    assert dane_lab.servers["insecure"].connections == conns


async def test_requiretls_over_dane_to_a_requiretls_hop(dane_lab: DaneLab) -> None:
    """RFC 8689 4.2.1: secure MX + DANE match + REQUIRETLS on MAIL FROM: delivered."""
    async with running(make_config(dane_lab.tmp), ssl_context=dane_lab.rt_ctx) as (_, rec, port):
        res = await _deliver(dane_lab, "rt.dane.test", requiretls=True, port=port)
        assert res.recipients[0].state is RecipientState.DELIVERED, res
        assert res.tls_policy == "dane"
        (_conn, env, _data) = rec.calls[-1]
        assert env.requiretls is True  # the next hop got MAIL FROM ... REQUIRETLS


async def test_requiretls_over_mta_sts_testing_needs_a_verified_session(dane_lab: DaneLab) -> None:
    """RFC 8689 4.2.1 items 2-3: an MTA-STS policy (testing is enough) listing the MX and a
    WebPKI-verified session; without the policy the same hop is refused."""
    policy = TlsPolicy(
        "rt.insecure.test", StsMode.TESTING, ("mx.rt.insecure.test",), 86400, "id1", ()
    )
    async with running(make_config(dane_lab.tmp), ssl_context=dane_lab.rt_ctx) as (_, rec, port):
        res = await _deliver(dane_lab, "rt.insecure.test", policy, requiretls=True, port=port)
        assert res.recipients[0].state is RecipientState.DELIVERED, res
        assert res.tls_policy == "sts" and rec.calls[-1][1].requiretls is True
        res = await _deliver(dane_lab, "rt.insecure.test", requiretls=True, port=port)
        assert res.recipients[0].reply.startswith("550 5.7.30")


async def test_requiretls_never_reuses_a_weaker_pooled_connection(dane_lab: DaneLab) -> None:
    """RFC 8689 4.2.1: an opportunistic (unverified) session to the hop is pooled; the
    REQUIRETLS message after it goes on a new, verified connection."""
    policy = TlsPolicy(
        "rt.insecure.test", StsMode.TESTING, ("mx.rt.insecure.test",), 86400, "id1", ()
    )
    async with running(make_config(dane_lab.tmp), ssl_context=dane_lab.rt_ctx) as (_, rec, port):
        plain = dane_lab.courier(None, port, idle=5.0)
        try:
            first = await plain.deliver(_job("rt.insecure.test"))
            again = await plain.deliver(_job("rt.insecure.test"))
            assert first.recipients[0].state is RecipientState.DELIVERED
            assert again.recipients[0].state is RecipientState.DELIVERED
            assert rec.calls[-1][0].peer_port == rec.calls[-2][0].peer_port  # pooled
            plain.policy_lookup = _fixed(policy)
            res = await plain.deliver(_job("rt.insecure.test", requiretls=True))
        finally:
            await plain.close()
        assert res.recipients[0].state is RecipientState.DELIVERED, res
        assert rec.calls[-1][1].requiretls is True
        assert rec.calls[-1][0].peer_port != rec.calls[-2][0].peer_port  # a new connection


def _fixed(policy: TlsPolicy):  # type: ignore[no-untyped-def]
    async def lookup(domain: str) -> TlsPolicy:
        return policy

    return lookup
