"""DANE in the policy answers, through a real validating unbound in front of signed lab
zones (relay.lab.unbound): the DNSSEC status of the MX RRset and each host's TLSA RRset
come from relay.dane.lookup, as in the relay's delivery (RFC 8461 section 2: DANE first)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import parse_config
from relay.dns import DnspythonResolver
from relay.lab.signedzone import SignedZone
from relay.lab.unbound import ValidatingResolver, missing
from relay.model import StsMode, TlsPolicy
from relay.policyserver.service import PolicyService

TLSA = "3 1 1 " + "ab" * 32


def _zones() -> list[SignedZone]:
    dane = (
        SignedZone("dane.test")
        .add("@", "MX", "10 mx.dane.test.")
        .add("mx", "A", "127.0.0.10")
        .add("_25._tcp.mx", "TLSA", TLSA)
    )
    mixed = (
        SignedZone("mixed.test")
        .add("@", "MX", "10 mx1.mixed.test.")
        .add("@", "MX", "20 mx2.mixed.test.")
        .add("mx1", "A", "127.0.0.10")
        .add("_25._tcp.mx1", "TLSA", TLSA)
        .add("mx2", "A", "127.0.0.11")
    )
    bogus = (
        SignedZone("bogus.test")
        .add("@", "MX", "10 mx.bogus.test.")
        .add("mx", "A", "127.0.0.10")
        .add("_25._tcp.mx", "TLSA", TLSA)
    )
    bogus.bogus |= {("_25._tcp.mx", "TLSA")}
    insecure = (
        SignedZone("insecure.test", signed=False)
        .add("@", "MX", "10 mx.insecure.test.")
        .add("mx", "A", "127.0.0.12")
        .add("_25._tcp.mx", "TLSA", TLSA)
    )
    return [dane, mixed, bogus, insecure]


@pytest.fixture(scope="module")
def unbound() -> Iterator[ValidatingResolver]:
    need = missing()
    assert not need, f"install {need} (.ci/run does)"
    with ValidatingResolver(_zones()) as lab:
        yield lab


def _enforce(domain: str) -> TlsPolicy:
    return TlsPolicy(
        domain=domain, mode=StsMode.ENFORCE, mx_patterns=(f"*.{domain}",), max_age=86400
    )


async def _answers(
    unbound: ValidatingResolver, tmp_path: Path, sts: bool, *domains: str
) -> list[str]:
    cfg = parse_config(tomllib.loads(""), tmp_path / "config.toml")

    async def enforce_everywhere(domain: str) -> TlsPolicy:  # the STS side is tested for real
        return _enforce(domain)  # in test_socketmap_tcp.py; here only DANE varies

    service = PolicyService(
        cfg, enforce_everywhere if sts else None, DnspythonResolver([unbound.address], timeout=3)
    )
    return [(await service.answer(f"postfix {d}".encode())).text() for d in domains]


async def test_dane_without_mta_sts(unbound: ValidatingResolver, tmp_path: Path) -> None:
    got = await _answers(unbound, tmp_path, False, "dane.test", "mixed.test", "bogus.test")
    assert got == ["OK dane-only", "OK dane", "OK dane-only"]
    # an unsigned zone's TLSA records do not count (RFC 7672 section 2.2.1)
    assert await _answers(unbound, tmp_path, False, "insecure.test") == ["NOTFOUND "]


async def test_dane_with_an_enforce_policy(unbound: ValidatingResolver, tmp_path: Path) -> None:
    got = await _answers(unbound, tmp_path, True, "dane.test", "mixed.test", "insecure.test")
    secure = "OK secure match=.{} servername=hostname protocols=>=TLSv1.2"
    # every host under DANE: DANE, the policy ignored; mixed or insecure: the policy
    assert got == ["OK dane-only", secure.format("mixed.test"), secure.format("insecure.test")]
