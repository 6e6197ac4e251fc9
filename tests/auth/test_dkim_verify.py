"""verify_dkim behaviour: one result per signature with a plain reason."""

from __future__ import annotations

import pytest

from relay.auth.dkim import MAX_SIGNATURES, DkimSigner, verify_dkim
from relay.commands.keygen import generate
from relay.dns import StaticResolver

MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hi\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@example.com>\r\n\r\nHello.\r\n"
)


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, str]:
    k = generate("rsa")
    return k.private_pem, k.record()


@pytest.fixture(scope="module")
def ed_key() -> tuple[bytes, str]:
    k = generate("ed25519")
    return k.private_pem, k.record()


def _resolver(record: str) -> StaticResolver:
    return StaticResolver({("sel._domainkey.example.com", "TXT"): record})


async def test_pass_and_header_b(rsa_key: tuple[bytes, str]) -> None:
    signed = DkimSigner("example.com", "sel", rsa_key[0]).sign(MESSAGE)
    (res,) = await verify_dkim(_resolver(rsa_key[1]), signed)
    assert (res.result, res.domain, res.selector, res.algorithm) == (
        "pass",
        "example.com",
        "sel",
        "rsa-sha256",
    )
    b = signed.split(b" b=")[1].replace(b"\r\n ", b"")[:8].decode()
    assert res.b == b and len(res.b) == 8


async def test_ed25519_pass(ed_key: tuple[bytes, str]) -> None:
    signed = DkimSigner("example.com", "sel", ed_key[0]).sign(MESSAGE)
    (res,) = await verify_dkim(_resolver(ed_key[1]), signed)
    assert (res.result, res.algorithm) == ("pass", "ed25519-sha256")


async def test_body_changed(rsa_key: tuple[bytes, str]) -> None:
    signed = DkimSigner("example.com", "sel", rsa_key[0]).sign(MESSAGE)
    (res,) = await verify_dkim(_resolver(rsa_key[1]), signed.replace(b"Hello.", b"Hullo."))
    assert (res.result, res.reason) == ("fail", "body hash mismatch")


async def test_header_changed(rsa_key: tuple[bytes, str]) -> None:
    signed = DkimSigner("example.com", "sel", rsa_key[0]).sign(MESSAGE)
    (res,) = await verify_dkim(
        _resolver(rsa_key[1]), signed.replace(b"Subject: hi", b"Subject: ho")
    )
    assert (res.result, res.reason) == ("fail", "signature did not verify")


async def test_wrong_key(rsa_key: tuple[bytes, str]) -> None:
    signed = DkimSigner("example.com", "sel", rsa_key[0]).sign(MESSAGE)
    (res,) = await verify_dkim(_resolver(generate("rsa").record()), signed)
    assert (res.result, res.reason) == ("fail", "signature did not verify")


@pytest.mark.parametrize(
    ("dns", "result", "reason"),
    [
        ("NXDOMAIN", "permerror", "key not found"),
        ("SERVFAIL", "temperror", "DNS temporary failure"),
        ("TIMEOUT", "temperror", "DNS temporary failure"),
        ("v=DKIM1; k=rsa; p=", "permerror", "key revoked"),
        (
            "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
            "permerror",
            "does not match",
        ),
    ],
)
async def test_key_problems(rsa_key: tuple[bytes, str], dns: str, result: str, reason: str) -> None:
    signed = DkimSigner("example.com", "sel", rsa_key[0]).sign(MESSAGE)
    (res,) = await verify_dkim(_resolver(dns), signed)
    assert res.result == result and reason in res.reason, res


async def test_no_signature_and_only_needed_queries() -> None:
    r = StaticResolver()
    assert await verify_dkim(r, MESSAGE) == ()
    assert r.queries == []


async def test_rsa_sha1_refused(rsa_key: tuple[bytes, str]) -> None:
    signed = DkimSigner("example.com", "sel", rsa_key[0]).sign(MESSAGE)
    (res,) = await verify_dkim(
        _resolver(rsa_key[1]), signed.replace(b"a=rsa-sha256", b"a=rsa-sha1")
    )
    assert res.result == "permerror" and "RFC 8301" in res.reason


async def test_signature_cap_and_clock(rsa_key: tuple[bytes, str]) -> None:
    signed = MESSAGE
    for _ in range(MAX_SIGNATURES + 2):
        signed = DkimSigner("example.com", "sel", rsa_key[0], clock=lambda: 1700000000).sign(signed)
    results = await verify_dkim(_resolver(rsa_key[1]), signed, now=1700000000)
    assert [r.result for r in results] == ["pass"] * MAX_SIGNATURES + ["policy"] * 2
    # a signature dated far in the future of the verifier's clock is refused
    (res, *_) = await verify_dkim(_resolver(rsa_key[1]), signed, now=1600000000)
    assert res.result == "permerror" and "future" in res.reason
