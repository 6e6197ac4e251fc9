"""How fast this machine signs with RSA-2048: the unit the authentication figures scale with.

Each ARC set costs two RSA-2048 signatures (the AMS and the AS), for the relay and for
rspamd alike, so the benchmark prints the sign time beside its table. Two measurements:

- ``openssl speed -seconds S rsa2048`` (what the issue quotes: 0.30 ms on its machine),
  which divides by user CPU time, so other load on the machine disturbs it little;
- the ``cryptography`` package in this process (the library the relay signs with):
  CPU time per sign, best of a few batches.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_LINE = re.compile(r"^rsa\s+2048\s+bits\s+([0-9.]+)s\s+([0-9.]+)s", re.MULTILINE)
# the summary line: sign time, verify time, signs a second, verifies a second
_MULTI = re.compile(r"^rsa\s+2048\s+bits\s+[0-9.]+s\s+[0-9.]+s\s+([0-9.]+)\s", re.MULTILINE)


def openssl_sign_ms(seconds: int = 2) -> float | None:
    """ms per RSA-2048 sign from ``openssl speed`` (None when openssl is missing)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    try:
        out = subprocess.run(
            [openssl, "speed", "-seconds", str(seconds), "rsa2048"],
            capture_output=True,
            text=True,
            timeout=seconds * 4 + 30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _LINE.search(out)
    return round(float(m.group(1)) * 1000, 3) if m else None


def openssl_parallel_signs_per_s(processes: int, seconds: int = 2) -> float | None:
    """RSA-2048 signs a second with ``processes`` processes signing at once (``openssl
    speed -multi``): what all the cores together sign, which on a virtual machine whose
    cores share a host is less than one core's rate times the cores (None when openssl
    is missing)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    try:
        out = subprocess.run(
            [openssl, "speed", "-seconds", str(seconds), "-multi", str(processes), "rsa2048"],
            capture_output=True,
            text=True,
            timeout=seconds * 4 + 30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _MULTI.search(out)
    return float(m.group(1)) if m else None


def cryptography_sign_ms(batches: int = 5, per_batch: int = 40) -> float:
    """CPU ms per RSA-2048 PKCS#1 v1.5 SHA-256 sign with ``cryptography``, best batch."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = b"x" * 64
    key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    best = float("inf")
    for _ in range(batches):
        start = time.process_time()
        for _ in range(per_batch):
            key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        best = min(best, (time.process_time() - start) / per_batch)
    return round(best * 1000, 3)


def measure() -> dict[str, float | None]:
    return {"openssl_ms": openssl_sign_ms(), "cryptography_ms": cryptography_sign_ms()}
