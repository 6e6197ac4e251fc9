"""``_smtp._tls`` TXT discovery (RFC 8460 section 3): the peer cases of txt_records.yml,
record selection, malformed records, URI filtering; over StaticResolver and the real lab
DNS server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.dns import DnspythonResolver, StaticResolver
from relay.errors import DnsTempFail
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.tlsrpt.discovery import (
    MAX_RUA,
    RecordError,
    Rua,
    RuaScheme,
    discover,
    parse_record,
    select_record,
)

CASES: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "vectors" / "tlsrpt" / "txt_records.yml").read_text()
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c["name"]))
def test_peer_txt_records(case: dict[str, Any]) -> None:
    rec = select_record([case["txt"]], "example.com")
    assert (rec is not None) == case["valid"]
    assert rec is not None
    got = [{"scheme": r.scheme.value, "uri": r.uri} for r in rec.rua]
    assert got == case["expected_rua"]


@pytest.mark.parametrize(
    "txt",
    [
        "v=TLSRPTv1",  # no rua
        "v=TLSRPTv1;",  # no rua
        "v=TLSRPTv2; rua=mailto:a@b.example",
        "v=tlsrptv1; rua=mailto:a@b.example",  # %s: case-sensitive
        "rua=mailto:a@b.example; v=TLSRPTv1",  # version first
        "v=TLSRPTv1; rua=ftp://b.example/x",  # no usable scheme
        "v=TLSRPTv1; rua=mailto:a@b.example,",  # empty URI
        "v=TLSRPTv1; rua=mailto:a@b.example; rua=mailto:c@d.example",  # twice
        "v=TLSRPTv1;; rua=mailto:a@b.example",  # empty field
        "v=TLSRPTv1; rua=mailto:not-an-address",
        "v=TLSRPTv1; bad field; rua=mailto:a@b.example",
    ],
)
def test_invalid_records(txt: str) -> None:
    assert select_record([txt], "d.example") is None


def test_extensions_ignored_schemes_filtered_and_capped() -> None:
    rec = parse_record("v=TLSRPTv1 ;ext_1=val\t; rua=mailto:a%2Bb@b.example", "d")
    assert rec.rua == (Rua(RuaScheme.MAILTO, "a+b@b.example"),)
    rec = parse_record(
        "v=TLSRPTv1; rua=mailto:r@d.example?subject=x , https://c.example/p?q=1,"
        " gopher://x, mailto:r@d.example;x-new=1;",
        "d.example",
    )
    assert [str(r) for r in rec.rua] == ["mailto:r@d.example", "https://c.example/p?q=1"]
    many = ",".join(f"https://c{i}.example/" for i in range(MAX_RUA + 3))
    assert len(parse_record(f"v=TLSRPTv1; rua={many}").rua) == MAX_RUA
    with pytest.raises(RecordError):
        parse_record("v=TLSRPTv1; rua=https:///nohost")


def test_selection_discards_other_records_and_refuses_two() -> None:
    good = "v=TLSRPTv1; rua=mailto:r@d.example"
    rec = select_record(["v=spf1 -all", good, "something else"], "d.example")
    assert rec is not None and rec.rua[0].uri == "r@d.example"
    assert select_record([good, "v=TLSRPTv1; rua=https://c.example/"], "d.example") is None
    assert select_record(["v=TLSRPTv10; rua=mailto:r@d.example"], "d.example") is None
    assert select_record([], "d.example") is None


async def test_discover_static() -> None:
    res = StaticResolver(
        {
            ("_smtp._tls.a.example", "TXT"): ["v=TLSRPTv1; rua=https://c.example/r"],
            ("_smtp._tls.b.example", "TXT"): "SERVFAIL",
            ("b.example", "A"): ["192.0.2.1"],
        }
    )
    rec = await discover(res, "A.Example.")
    assert rec is not None and rec.domain == "a.example"
    assert rec.rua == (Rua(RuaScheme.HTTPS, "https://c.example/r"),)
    assert await discover(res, "none.example") is None  # NXDOMAIN: no reporting
    with pytest.raises(DnsTempFail):
        await discover(res, "b.example")


async def test_discover_over_lab_dns() -> None:
    zone = Zone()
    zone.add(
        "_smtp._tls.lab.test",
        "TXT",
        ["v=TLSRPTv1; rua=mailto:tls@reports.lab.test,", "https://c.lab.test/v1"],
    )
    zone.add("_smtp._tls.two.test", "TXT", "v=TLSRPTv1; rua=mailto:a@two.test")
    zone.add("_smtp._tls.two.test", "TXT", "v=TLSRPTv1; rua=mailto:b@two.test")
    zone.add("nodata.test", "A", "192.0.2.1")
    zone.fail("_smtp._tls.broken.test", "SERVFAIL")
    with LabDnsServer(zone) as dns:
        res = DnspythonResolver([dns.address], timeout=2)
        rec = await discover(res, "lab.test")
        assert rec is not None
        # one record split in two character-strings, joined without spaces
        assert [str(r) for r in rec.rua] == ["mailto:tls@reports.lab.test", "https://c.lab.test/v1"]
        assert await discover(res, "two.test") is None
        assert await discover(res, "nodata.test") is None
        assert await discover(res, "absent.test") is None
        with pytest.raises(DnsTempFail):
            await discover(res, "broken.test")
