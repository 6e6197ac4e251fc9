"""OpenSSL signing through dkimpy's canonicalisation: byte-identical to dkimpy's pure
Python RSA, and no change to dkimpy for anyone else."""

from __future__ import annotations

import dkim
import dkim.crypto
import pytest

from relay.auth.arc import ArcSealer
from relay.auth.fastrsa import (
    FastARC,
    FastDKIM,
    KeyTooSmallError,
    OpenSslKey,
    PurePythonRsaKey,
    load_signing_key,
)
from relay.auth.types import ArcCv, ArcResult
from relay.commands.keygen import generate

MESSAGE = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n" + b"x" * 4000 + b"\r\n"
)


@pytest.fixture(scope="module")
def pem() -> bytes:
    return generate("rsa", 2048).private_pem


def test_digest_signature_byte_identical(pem: bytes) -> None:
    fast = load_signing_key(pem)
    pure = PurePythonRsaKey.from_pem(pem)
    for i in range(5):
        digest = bytes([i]) * 32
        assert fast.sign(digest) == pure.sign(digest)


def test_full_seal_byte_identical_to_pure_python(pem: bytes) -> None:
    common = dict(clock=lambda: 1700000000.0)
    fast = ArcSealer("example.net", "s", pem, "example.net", **common)  # type: ignore[arg-type]
    pure = ArcSealer(
        "example.net",
        "s",
        pem,
        "example.net",
        key=PurePythonRsaKey.from_pem(pem),
        **common,  # type: ignore[arg-type]
    )
    assert isinstance(fast.key, OpenSslKey)
    ar = "example.net; spf=pass smtp.mailfrom=example.com"
    one = fast.seal(MESSAGE, ar, ArcResult(ArcCv.NONE))
    assert one == pure.seal(MESSAGE, ar, ArcResult(ArcCv.NONE))
    two = fast.seal(one, ar, ArcResult(ArcCv.PASS, instances=1))
    assert two == pure.seal(one, ar, ArcResult(ArcCv.PASS, instances=1))


def test_dkimpy_is_not_patched() -> None:
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim.crypto.RSASSA_PKCS1_v1_5_sign
    assert dkim.DKIM.gen_header is dkim.DomainSigner.gen_header
    assert dkim.ARC.verify_sig is dkim.DomainSigner.verify_sig
    assert FastDKIM.gen_header is not dkim.DKIM.gen_header
    assert issubclass(FastARC, dkim.ARC) and issubclass(FastDKIM, dkim.DKIM)


def test_key_loading_rules() -> None:
    small = generate("rsa", 2048)  # generate refuses < 2048; make a 1024 key directly
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    k = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem1024 = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyTooSmallError):
        load_signing_key(pem1024)
    assert load_signing_key(pem1024, min_rsa_bits=1024).bits == 1024
    assert load_signing_key(small.private_pem).algorithm == b"rsa-sha256"
    ed = load_signing_key(generate("ed25519").private_pem)
    assert (ed.algorithm, ed.bits) == (b"ed25519-sha256", 256)
    with pytest.raises(ValueError):
        load_signing_key(b"not a key")


def test_dkimpy_is_pinned_to_the_version_fastrsa_is_proven_against() -> None:
    """docs/design.md: fastrsa overrides dkimpy internals, so dkimpy is pinned exactly and
    checked at import."""
    import importlib.metadata
    import tomllib
    from pathlib import Path

    from relay.auth import fastrsa

    doc = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert f"dkimpy=={fastrsa.DKIMPY_VERSION}" in doc["project"]["dependencies"]
    assert importlib.metadata.version("dkimpy") == fastrsa.DKIMPY_VERSION
    fastrsa._check_dkimpy(fastrsa.DKIMPY_VERSION)
    with pytest.raises(ImportError, match=r"dkimpy 1\.1\.8.*dkimpy 9\.9 is installed"):
        fastrsa._check_dkimpy("9.9")
