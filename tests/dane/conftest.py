"""The DANE lab for tests: signed zones behind a real validating unbound (loopback, temp
dir, free port), started once per module that asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay.lab.signedzone import SignedZone
from relay.lab.unbound import ValidatingResolver


def lab_zones() -> list[SignedZone]:
    signed = (
        SignedZone("dane.test")
        .add("@", "MX", "10 mx.dane.test.")
        .add("mx", "A", "127.0.0.10")
        .add("_25._tcp.mx", "TLSA", "3 1 1 " + "ab" * 32)
        .add("alias", "CNAME", "mx")
        .add("bad", "A", "127.0.0.11")
        .add("_25._tcp.bad", "TLSA", "3 1 1 " + "cd" * 32)
    )
    signed.bogus |= {("bad", "A"), ("_25._tcp.bad", "TLSA")}
    insecure = (
        SignedZone("insecure.test", signed=False)
        .add("@", "MX", "10 mx.insecure.test.")
        .add("mx", "A", "127.0.0.12")
        .add("_25._tcp.mx", "TLSA", "3 1 1 " + "ef" * 32)
    )
    return [signed, insecure]


@pytest.fixture(scope="module")
def unbound_lab() -> Iterator[ValidatingResolver]:
    with ValidatingResolver(lab_zones()) as lab:
        yield lab
