"""`relay check` DANE findings over signed lab zones behind a real validating unbound
(relay.lab.unbound, relay.lab.signedzone): the same lookups delivery uses
(relay.dane.lookup), one zone per finding id."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay.check.fetch import run_checks
from relay.dns import DnspythonResolver
from relay.lab.signedzone import SignedZone
from relay.lab.unbound import ValidatingResolver

GOOD = "3 1 1 " + "ab" * 32
UNUSABLE = "0 0 1 " + "cd" * 32  # PKIX-TA: unusable for SMTP (RFC 7672 3.1.3)


def _zone(name: str, signed: bool = True, tlsa: str | None = GOOD) -> SignedZone:
    z = SignedZone(name, signed=signed).add("@", "MX", f"10 mx.{name}.").add("mx", "A", "127.0.0.2")
    z.add("_dmarc", "TXT", '"v=DMARC1; p=reject"')
    if tlsa:
        z.add("_25._tcp.mx", "TLSA", tlsa)
    return z


@pytest.fixture(scope="module")
def unbound() -> Iterator[ValidatingResolver]:
    bogus_tlsa = _zone("bogustlsa.test")
    bogus_tlsa.bogus |= {("_25._tcp.mx", "TLSA")}
    bogus_mx = _zone("bogusmx.test")
    bogus_mx.bogus |= {("@", "MX")}
    failing_tlsa = _zone("failtlsa.test")
    failing_tlsa.servfail |= {("_25._tcp.mx", "TLSA")}  # the authority answers SERVFAIL
    zones = [
        _zone("dane.test"),
        _zone("unusable.test", tlsa=UNUSABLE),
        _zone("notlsa.test", tlsa=None),
        _zone("insecure.test", signed=False),
        bogus_tlsa,
        bogus_mx,
        failing_tlsa,
    ]
    with ValidatingResolver(zones) as lab:
        yield lab


@pytest.mark.parametrize(
    ("domain", "severity", "check_id"),
    [
        ("dane.test", "ok", "dane.ok"),
        ("unusable.test", "error", "dane.unusable_tlsa"),
        ("notlsa.test", "warn", "dane.no_tlsa"),
        ("insecure.test", "warn", "dane.no_dnssec"),
        ("bogustlsa.test", "error", "dane.tlsa_failed"),
        ("bogusmx.test", "error", "dane.bogus"),
        ("failtlsa.test", "error", "dane.dns_failed"),
    ],
)
async def test_dane_findings(
    unbound: ValidatingResolver, domain: str, severity: str, check_id: str
) -> None:
    res = DnspythonResolver([unbound.address], timeout=3)
    findings = await run_checks(res, domain, probe=False)
    dane = [(f.severity, f.id) for f in findings if f.area == "DANE"]
    assert (severity, check_id) in dane, dane
