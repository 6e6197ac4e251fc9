"""``relay keygen``: make a DKIM/ARC signing key and print the DNS TXT record to publish.

RSA (2048 bits by default, rsa-sha256; what ARC sealing uses, RFC 8617) or Ed25519
(RFC 8463, for DKIM-signing the relay's own reports and bounces). The private key is
written as PKCS#8 PEM with mode 0600; the record is ``v=DKIM1; k=...; p=<base64>``
(RFC 6376 section 3.6.1), split into 255-octet strings when longer.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

MIN_RSA_BITS = 2048
MAX_TXT_STRING = 255


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    private_pem: bytes
    algorithm: str  # "rsa" | "ed25519"
    public_b64: str

    def record(self) -> str:
        return f"v=DKIM1; k={self.algorithm}; p={self.public_b64}"


def generate(algorithm: str, bits: int = MIN_RSA_BITS) -> GeneratedKey:
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    elif algorithm == "rsa":
        if bits < MIN_RSA_BITS:
            raise ValueError(f"--bits {bits}: RSA keys need at least {MIN_RSA_BITS} bits")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        raw = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return GeneratedKey(pem, algorithm, base64.b64encode(raw).decode("ascii"))


def zone_line(selector: str, domain: str, record: str) -> str:
    """A zone-file line; TXT character-strings are at most 255 octets (RFC 1035)."""
    chunks = [record[i : i + MAX_TXT_STRING] for i in range(0, len(record), MAX_TXT_STRING)]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain}. IN TXT {quoted}"


def write_key(path: Path, pem: bytes) -> None:
    """Create path with mode 0600 (refusing to overwrite an existing key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def run(args: argparse.Namespace) -> int:
    domain = args.domain.strip().rstrip(".").lower()
    selector = args.selector.strip().lower()
    if not domain or not selector or any(c.isspace() for c in domain + selector):
        print("relay keygen: --domain and --selector must be non-empty names", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("keys") / f"{selector}._domainkey.{domain}.pem"
    if out.exists():
        print(f"relay keygen: {out} exists; not overwriting a key", file=sys.stderr)
        return 1
    try:
        key = generate(args.algorithm, args.bits)
    except ValueError as exc:
        print(f"relay keygen: {exc}", file=sys.stderr)
        return 2
    write_key(out, key.private_pem)
    print(f"; private key written to {out} (mode 0600)")
    print(f"; publish this record in DNS for {domain}:")
    print(zone_line(selector, domain, key.record()))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "keygen", help="make a DKIM/ARC signing key and print its DNS TXT record"
    )
    p.add_argument("--domain", required=True, help="signing domain (d=)")
    p.add_argument("--selector", required=True, help="selector (s=)")
    p.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    p.add_argument("--bits", type=int, default=MIN_RSA_BITS, help="RSA key size (>= 2048)")
    p.add_argument(
        "--out", default="", help="key file (default keys/<selector>._domainkey.<domain>.pem)"
    )
    p.set_defaults(func=run)
