"""Hypothesis over the TLS-RPT parsers (RFC 8460 sections 3 and 4): the record parser
raises only RecordError, the report parser only ReportError, the validator never raises
(it returns problems), and what we write parses back to itself."""

from __future__ import annotations

import gzip
import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.tlsrpt.discovery import (
    MAX_RUA,
    VERSION,
    RecordError,
    Rua,
    RuaScheme,
    parse_record,
    select_record,
)
from relay.tlsrpt.report import (
    CountRow,
    ReportError,
    ReportMeta,
    build_report,
    gunzip,
    parse_report,
    validate_report,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- the TXT record

_record_piece = st.one_of(
    st.sampled_from(
        [
            VERSION,
            ";",
            " ; ",
            "rua=",
            "mailto:",
            "https://",
            ",",
            "@",
            "%40",
            "[",
            "]",
            "?",
            "=",
            "\t",
            "v=TLSRPTv2",
            "ext=1",
            "[::1",
        ]
    ),
    st.text(max_size=12),
)
records = st.lists(_record_piece, max_size=20).map("".join)


@FUZZ
@given(records)
def test_record_parser_raises_only_record_error(txt: str) -> None:
    try:
        rec = parse_record(txt, "d.test")
    except RecordError:
        return
    assert rec.raw == txt and 1 <= len(rec.rua) <= MAX_RUA
    assert all(isinstance(r, Rua) for r in rec.rua)
    assert len(set(rec.rua)) == len(rec.rua)


@FUZZ
@given(st.lists(records, max_size=4))
def test_select_record_never_raises(txts: list[str]) -> None:
    rec = select_record(txts, "d.test")
    assert rec is None or rec.raw in txts


_local = st.text(alphabet=string.ascii_letters + string.digits + "._+-", min_size=1, max_size=12)
_label = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=10)
_domain = st.lists(_label, min_size=2, max_size=4).map(".".join)
_mailto = st.builds(lambda lp, d: Rua(RuaScheme.MAILTO, f"{lp}@{d}"), _local, _domain)
_https = st.builds(
    lambda d, p: Rua(RuaScheme.HTTPS, f"https://{d}/{p}"),
    _domain,
    st.text(alphabet=string.ascii_letters + string.digits + "/_-", max_size=12),
)


@FUZZ
@given(
    st.lists(st.one_of(_mailto, _https), min_size=1, max_size=8),
    st.sampled_from([";", " ; ", ";\t"]),
    st.booleans(),
)
def test_record_round_trip(ruas: list[Rua], delim: str, trailing: bool) -> None:
    txt = VERSION + delim + "rua=" + ",".join(str(r) for r in ruas) + (delim if trailing else "")
    rec = parse_record(txt, "d.test")
    unique = list(dict.fromkeys(ruas))
    assert list(rec.rua) == unique[:MAX_RUA]


# ---------------------------------------------------------------- the report

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "2026-01-01T00:00:00Z",
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+23:59",
            "2026-02-30T00:00:00Z",
            "sts",
            "starttls-not-supported",
            "192.0.2.1",
            "a@b.test",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_KEYS = [
    "organization-name",
    "date-range",
    "start-datetime",
    "end-datetime",
    "contact-info",
    "report-id",
    "policies",
    "policy",
    "policy-type",
    "policy-string",
    "policy-domain",
    "mx-host",
    "summary",
    "total-successful-session-count",
    "total-failure-session-count",
    "failure-details",
    "result-type",
    "failed-session-count",
    "sending-mta-ip",
    "receiving-ip",
    "receiving-mx-hostname",
]
# report-shaped objects: the RFC's keys, with any JSON value under them
shaped = st.recursive(
    json_values,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(_KEYS), children, max_size=6)
    ),
    max_leaves=40,
)


def _check_parse(data: Any) -> None:
    try:
        rep = parse_report(data)
    except ReportError:
        return
    # whatever parsed serialises, and parses back to the same value
    again = parse_report(rep.to_json())
    assert again == rep


@FUZZ
@given(shaped)
def test_report_parser_raises_only_report_error(obj: Any) -> None:
    _check_parse(obj)
    _check_parse(json.dumps(obj))
    _check_parse(gzip.compress(json.dumps(obj).encode()))


@FUZZ
@given(st.binary(max_size=200))
def test_report_parser_on_bytes(raw: bytes) -> None:
    _check_parse(raw)
    _check_parse(b"\x1f\x8b" + raw)  # looks gzip'd, is not
    _check_parse(gzip.compress(raw)[: max(2, len(raw) // 2)])  # truncated gzip


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b'{"policies": ' + b"[" * 100_000,
        b"{" + b'"a":{' * 50_000,
        b"1" * 5000,
    ],
)
def test_report_parser_on_deep_or_huge_json(raw: bytes) -> None:
    with pytest.raises(ReportError):
        parse_report(raw)


@FUZZ
@given(shaped, st.booleans())
def test_validator_never_raises(obj: Any, strict: bool) -> None:
    problems = validate_report(obj, strict=strict)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59-23:59"),
        ("0001-01-01T00:00:00+23:59", "0001-01-01T00:00:00+23:59"),
        ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59"),
    ],
)
@pytest.mark.parametrize("strict", [False, True])
def test_validator_on_extreme_dates(start: str, end: str, strict: bool) -> None:
    obj = {"date-range": {"start-datetime": start, "end-datetime": end}, "policies": []}
    assert isinstance(validate_report(obj, strict=strict), list)


_rtype = st.sampled_from(
    ["", "starttls-not-supported", "certificate-expired", "sts-webpki-invalid"]
)
rows = st.builds(
    CountRow,
    day=st.just("2026-11-30"),
    policy_domain=st.just("d.test"),
    policy_type=st.sampled_from(["sts", "no-policy-found"]),
    policy_strings=st.lists(st.text(max_size=20), max_size=3).map(tuple),
    mx_patterns=st.lists(_domain, max_size=2).map(tuple),
    mx_host=_domain,
    receiving_ip=st.sampled_from(["192.0.2.1", "2001:db8::1"]),
    sending_mta_ip=st.just("198.51.100.7"),
    result_type=_rtype,
    failure_reason=st.text(max_size=20),
    count=st.integers(min_value=1, max_value=10**6),
)


@FUZZ
@given(st.lists(rows, min_size=1, max_size=12))
def test_built_reports_are_valid_and_round_trip(rs: list[CountRow]) -> None:
    meta = ReportMeta("Relay Org", "mailto:tlsrpt@relay.test", "relay.test")
    rep = build_report(meta, "2026-11-30", "d.test", rs, "2026-11-30T00:00:00Z_d.test")
    assert validate_report(rep.to_dict(), strict=True) == []
    assert parse_report(rep.to_json()) == rep
    assert parse_report(rep.to_gzip()) == rep
    assert rep.total_successful + rep.total_failed == sum(r.count for r in rs)


def test_gzip_bomb_is_refused_not_inflated() -> None:
    bomb = gzip.compress(b'{"policies": []' + b" " * 100_000 + b"}")
    assert len(bomb) < 1000
    with pytest.raises(ReportError, match="larger than 4096 bytes"):
        gunzip(bomb, limit=4096)
    assert parse_report(bomb).policies == ()  # within the default limit: parsed
