"""ARC seal cost: CPU ms per full seal (AAR + AMS + AS) of a 4 KB message.

Compares the same ArcSealer (dkimpy canonicalisation) signing with dkimpy's pure-Python
RSA ("before") and with OpenSSL through ``cryptography`` ("after"), plus the floor (two
bare OpenSSL RSA-2048 signatures), an Ed25519 seal and a validation of the sealed copy;
then the whole intake transform as ``bench/run.py --auth`` runs it with several relay
workers (inline: SPF, DKIM, ARC, DMARC, A-R, seal; DNS from a StaticResolver holding
the bench zone, so no DNS cost), over the bench's DKIM-signed messages.
Each figure is the best of 3 runs over 64 distinct messages taken in turn.
Run: .venv/bin/python bench/seal_bench.py [iterations]
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from relay.auth.arc import ArcSealer, validate_arc_sync
from relay.auth.fastrsa import PurePythonRsaKey, load_signing_key
from relay.auth.keys import KeyLookup, KeyRecords, LookupOutcome
from relay.auth.types import ArcCv, ArcResult
from relay.commands.keygen import generate

HEAD = (
    b"From: Alice <alice@example.com>\r\nTo: list@lists.example.org\r\n"
    b"Subject: benchmark message\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <bench@example.com>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
)
LINE = b"The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
MESSAGE = HEAD + LINE * ((4096 - len(HEAD)) // len(LINE) + 1)
# distinct messages in turn, so no per-body memo (fastrsa.canonical_body) flatters a figure
MESSAGES = [MESSAGE + b"message %d\r\n" % i for i in range(64)]
# the same with a tab on every line: relaxed body canonicalisation has work to do
TABBED = [m.replace(b"fox jumps", b"fox\tjumps") for m in MESSAGES]
AR = "relay.example.net; spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com"


def cpu_ms(fn: Callable[[bytes], object], n: int, messages: list[bytes] = MESSAGES) -> float:
    """CPU ms per call of fn(message), messages taken in turn; best of 3 runs."""
    fn(messages[-1])  # warm up
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for i in range(n):
            fn(messages[i % len(messages)])
        best = min(best, (time.process_time() - start) / n * 1000)
    return best


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rsa_key = generate("rsa", 2048)
    ed_key = generate("ed25519")
    chain = ArcResult(ArcCv.NONE)
    fast = ArcSealer("example.net", "s", rsa_key.private_pem, "relay.example.net")
    pure = ArcSealer(
        "example.net",
        "s",
        rsa_key.private_pem,
        "relay.example.net",
        key=PurePythonRsaKey.from_pem(rsa_key.private_pem),
    )
    ed = ArcSealer("example.net", "e", ed_key.private_pem, "relay.example.net")
    openssl = load_signing_key(rsa_key.private_pem)
    digest = b"\x01" * 32
    sealed = fast.seal(MESSAGE, AR, chain)
    keys = KeyRecords(
        (KeyLookup("s._domainkey.example.net", LookupOutcome.FOUND, (rsa_key.record(),)),)
    )
    assert validate_arc_sync(sealed, keys).cv == ArcCv.PASS
    print(f"message: {len(MESSAGE)} bytes, {n} iterations, CPU ms per operation")
    before = cpu_ms(lambda m: pure.seal(m, AR, chain), max(n // 10, 5))
    after = cpu_ms(lambda m: fast.seal(m, AR, chain), n)
    floor = cpu_ms(lambda m: (openssl.sign(digest), openssl.sign(digest)), n)
    print(f"seal, dkimpy pure-Python RSA-2048 (before): {before:7.3f}")
    print(f"seal, OpenSSL RSA-2048 (after):             {after:7.3f}  ({before / after:.1f}x)")
    print(f"  of which two bare OpenSSL RSA-2048 signs: {floor:7.3f}")
    print(f"  canonicalisation, hashing, headers:       {after - floor:7.3f}")
    tabbed = cpu_ms(lambda m: fast.seal(m, AR, chain), n, TABBED)
    print(f"seal, OpenSSL, a tab on every body line:    {tabbed:7.3f}")
    ed_ms = cpu_ms(lambda m: ed.seal(m, AR, chain), n)
    sealed_by_id = {id(m): fast.seal(m, AR, chain) for m in MESSAGES}
    validate_ms = cpu_ms(lambda m: validate_arc_sync(sealed_by_id[id(m)], keys), n)
    print(f"seal, Ed25519:                              {ed_ms:7.3f}")
    print(f"validate the sealed copy (i=1, RSA):        {validate_ms:7.3f}")

    transform = transform_ms(n)
    print(f"auth transform, inline (verdict + seal):    {transform:7.3f}")


def transform_ms(n: int) -> float:
    """CPU ms per message of the auth intake transform, inline, DNS from memory
    (bench/auth_profile.py --seal, best of 3)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.auth_profile import build, measure

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="seal-bench-") as tmp:
        transform, signed = build(Path(tmp), seal=True)
        return asyncio.run(measure(transform, signed, n, 3))


if __name__ == "__main__":
    main()
