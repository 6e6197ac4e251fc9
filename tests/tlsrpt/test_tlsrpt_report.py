"""RFC 8460 section 4 reports: building from ledger rows, field by field checks, the
validator on our reports and on third-party reports (tests/vectors/tlsrpt), parsing."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from relay.tlsrpt.report import (
    CountRow,
    ReportMeta,
    attachment_filename,
    build_report,
    day_epochs,
    day_range,
    make_report_id,
    parse_report,
    report_attachments,
    validate_report,
)

VEC = Path(__file__).resolve().parents[1] / "vectors" / "tlsrpt"
JSON_VECTORS = sorted(VEC.glob("*/*.json"))
EML_VECTORS = sorted(VEC.glob("*/*.eml"))

META = ReportMeta(
    organization="Example Net", contact="mailto:tlsrpt@example.net", submitter="example.net"
)
STS = (
    "sts",
    ("version: STSv1", "mode: enforce", "mx: *.mx.dest.test", "max_age: 86400"),
    ("*.mx.dest.test",),
)


def row(
    day: str = "2026-11-22",
    domain: str = "dest.test",
    policy: tuple[str, tuple[str, ...], tuple[str, ...]] = STS,
    result: str = "",
    count: int = 1,
    mx: str = "",
    rip: str = "",
    smta: str = "",
    reason: str = "",
) -> CountRow:
    return CountRow(day, domain, policy[0], policy[1], policy[2], mx, rip, smta, result,
                    reason, count)  # fmt: skip


def test_field_by_field_sts_report() -> None:
    rows = [
        row(count=7),
        row(result="certificate-expired", count=2, mx="a.mx.dest.test", rip="192.0.2.1",
            smta="198.51.100.9", reason="certificate has expired"),
        row(result="starttls-not-supported", count=3, mx="b.mx.dest.test", rip="2001:db8::25",
            smta="198.51.100.9"),
        row(result="certificate-expired", count=1, mx="a.mx.dest.test", rip="192.0.2.1",
            smta="198.51.100.9", reason="certificate has expired"),
    ]  # fmt: skip
    rid = make_report_id("2026-11-22", "dest.test", "example.net", "00ff")
    rep = build_report(META, "2026-11-22", "dest.test", rows, rid)
    obj = json.loads(rep.to_json())
    assert validate_report(obj, strict=True) == []
    assert obj["organization-name"] == "Example Net"
    assert obj["date-range"] == {
        "start-datetime": "2026-11-22T00:00:00Z",
        "end-datetime": "2026-11-22T23:59:59Z",
    }
    assert obj["contact-info"] == "tlsrpt@example.net"  # addr-spec, no mailto:
    assert obj["report-id"] == "2026-11-22T00:00:00Z_dest.test_00ff@example.net"
    assert len(obj["policies"]) == 1
    pol = obj["policies"][0]
    assert pol["policy"] == {
        "policy-type": "sts",
        "policy-string": list(STS[1]),
        "policy-domain": "dest.test",
        "mx-host": ["*.mx.dest.test"],
    }
    assert pol["summary"] == {
        "total-successful-session-count": 7,
        "total-failure-session-count": 6,
    }
    # same key rows are added up, most frequent first
    assert pol["failure-details"] == [
        {
            "result-type": "certificate-expired",
            "sending-mta-ip": "198.51.100.9",
            "receiving-mx-hostname": "a.mx.dest.test",
            "receiving-ip": "192.0.2.1",
            "failed-session-count": 3,
            "failure-reason-code": "certificate has expired",
        },
        {
            "result-type": "starttls-not-supported",
            "sending-mta-ip": "198.51.100.9",
            "receiving-mx-hostname": "b.mx.dest.test",
            "receiving-ip": "2001:db8::25",
            "failed-session-count": 3,
        },
    ]
    assert sum(d["failed-session-count"] for d in pol["failure-details"]) == 6


def test_several_policies_and_no_policy_found() -> None:
    nopol = ("no-policy-found", (), ())
    testing = ("sts", ("version: STSv1", "mode: testing", "mx: mx.dest.test",
                       "max_age: 600"), ("mx.dest.test",))  # fmt: skip
    rows = [
        row(policy=nopol, count=4),
        row(policy=nopol, result="starttls-not-supported", mx="mx.dest.test", rip="192.0.2.7"),
        row(policy=testing, count=2),
        row(policy=testing, result="sts-policy-fetch-error", reason="HTTP 404"),
        row(day="2026-11-21", count=99),  # another day: not in this report
        row(domain="other.test", count=50),  # another domain: not in this report
    ]
    rep = build_report(META, "2026-11-22", "dest.test", rows, "id1")
    obj = rep.to_dict()
    assert validate_report(obj, strict=True) == []
    by_type = {(p["policy"]["policy-type"], tuple(p["policy"].get("mx-host", []))): p
               for p in obj["policies"]}  # fmt: skip
    assert set(by_type) == {("no-policy-found", ()), ("sts", ("mx.dest.test",))}
    npf = by_type[("no-policy-found", ())]
    assert "policy-string" not in npf["policy"] and "mx-host" not in npf["policy"]
    assert npf["policy"]["policy-domain"] == "dest.test"
    assert npf["summary"] == {"total-successful-session-count": 4,
                              "total-failure-session-count": 1}  # fmt: skip
    sts = by_type[("sts", ("mx.dest.test",))]
    assert sts["summary"]["total-successful-session-count"] == 2
    # a fetch error has no MX, no IPs: those fields are left out, not empty
    assert sts["failure-details"] == [
        {"result-type": "sts-policy-fetch-error", "failed-session-count": 1,
         "failure-reason-code": "HTTP 404"}
    ]  # fmt: skip
    assert rep.total_successful == 6 and rep.total_failed == 2


def test_other_day_and_domain_reports() -> None:
    rows = [row(day="2026-11-21", count=99), row(domain="other.test", count=50)]
    a = build_report(META, "2026-11-21", "dest.test", rows, "a")
    b = build_report(META, "2026-11-22", "other.test", rows, "b")
    assert a.total_successful == 99 and a.start_datetime == "2026-11-21T00:00:00Z"
    assert b.total_successful == 50 and b.policy_domain == "other.test"
    with pytest.raises(ValueError):
        build_report(META, "2026-11-23", "dest.test", rows, "c")  # no sessions: no report


def test_failure_details_capped_counts_exact() -> None:
    rows = [row(count=10)] + [
        row(result="validation-failure", count=i + 1, mx=f"m{i}.mx.dest.test",
            rip=f"192.0.2.{i + 1}")
        for i in range(30)
    ]  # fmt: skip
    meta = ReportMeta("Org", "c@example.net", "example.net", max_failure_details=5)
    rep = build_report(meta, "2026-11-22", "dest.test", rows, "cap")
    pol = rep.policies[0]
    assert len(pol.failure_details) == 5
    assert [d.failed_session_count for d in pol.failure_details] == [30, 29, 28, 27, 26]
    assert pol.failed == sum(range(1, 31))  # exact, whatever the cap
    assert validate_report(rep.to_dict(), strict=True) == []


def test_day_range_and_filename() -> None:
    assert day_range("2026-11-22") == ("2026-11-22T00:00:00Z", "2026-11-22T23:59:59Z")
    begin, end = day_epochs("2026-11-22")
    assert begin == 1795305600 and end - begin == 86399
    name = attachment_filename("example.net", "dest.test", "2026-11-22", "ab-12_@x")
    assert name == f"example.net!dest.test!{begin}!{end}!ab12x.json.gz"


# ------------------------------------------------------------------ the validator


@pytest.mark.parametrize("path", JSON_VECTORS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_vectors_pass_the_validator_and_parse(path: Path) -> None:
    obj = json.loads(path.read_bytes())
    assert validate_report(obj) == []
    rep = parse_report(path.read_bytes())
    assert rep.report_id == obj["report-id"]
    assert len(rep.policies) == len(obj["policies"])
    for p, raw in zip(rep.policies, obj["policies"], strict=True):
        assert p.successful == raw["summary"].get("total-successful-session-count", 0)
        assert len(p.failure_details) == len(raw.get("failure-details", []))


def test_strict_mode_flags_what_real_senders_do_loosely() -> None:
    rpt03 = json.loads((VEC / "mail-auth" / "rpt03.json").read_bytes())
    problems = validate_report(rpt03, strict=True)
    assert any("unknown value 'invalid-policy-type'" in p for p in problems)
    assert any("total-failure-session-count: missing" in p for p in problems)
    week = json.loads((VEC / "mail-auth" / "rpt02.json").read_bytes())
    assert any("one full UTC day" in p for p in validate_report(week, strict=True))
    rfc = json.loads((VEC / "parsedmarc" / "rfc8460.json").read_bytes())
    assert validate_report(rfc, strict=True) == []


def test_mx_host_string_or_array() -> None:
    a = parse_report((VEC / "parsedmarc" / "rfc8460.json").read_bytes())
    b = parse_report((VEC / "mail-auth" / "rpt01.json").read_bytes())
    assert a.policies[0].mx_hosts == b.policies[0].mx_hosts == ("*.mail.company-y.example",)
    assert a.policies[0].failed == b.policies[0].failed == 303
    details = [(d.result_type, d.failed_session_count) for d in a.policies[0].failure_details]
    assert details == [
        ("certificate-expired", 100),
        ("starttls-not-supported", 200),
        ("validation-failure", 3),
    ]


@pytest.mark.parametrize("path", EML_VECTORS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_vector_mails_attachments_decode_and_validate(path: Path) -> None:
    atts = report_attachments(path.read_bytes())
    assert len(atts) == 1
    _ctype, _name, data = atts[0]
    obj = json.loads(data)
    assert validate_report(obj) == []
    twin = path.with_suffix(".json")
    if twin.exists():  # the README: attachments decode to exactly rptNN.json
        assert obj == json.loads(twin.read_bytes())


def _good() -> dict[str, Any]:
    return build_report(META, "2026-11-22", "dest.test",
                        [row(count=1), row(result="certificate-expired", mx="m.dest.test",
                                           rip="192.0.2.1")], "g").to_dict()  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda o: o.pop("organization-name"), "organization-name"),
        (lambda o: o.update({"report-id": 5}), "report-id"),
        (lambda o: o.pop("contact-info"), "contact-info"),
        (
            lambda o: o["date-range"].update({"start-datetime": "2026-11-22 00:00"}),
            "start-datetime",
        ),
        (
            lambda o: o["date-range"].update({"start-datetime": "2026-11-23T00:00:00Z"}),
            "after end-datetime",
        ),
        (lambda o: o.update({"policies": {}}), "policies"),
        (lambda o: o["policies"][0].pop("policy"), "policy: missing"),
        (lambda o: o["policies"][0]["policy"].pop("policy-type"), "policy-type"),
        (lambda o: o["policies"][0]["policy"].update({"policy-string": "x"}), "policy-string"),
        (lambda o: o["policies"][0]["policy"].update({"mx-host": 3}), "mx-host"),
        (
            lambda o: o["policies"][0]["summary"].update({"total-successful-session-count": -1}),
            "total-successful-session-count",
        ),
        (
            lambda o: o["policies"][0]["summary"].update({"total-failure-session-count": True}),
            "total-failure-session-count",
        ),
        (lambda o: o["policies"][0].pop("summary"), "summary"),
        (lambda o: o["policies"][0].update({"failure-details": {}}), "failure-details"),
        (lambda o: o["policies"][0]["failure-details"][0].pop("result-type"), "result-type"),
        (
            lambda o: o["policies"][0]["failure-details"][0].update({"failed-session-count": "1"}),
            "failed-session-count",
        ),
        (
            lambda o: o["policies"][0]["failure-details"][0].update({"sending-mta-ip": "x"}),
            "sending-mta-ip",
        ),
        (
            lambda o: o["policies"][0]["failure-details"][0].update({"receiving-ip": "1.2.3"}),
            "receiving-ip",
        ),
        (
            lambda o: o["policies"][0]["failure-details"][0].update({"failure-reason-code": 1}),
            "failure-reason-code",
        ),
    ],
)
def test_validator_catches_each_field(mutate: Any, expect: str) -> None:
    obj = _good()
    assert validate_report(obj, strict=True) == []
    bad = copy.deepcopy(obj)
    mutate(bad)
    problems = validate_report(bad)
    assert problems and any(expect in p for p in problems), problems


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (
            lambda o: o["date-range"].update({"end-datetime": "2026-11-23T00:00:00Z"}),
            "full UTC day",
        ),
        (lambda o: o.update({"contact-info": "Reports Team"}), "addr-spec"),
        (lambda o: o["policies"][0]["policy"].update({"policy-type": "dane"}), "unknown"),
        (lambda o: o["policies"][0]["policy"].pop("policy-domain"), "policy-domain"),
        (
            lambda o: o["policies"][0]["failure-details"][0].update({"result-type": "oops"}),
            "unknown",
        ),
        (
            lambda o: o["policies"][0]["failure-details"][0].update({"failed-session-count": 9}),
            "failure-details count",
        ),
        (lambda o: o.update({"policies": []}), "empty"),
    ],
)
def test_strict_only_checks(mutate: Any, expect: str) -> None:
    bad = _good()
    mutate(bad)
    assert validate_report(bad) == []  # lenient mode accepts it
    assert any(expect in p for p in validate_report(bad, strict=True))


def test_parse_gzip_and_round_trip() -> None:
    rows = [
        row(count=3),
        row(result="certificate-not-trusted", mx="m.dest.test", rip="192.0.2.3", reason="self"),
    ]
    rep = build_report(META, "2026-11-22", "dest.test", rows, "rt")
    gz = rep.to_gzip()
    assert gz[:2] == b"\x1f\x8b"
    assert gz == rep.to_gzip()  # stable bytes (mtime 0)
    assert json.loads(gzip.decompress(gz)) == rep.to_dict()
    assert parse_report(gz) == rep
    assert parse_report(rep.to_json().decode()) == rep
