"""ARC sealing and validation behaviour: seals verify (dkimpy and ours), i=2 by a second
sealer, cv=fail over broken chains, the 50-set limit, structure checks before any DNS,
weak keys refused, the process pool, and the real lab DNS server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.auth.arc import (
    ArcSealer,
    SealerSpec,
    arc_structure,
    seal_async,
    validate_arc,
    verify_dkim_and_arc,
)
from relay.auth.dkim import DkimSigner
from relay.auth.fastrsa import KeyTooSmallError
from relay.auth.offload import make_crypto_pool
from relay.auth.types import ArcCv, ArcResult
from relay.commands.keygen import generate
from relay.dns import DnspythonResolver, StaticResolver
from relay.lab.dnsserver import LabDnsServer, Zone

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: list@lists.example.org\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"\r\n" + b"Body line one.\r\n" * 20
)
AR1 = "relay1.example.net; spf=pass smtp.mailfrom=example.com; dmarc=pass header.from=example.com"
AR2 = "relay2.example.org; arc=pass header.oldest-pass=1; dmarc=fail header.from=example.com"


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[bytes, str]]:
    out = {}
    for name, algo in (("one", "rsa"), ("two", "rsa"), ("ed", "ed25519")):
        k = generate(algo)
        out[name] = (k.private_pem, k.record())
    return out


@pytest.fixture
def resolver(keys: dict[str, tuple[bytes, str]]) -> StaticResolver:
    return StaticResolver(
        {
            ("one._domainkey.relay1.example.net", "TXT"): keys["one"][1],
            ("two._domainkey.relay2.example.org", "TXT"): keys["two"][1],
            ("ed._domainkey.relay3.example.com", "TXT"): keys["ed"][1],
        }
    )


def _dnsfunc(resolver: StaticResolver):  # type: ignore[no-untyped-def]
    def get(name: bytes, timeout: int = 5) -> bytes:
        value = resolver.records[(name.decode().rstrip(".").lower(), "TXT")]
        assert isinstance(value, list)
        return str(value[0]).encode()

    return get


def sealer(keys: dict[str, tuple[bytes, str]], which: str) -> ArcSealer:
    domain = {
        "one": "relay1.example.net",
        "two": "relay2.example.org",
        "ed": "relay3.example.com",
    }[which]
    return ArcSealer(domain, which, keys[which][0], domain)


async def test_seal_verifies_with_dkimpy_and_ours_then_second_hop(
    keys: dict[str, tuple[bytes, str]], resolver: StaticResolver
) -> None:
    chain0 = await validate_arc(resolver, MESSAGE)
    assert chain0 == ArcResult(ArcCv.NONE, reason="no ARC sets")
    hop1 = sealer(keys, "one").seal(MESSAGE, AR1, chain0)
    assert hop1.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=relay1.example.net")
    assert b"ARC-Authentication-Results: i=1; " + AR1.encode() + b"\r\n" in hop1
    assert hop1.endswith(MESSAGE)
    cv, _, reason = dkim.arc_verify(hop1, dnsfunc=_dnsfunc(resolver))
    assert cv == dkim.CV_Pass, reason
    chain1 = await validate_arc(resolver, hop1)
    assert (chain1.cv, chain1.instances, chain1.oldest_pass) == (ArcCv.PASS, 1, 1)
    assert chain1.sealers == ("relay1.example.net",)
    assert chain1.first_aar_dmarc == "pass"

    # the list hop validates, then changes the Subject (as lists do) and seals i=2
    modified = hop1.replace(b"Subject: hello", b"Subject: [list] hello")
    hop2 = sealer(keys, "two").seal(modified, AR2, chain1)
    cv, results, reason = dkim.arc_verify(hop2, dnsfunc=_dnsfunc(resolver))
    assert cv == dkim.CV_Pass, reason
    chain2 = await validate_arc(resolver, hop2)
    assert chain2.cv == ArcCv.PASS and chain2.instances == 2
    assert chain2.sealers == ("relay1.example.net", "relay2.example.org")
    assert chain2.oldest_pass == 2  # the i=1 AMS no longer covers the changed Subject
    assert chain2.first_aar_dmarc == "pass"
    assert [r["ams-valid"] for r in results] == [True, False]


async def test_ed25519_sealer_validates_with_ours(
    keys: dict[str, tuple[bytes, str]], resolver: StaticResolver
) -> None:
    hop1 = sealer(keys, "ed").seal(MESSAGE, AR1, ArcResult(ArcCv.NONE))
    assert b"a=ed25519-sha256" in hop1
    chain = await validate_arc(resolver, hop1)
    assert chain.cv == ArcCv.PASS, chain.reason
    hop2 = sealer(keys, "one").seal(hop1, AR1, chain)
    assert (await validate_arc(resolver, hop2)).cv == ArcCv.PASS


async def test_broken_chain_is_sealed_cv_fail_over_own_set_only(
    keys: dict[str, tuple[bytes, str]], resolver: StaticResolver
) -> None:
    hop1 = sealer(keys, "one").seal(MESSAGE, AR1, ArcResult(ArcCv.NONE))
    tampered = hop1.replace(b"Body line one.", b"Body line 1!!", 1)  # breaks the AMS body hash
    chain = await validate_arc(resolver, tampered)
    assert chain.cv == ArcCv.FAIL and chain.instances == 1
    hop2 = sealer(keys, "two").seal(tampered, AR2, chain)
    assert hop2.startswith(b"ARC-Seal: i=2; cv=fail;")
    after = await validate_arc(resolver, hop2)
    assert after.cv == ArcCv.FAIL and "cv=fail" in after.reason
    cv, _, _ = dkim.arc_verify(hop2, dnsfunc=_dnsfunc(resolver))
    assert cv is None  # dkimpy: chain terminated by a cv=fail seal
    # the new seal signs only its own set: with the i=1 set removed it still verifies
    head, body = hop2.split(b"\r\n\r\n", 1)
    fields = re.split(rb"\r\n(?![ \t])", head)
    kept = [f for f in fields if not (f.startswith(b"ARC-") and b" i=1;" in f)]
    own = b"\r\n".join(kept) + b"\r\n\r\n" + body
    _, results, _ = dkim.arc_verify(own, dnsfunc=_dnsfunc(resolver))
    assert results[0]["instance"] == 2 and results[0]["as-valid"] and results[0]["ams-valid"]


def _fake_sets(count: int, skip: int = 0, dup: int = 0) -> bytes:
    out = b""
    for i in range(count, 0, -1):
        if i == skip:
            continue
        cv = b"none" if i == 1 else b"pass"
        for _ in range(2 if i == dup else 1):
            out += b"ARC-Seal: i=%d; cv=%s; a=rsa-sha256; d=s%d.example; s=x; b=AAAA\r\n" % (
                i,
                cv,
                i,
            )
            out += (
                b"ARC-Message-Signature: i=%d; a=rsa-sha256; d=s%d.example; s=x; h=from; "
                b"bh=AAAA; b=AAAA\r\n" % (i, i)
            )
            out += b"ARC-Authentication-Results: i=%d; s%d.example; dmarc=pass\r\n" % (i, i)
    return out + MESSAGE


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (_fake_sets(51), "more than 50 ARC sets"),
        (_fake_sets(3, skip=2), "i=2 is missing"),
        (_fake_sets(3, dup=2), "i=2 is duplicated"),
        (b"ARC-Seal: cv=none; a=rsa-sha256; d=x; s=y; b=AA\r\n" + MESSAGE, "invalid i= tag"),
        (b"ARC-Seal: i=0; cv=none; a=rsa-sha256; d=x; s=y; b=AA\r\n" + MESSAGE, "invalid i="),
    ],
)
async def test_structure_fails_before_any_dns(message: bytes, reason: str) -> None:
    resolver = StaticResolver()
    result = await validate_arc(resolver, message)
    assert result.cv == ArcCv.FAIL and reason in result.reason
    assert resolver.queries == []  # decided from the header fields alone


def test_structure_is_cheap_on_huge_header_blocks() -> None:
    msg = _fake_sets(50) + b""
    huge = b"X-Pad: " + b"a" * 200_000 + b"\r\n" + msg
    s = arc_structure(huge)
    assert s.instances == 50 and not s.failure


async def test_never_seals_over_fifty_sets(keys: dict[str, tuple[bytes, str]]) -> None:
    msg = _fake_sets(50)
    chain = ArcResult(ArcCv.PASS, instances=50)
    assert sealer(keys, "one").seal(msg, AR1, chain) == msg


def test_refuses_small_rsa_keys() -> None:
    small = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(KeyTooSmallError, match="1024 bits; at least 2048"):
        ArcSealer("example.net", "s", small, "example.net")


async def test_seal_async_in_process_pool_matches_inline(
    keys: dict[str, tuple[bytes, str]], resolver: StaticResolver
) -> None:
    spec = SealerSpec("relay1.example.net", "one", keys["one"][0], "relay1.example.net")
    chain = ArcResult(ArcCv.NONE)
    pool = make_crypto_pool(2)
    try:
        sealed = [
            m.raw
            for m in await asyncio.gather(
                *(seal_async(spec, MESSAGE, AR1, chain, executor=pool) for _ in range(4))
            )
        ]
        signed = DkimSigner("relay1.example.net", "one", keys["one"][0]).sign(MESSAGE)
        dkim_res, arc_res = await verify_dkim_and_arc(resolver, sealed[0], executor=pool)
        both = await verify_dkim_and_arc(resolver, signed, executor=pool)
    finally:
        pool.shutdown()
    inline = (await seal_async(spec, MESSAGE, AR1, chain)).raw
    # RSA PKCS#1 v1.5 is deterministic: same second, same bytes
    if sealed[0].split(b"t=")[1][:10] == inline.split(b"t=")[1][:10]:
        assert sealed[0] == inline
    assert arc_res.cv == ArcCv.PASS and dkim_res == ()
    assert [r.result for r in both[0]] == ["pass"] and both[1].cv == ArcCv.NONE


@pytest.fixture
def lab_dns(keys: dict[str, tuple[bytes, str]]) -> Iterator[LabDnsServer]:
    zone = Zone()
    zone.add("one._domainkey.relay1.example.net", "TXT", keys["one"][1])
    zone.add("two._domainkey.relay2.example.org", "TXT", keys["two"][1])
    with LabDnsServer(zone) as server:
        yield server


async def test_lab_dns_end_to_end(
    keys: dict[str, tuple[bytes, str]], lab_dns: LabDnsServer
) -> None:
    resolver = DnspythonResolver([lab_dns.address], timeout=2)
    signed = DkimSigner("relay2.example.org", "two", keys["two"][0]).sign(MESSAGE)
    sealed = sealer(keys, "one").seal(signed, AR1, await validate_arc(resolver, signed))
    dkim_res, arc_res = await verify_dkim_and_arc(resolver, sealed)
    assert [(r.result, r.domain) for r in dkim_res] == [("pass", "relay2.example.org")]
    assert arc_res.cv == ArcCv.PASS
    lab_dns.zone.fail("two._domainkey.relay2.example.org", "SERVFAIL")
    lab_dns.zone.fail("one._domainkey.relay1.example.net", "NXDOMAIN")
    fresh = DnspythonResolver([lab_dns.address], timeout=1, tries=1)  # no cached answers
    dkim_res, arc_res = await verify_dkim_and_arc(fresh, sealed)
    assert [(r.result, r.reason) for r in dkim_res] == [("temperror", "DNS temporary failure")]
    assert arc_res.cv == ArcCv.FAIL
