"""The OpenSPF RFC 7208 test suite (tests/vectors/spf/rfc7208-tests.yml), data-driven.

Each scenario's zonedata becomes a StaticResolver (SPF-type records are served as TXT
unless the name has TXT data, as the suite header asks; "TXT: NONE" suppresses that;
"TIMEOUT" makes every type without records time out). Each test's result (or one of the
acceptable results) and explanation are checked. Cases where we deliberately differ are
listed in DEVIATIONS with our own result asserted instead.

A second group runs scenarios end to end: the same zone served by the real lab DNS
server (dnslib over UDP) and queried with DnspythonResolver: all 203 cases,
with the same results as through the in-memory resolver.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.auth.spf import check_spf, default_explanation
from relay.auth.types import SpfResult
from relay.dns import DnspythonResolver, StaticResolver
from relay.lab.dnsserver import LabDnsServer, Zone

SUITE = Path(__file__).resolve().parent.parent / "vectors" / "spf" / "rfc7208-tests.yml"


@dataclass(frozen=True)
class Deviation:
    result: str
    explanation: str | None
    reason: str


# Cases where our answer differs from the suite's; each is asserted as written here.
DEVIATIONS: dict[str, Deviation] = {
    "v-macro-ip6": Deviation(
        "fail",
        "cafe:babe::1 is queried as 1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0."
        "e.b.a.b.e.f.a.c.ip6.arpa",
        "Result agrees (fail). The suite spells the %{i} nibbles of CAFE:BABE::1 in upper "
        "case, echoing the case the client address was written in; RFC 7208 section 7.4 "
        "shows lower-case nibbles and we always produce them (DNS names are case-blind).",
    ),
}


@dataclass(frozen=True)
class Case:
    scenario: str
    name: str
    host: str
    mailfrom: str
    helo: str
    results: tuple[str, ...]
    explanation: str | None
    zonedata: dict[str, Any]


def load_cases() -> list[Case]:
    cases: list[Case] = []
    with SUITE.open(encoding="utf-8") as fh:
        for doc in yaml.safe_load_all(fh):
            if not doc:
                continue
            for name, t in doc["tests"].items():
                result = t["result"]
                cases.append(
                    Case(
                        scenario=doc["description"],
                        name=name,
                        host=str(t["host"]),
                        mailfrom=str(t["mailfrom"]),
                        helo=str(t["helo"]),
                        results=tuple(result) if isinstance(result, list) else (result,),
                        explanation=t.get("explanation"),
                        zonedata=doc.get("zonedata") or {},
                    )
                )
    return cases


CASES = load_cases()


def zone_records(zonedata: dict[str, Any]) -> Iterator[tuple[str, str, object]]:
    """(name, type, value) of a scenario's zone, SPF-type records turned into TXT."""
    for name, recs in zonedata.items():
        has_txt = any(isinstance(r, dict) and "TXT" in r for r in recs)
        for rec in recs:
            if rec == "TIMEOUT":
                yield name, "TIMEOUT", "TIMEOUT"
                continue
            ((rtype, value),) = rec.items()
            if rtype == "SPF":
                if not has_txt:
                    yield name, "TXT", value
                yield name, "SPF", value  # kept so that the name exists
            elif rtype == "TXT":
                if value != "NONE":
                    yield name, "TXT", value
            elif rtype == "MX":
                yield name, "MX", (int(value[0]), str(value[1]))
            else:
                yield name, rtype, str(value)


def static_resolver(zonedata: dict[str, Any]) -> StaticResolver:
    res = StaticResolver()
    for name, rtype, value in zone_records(zonedata):
        # one TXT record, possibly of several strings: wrap it so add() keeps it whole
        res.add(name, rtype, [value] if rtype in ("TXT", "SPF") else value)
    return res


def check_case(case: Case, got: SpfResult, deviations: dict[str, Deviation] | None = None) -> None:
    dev = (deviations or {}).get(case.name) or DEVIATIONS.get(case.name)
    if dev is not None:
        assert got.result == dev.result, got
        if dev.explanation is not None:
            assert got.explanation == dev.explanation
        return
    assert got.result in case.results, f"{case.name}: {got}"
    if case.explanation is not None:
        if case.explanation == "DEFAULT":
            assert got.explanation == default_explanation(got.domain, _client(case.host))
        else:
            assert got.explanation == case.explanation


def _client(host: str) -> str:
    from relay.auth.spf import client_address

    return str(client_address(host))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_rfc7208_suite(case: Case) -> None:
    resolver = static_resolver(case.zonedata)
    got = await check_spf(
        resolver, case.host, case.mailfrom, case.helo, now=lambda: 1_700_000_000.0
    )
    check_case(case, got)


def test_suite_is_complete() -> None:
    assert len(CASES) == 203
    assert set(DEVIATIONS) <= {c.name for c in CASES}


# --- end to end: the same scenarios over UDP from the real lab DNS server --------------

# Every case runs over real DNS too, with no exception: dnspython puts every label on
# the wire as it is (names holding a space, ':' or '/', which c-ares refused), and the
# lab server fails single record types ("TXT times out while the name has SPF records").
# The answers really came over the wire (each test checks the server's query log).
LAB_DEVIATIONS: dict[str, Deviation] = {}

SCENARIOS = sorted({c.scenario for c in CASES}, key=[c.scenario for c in CASES].index)


def load_lab_zone(zone: Zone, zonedata: dict[str, Any]) -> None:
    """Replace the lab zone's contents with a scenario's zone data."""
    with zone.lock:
        zone.records.clear()
        zone.failures.clear()
    for name, rtype, value in zone_records(zonedata):
        if rtype == "TIMEOUT":
            # "every type without records times out": the name as a whole when it has
            # nothing else, else each queried type it has no records of
            if all(r == "TIMEOUT" for r in zonedata[name]):
                zone.fail(name, "SERVFAIL")
            else:
                present = {t for n, t, _v in zone_records(zonedata) if n == name}
                for t in ("TXT", "A", "AAAA", "MX", "PTR"):
                    if t not in present:
                        zone.fail(name, "SERVFAIL", t)
            continue
        if rtype == "SPF":
            continue  # type 99 is not queried under RFC 7208; its TXT copy is served
        if value == []:
            value = [""]  # a TXT RR with no strings is not encodable; one empty string is
        zone.add(name, rtype, value)


@pytest.fixture(scope="module")
def lab_server() -> Iterator[LabDnsServer]:
    """One lab DNS server (127.0.0.1, ephemeral port) for the module, stopped at its end;
    each test loads its own scenario into the zone."""
    with LabDnsServer() as server:
        yield server


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_rfc7208_suite_over_lab_dns(scenario: str, lab_server: LabDnsServer) -> None:
    cases = [c for c in CASES if c.scenario == scenario]
    load_lab_zone(lab_server.zone, cases[0].zonedata)
    resolver = DnspythonResolver([lab_server.address], timeout=2.0)
    for case in cases:
        got = await check_spf(
            resolver, case.host, case.mailfrom, case.helo, now=lambda: 1_700_000_000.0
        )
        check_case(case, got, LAB_DEVIATIONS)
    assert lab_server.zone.queries  # the answers really came over the wire


async def test_lab_dns_timeout_is_temperror(lab_server: LabDnsServer) -> None:
    """A server that never answers (DROP) gives temperror, within the resolver timeout."""
    load_lab_zone(lab_server.zone, {"drop.example.com": ["TIMEOUT"]})
    lab_server.zone.fail("drop.example.com", "DROP")
    resolver = DnspythonResolver([lab_server.address], timeout=0.4, tries=1)
    got = await check_spf(resolver, "192.0.2.1", "a@drop.example.com", "h.example.com")
    assert got.result == "temperror"


def test_all_203_cases_run_over_lab_dns_without_exception() -> None:
    assert sum(len([c for c in CASES if c.scenario == s]) for s in SCENARIOS) == 203
    assert LAB_DEVIATIONS == {}
