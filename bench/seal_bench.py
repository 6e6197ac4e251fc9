"""ARC seal cost: CPU ms per full seal (AAR + AMS + AS) of a 4 KB message.

Compares the same ArcSealer (dkimpy canonicalisation) signing with dkimpy's pure-Python
RSA ("before") and with OpenSSL through ``cryptography`` ("after"), plus the floor (two
bare OpenSSL RSA-2048 signatures), an Ed25519 seal and a validation of the sealed copy.
Run: .venv/bin/python bench/seal_bench.py [iterations]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

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
AR = "relay.example.net; spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com"


def cpu_ms(fn: Callable[[], object], n: int) -> float:
    fn()  # warm up
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1000


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
    before = cpu_ms(lambda: pure.seal(MESSAGE, AR, chain), max(n // 10, 5))
    after = cpu_ms(lambda: fast.seal(MESSAGE, AR, chain), n)
    floor = cpu_ms(lambda: (openssl.sign(digest), openssl.sign(digest)), n)
    print(f"seal, dkimpy pure-Python RSA-2048 (before): {before:7.3f}")
    print(f"seal, OpenSSL RSA-2048 (after):             {after:7.3f}  ({before / after:.1f}x)")
    print(f"  of which two bare OpenSSL RSA-2048 signs: {floor:7.3f}")
    print(f"  canonicalisation, hashing, headers:       {after - floor:7.3f}")
    ed_ms = cpu_ms(lambda: ed.seal(MESSAGE, AR, chain), n)
    validate_ms = cpu_ms(lambda: validate_arc_sync(sealed, keys), n)
    print(f"seal, Ed25519:                              {ed_ms:7.3f}")
    print(f"validate the sealed copy (i=1, RSA):        {validate_ms:7.3f}")


if __name__ == "__main__":
    main()
