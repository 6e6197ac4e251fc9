"""bench/sealcheck.py: the check that stops the benchmark when a system did not seal.

The vector ``data/rspamd-sealed.eml`` is a copy the bench's probe sink received from
Postfix + rspamd (bench/rspamdsys.py, rspamd 3.4), with the TXT records of its lab zone
(the sender's DKIM key and rspamd's ARC key) in ``data/rspamd-sealed.zone.json``. It
passes; the same copy without its seal, with a changed body, checked for another sealer,
or without the verdicts in its Authentication-Results, is named as such.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.rspamdsys import SEAL_DOMAIN
from bench.sealcheck import check_copy, from_dump, problems
from relay.lab.dnsserver import Zone

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def copy() -> tuple[bytes, Zone]:
    zone = Zone()
    for name, value in json.loads((DATA / "rspamd-sealed.zone.json").read_text()).items():
        zone.add(name, "TXT", value)
    return (DATA / "rspamd-sealed.eml").read_bytes(), zone


def drop_header(message: bytes, name: bytes) -> bytes:
    """``message`` without every ``name:`` field (with its folded lines)."""
    return re.sub(rb"(?mi)^" + re.escape(name) + rb":.*\r\n(?:[ \t].*\r\n)*", b"", message)


def test_the_peers_sealed_copy_passes(copy: tuple[bytes, Zone]) -> None:
    raw, zone = copy
    check = check_copy(raw, zone)
    assert (check.arc_cv, check.seal_instance, check.seal_domain) == ("pass", 1, SEAL_DOMAIN)
    assert check.verdicts() == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert problems(check, SEAL_DOMAIN) == []


def test_an_unsealed_copy_is_named(copy: tuple[bytes, Zone]) -> None:
    raw, zone = copy
    unsealed = drop_header(raw, b"ARC-Seal")
    assert problems(check_copy(unsealed, zone), SEAL_DOMAIN) == ["no ARC-Seal"]


def test_a_seal_that_does_not_verify_is_named(copy: tuple[bytes, Zone]) -> None:
    raw, zone = copy
    tampered = raw.replace(b"benchmark line 00003", b"benchmark line 99999")
    found = problems(check_copy(tampered, zone), SEAL_DOMAIN)
    assert len(found) == 1 and found[0].startswith("ARC chain fail")


def test_a_seal_whose_key_is_not_published_is_named(copy: tuple[bytes, Zone]) -> None:
    raw, zone = copy
    empty = Zone()
    for name, records in zone.records.items():
        if not name.endswith(SEAL_DOMAIN):
            for rdtype, value in records:
                empty.add(name, rdtype, value)
    found = problems(check_copy(raw, empty), SEAL_DOMAIN)
    assert len(found) == 1 and found[0].startswith("ARC chain fail")


def test_a_seal_by_another_sealer_is_named(copy: tuple[bytes, Zone]) -> None:
    raw, zone = copy
    found = problems(check_copy(raw, zone), "relay.bench.test")
    assert found == [f"sealed by {SEAL_DOMAIN!r}, expected 'relay.bench.test'"]


def test_missing_verdicts_are_named(copy: tuple[bytes, Zone]) -> None:
    raw, zone = copy
    # The AMS does not sign Authentication-Results, so the seal still verifies.
    no_ar = drop_header(raw, b"Authentication-Results")
    assert problems(check_copy(no_ar, zone), SEAL_DOMAIN) == ["no Authentication-Results"]
    no_dmarc = re.sub(rb"dmarc=pass \(policy=reject\)", b"", raw, count=1)
    assert problems(check_copy(no_dmarc, zone), SEAL_DOMAIN) == ["dmarc=missing in A-R"]


def test_from_dump_gives_back_the_received_bytes() -> None:
    received = b"Subject: x\r\nFrom: a@b.test\r\n\r\nbody\r\n..dot\r\n"
    dump = (
        b"X-Client-Addr: 127.0.0.13\nX-Client-Proto: ESMTP\nX-Helo-Args: postfix.bench.test\n"
        b"X-Mail-Args: <bench@sender.test>\nX-Rcpt-Args: <user@probe.test>\n"
        b"Received: from postfix.bench.test ([127.0.0.13])\n\tby smtp-sink (smtp-sink) with"
        b" ESMTP id 1;\n\tWed,  2 Dec 2026 14:23:11 +0000 (UTC)\n"
        + received.replace(b"\r\n", b"\n")
        + b"\n"
    )
    assert from_dump(dump) == received + b"\r\n"
