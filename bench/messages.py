"""Benchmark messages and the DNS data the relay needs to route (and, with --auth, to
authenticate) them.

Plain mode: ``count`` distinct messages of ``size`` bytes. Auth mode: the same, each
DKIM-signed beforehand with dkimpy (rsa-sha256, 2048-bit key of sender.test), with SPF,
DKIM and DMARC (p=reject) records for sender.test in the lab zone, so that a relay with
authentication on finds spf=pass, dkim=pass, dmarc=pass and seals an ARC set.
"""

from __future__ import annotations

import email.utils
from pathlib import Path

import dkim

from relay.commands.keygen import generate
from relay.lab.dnsserver import Zone

SENDER_DOMAIN = "sender.test"
SINK_DOMAIN = "sink.test"
DKIM_SELECTOR = "bench"
LINE = "The quick brown fox jumps over the lazy dog; benchmark line {:05d} ..........\r\n"


def build_message(i: int, size: int, reserve: int = 0) -> bytes:
    """One message of about ``size`` bytes (``reserve`` bytes left for a signature)."""
    head = (
        f"From: Bench Sender <bench@{SENDER_DOMAIN}>\r\n"
        f"To: <user@{SINK_DOMAIN}>\r\n"
        f"Subject: benchmark message {i}\r\n"
        f"Date: {email.utils.formatdate(1795000000 + i)}\r\n"
        f"Message-ID: <bench.{i}@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    body = []
    left = max(0, size - reserve - len(head))
    n = 0
    while left > 0:
        line = LINE.format(n)
        if len(line) > left:
            line = "x" * max(0, left - 2) + "\r\n"
        body.append(line)
        left -= len(line)
        n += 1
    return (head + "".join(body)).encode()


def write_messages(directory: Path, count: int, size: int, signed: bool) -> tuple[int, Zone]:
    """Write ``count`` messages as ``NNNNN.eml``; return (mean size, zone for sender.test)."""
    directory.mkdir(parents=True, exist_ok=True)
    zone = Zone()
    key = generate("rsa", 2048) if signed else None
    total = 0
    for i in range(count):
        if key is None:
            raw = build_message(i, size)
        else:
            raw = build_message(i, size, reserve=580)
            sig = dkim.sign(
                raw,
                DKIM_SELECTOR.encode(),
                SENDER_DOMAIN.encode(),
                key.private_pem,
                include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
            )
            raw = sig + raw
        (directory / f"{i:05d}.eml").write_bytes(raw)
        total += len(raw)
    if key is not None:
        zone.add(f"{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}", "TXT", key.record())
    zone.add(SENDER_DOMAIN, "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
    zone.add(f"_dmarc.{SENDER_DOMAIN}", "TXT", "v=DMARC1; p=reject")
    return total // max(1, count), zone
