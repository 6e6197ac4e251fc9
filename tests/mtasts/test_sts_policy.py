"""relay.mtasts.policy against the shared MTA-STS vectors, RFC 8461's examples and
hypothesis properties."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import PolicyError
from relay.model import StsMode
from relay.mtasts.policy import (
    MAX_AGE_LIMIT,
    StsPolicy,
    mx_matches,
    parse_policy,
    parse_policy_bytes,
    parse_txt_record,
    policy_allows,
    select_record,
    txt_tags,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "mta-sts"


def load(name: str) -> Any:
    return yaml.safe_load((VECTORS / name).read_text(encoding="utf-8"))


POLICIES: list[dict[str, Any]] = load("policies.yml")
MX: list[dict[str, Any]] = load("mx_patterns.yml")
TXT: list[dict[str, Any]] = load("txt_records.yml")
RFC: dict[str, list[dict[str, Any]]] = load("rfc8461_examples.yml")

# Where relay's verdict differs from the peer's, and why (beside rfc_strict_differs).
POLICY_OWN_VERDICT = {
    # RFC 8461 3.2: of a repeated field "all entries except for the first SHALL be ignored".
    "domaindetective-duplicate-mode": True,
    # The ABNF has no whitespace before a field name; chasquid trims it.
    "chasquid-parse-pol1": False,
    "chasquid-served-domain.com": False,
    "chasquid-served-version99": False,  # invalid either way (and for the peer's reason too)
    # mode none is fine (RFC), but the in-label "*" mx pattern makes it invalid anyway.
    "mimecast-mode-none": False,
}
TXT_OWN_VERDICT = {
    # RFC 8461 3.2 (TXT records and policies): a repeated field: the first counts.
    "domaindetective-record-duplicate-v": True,
}


def http_reason(entry: dict[str, Any]) -> bool:
    """True when the entry is invalid for an HTTP reason rather than its text."""
    http = entry.get("http") or {}
    return (
        http.get("status", 200) != 200
        or http.get("content_type", "text/plain") != "text/plain"
        or "append" in entry
    )


def expected_policy_verdict(entry: dict[str, Any]) -> bool:
    if entry["name"] in POLICY_OWN_VERDICT:
        return POLICY_OWN_VERDICT[entry["name"]]
    if entry.get("rfc_strict_differs"):
        return not entry["valid"]
    if not entry["valid"] and http_reason(entry):
        return True  # the text itself is a good policy
    return bool(entry["valid"])


def verdict(text: str) -> tuple[bool, StsPolicy | None, str]:
    try:
        p = parse_policy(text)
    except PolicyError as exc:
        return False, None, str(exc)
    return True, p, ""


@pytest.mark.parametrize("entry", POLICIES + RFC["policies"], ids=lambda e: e["name"])
def test_policy_vectors(entry: dict[str, Any]) -> None:
    ok, policy, err = verdict(entry["policy_text"])
    assert ok is expected_policy_verdict(entry), err
    if ok and entry.get("valid") and "expected" in entry and not entry.get("rfc_strict_differs"):
        assert policy is not None
        exp = entry["expected"]
        assert policy.mode == StsMode(exp["mode"])
        assert list(policy.mx) == [str(m) for m in exp["mx"]]
        assert policy.max_age == exp["max_age"]


def test_policy_vector_counts() -> None:
    """The tally reported to the project: agreement with the peers' verdicts."""
    agree, differ_rfc, differ_own = 0, [], []
    for e in POLICIES:
        ok, _, _ = verdict(e["policy_text"])
        peer = bool(e["valid"]) or http_reason(e)
        if ok == peer:
            agree += 1
        elif e.get("rfc_strict_differs"):
            differ_rfc.append(e["name"])
        else:
            differ_own.append(e["name"])
    assert len(POLICIES) == 50
    assert agree == 43
    assert sorted(differ_rfc) == [
        "mimecast-empty-max-age",
        "mimecast-max-age-1",
        "mimecast-no-max-age",
        "mimecast-testing",
    ]
    assert sorted(differ_own) == [
        "chasquid-parse-pol1",
        "chasquid-served-domain.com",
        "domaindetective-duplicate-mode",
    ]


def test_rejections_name_the_line() -> None:
    cases = {
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: xxx\n": "line 4",
        "version: STSv1\r\nmode: pretend\r\nmx: a.example\r\nmax_age: 1\r\n": "line 2",
        "version: STSv1\nmode none\nmx: a.example\nmax_age: 1\n": "line 2",
        "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n": "line 3",
        "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n": "line 1",
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n": "line 4",
        "version: STSv1\nmode: enforce\n  mx: a.example\nmax_age: 1\n": "line 3",
        "version: STSv1\nmode: enforce\nmax_age: 1\n": "no mx",
        "mode: enforce\nmx: a.example\nmax_age: 1\n": "no version",
    }
    for text, needle in cases.items():
        with pytest.raises(PolicyError, match=needle):
            parse_policy(text)


def test_mode_none_needs_no_mx_and_unknown_keys_ignored() -> None:
    p = parse_policy("version: STSv1\r\nmode: none\r\nmax_age: 0\r\nfoo_bar: baz qux\r\n")
    assert (p.mode, p.mx, p.max_age) == (StsMode.NONE, (), 0)
    assert p.extensions == (("foo_bar", "baz qux"),)


def test_policy_strings_and_bytes() -> None:
    p = parse_policy_bytes(
        b"version: STSv1\r\nmode: testing\r\nmx: *.Example.COM.\r\nmax_age: 86400"
    )
    assert p.mx == ("*.example.com",)
    assert p.policy_strings == (
        "version: STSv1",
        "mode: testing",
        "mx: *.Example.COM.",
        "max_age: 86400",
    )
    with pytest.raises(PolicyError, match="UTF-8"):
        parse_policy_bytes(b"version: STSv1\nmode: \xff\n")
    with pytest.raises(PolicyError, match="over"):
        parse_policy_bytes(b"a" * 70000)
    assert policy_allows(p, "MX1.example.com.")
    assert not policy_allows(p, "example.com")


@pytest.mark.parametrize("entry", MX + RFC["mx_patterns"], ids=lambda e: e["name"])
def test_mx_pattern_vectors(entry: dict[str, Any]) -> None:
    host = entry["mx_host"]
    if host is None:
        g = entry["mx_host_generator"]
        host = g["repeat"] * g["count"] + g["suffix"]
    expected = entry["match"]
    if entry["name"].startswith("mimecast-match") and expected:
        expected = False  # in-label "*" is outside RFC 8461's ABNF: never matches
    assert mx_matches(entry["pattern"], host) is expected


def test_mx_vector_counts() -> None:
    assert len(MX) == 28
    differ = [
        e["name"]
        for e in MX
        if e["mx_host"] and mx_matches(e["pattern"], e["mx_host"]) != e["match"]
    ]
    assert differ == ["mimecast-match-01", "mimecast-match-02"]


def txt_entries() -> list[dict[str, Any]]:
    return [e for e in TXT + RFC["txt_records"] if "valid" in e]


@pytest.mark.parametrize("entry", txt_entries(), ids=lambda e: e["name"])
def test_txt_vectors(entry: dict[str, Any]) -> None:
    txts = entry["txt"] if isinstance(entry["txt"], list) else [entry["txt"]]
    expected = TXT_OWN_VERDICT.get(entry["name"], entry["valid"])
    try:
        rec = select_record(txts)
    except PolicyError:
        assert not expected
        return
    assert expected
    assert rec.id == str(entry.get("expected_id", rec.id))


@pytest.mark.parametrize("entry", [e for e in TXT if "parsed" in e], ids=lambda e: e["name"])
def test_txt_tokenizer_vectors(entry: dict[str, Any]) -> None:
    assert dict(txt_tags(entry["txt"])) == entry["parsed"]
    if entry["parsed"]:
        assert parse_txt_record(entry["txt"]).id == entry["parsed"]["id"]


def test_txt_record_rules() -> None:
    assert select_record(["v=spf1 -all", "v=STSv1; id=abc123"]).id == "abc123"
    with pytest.raises(PolicyError, match="2 TXT records"):
        select_record(["v=STSv1; id=a", "v=STSv1; id=b"])
    with pytest.raises(PolicyError, match="no TXT record"):
        select_record(["v=STSv12; id=a"])
    with pytest.raises(PolicyError, match="id must be"):
        parse_txt_record("v=STSv1; id=" + "a" * 33)
    with pytest.raises(PolicyError, match="id must be"):
        parse_txt_record("v=STSv1; id=abc-def")
    with pytest.raises(PolicyError, match="invalid field value"):
        parse_txt_record("v=STSv1; id=abc; ext=a;b=")
    assert parse_txt_record("v=STSv1;id=x;ext-1=val").extensions == (("ext-1", "val"),)


# ---------------------------------------------------------------- properties

KEYS = st.sampled_from(["version", "mode", "mx", "max_age", "x", " mode", "mx ", "", "é"])
VALUES = st.one_of(
    st.sampled_from(
        [
            "STSv1",
            "enforce",
            "testing",
            "none",
            "*.a.b",
            "a..b",
            "86400",
            "-1",
            "31557601",
            "*",
            "xn--",
            "\u00f1.com",
            "",
        ]
    ),
    st.text(max_size=20),
)
LINE = st.tuples(KEYS, st.sampled_from([":", ": ", ":\t", " : ", ""]), VALUES).map("".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(LINE, max_size=8), st.sampled_from(["\n", "\r\n", "\r", ""]))
def test_parser_raises_only_policy_error(lines: list[str], sep: str) -> None:
    try:
        parse_policy(sep.join(lines))
    except PolicyError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parsers_raise_only_policy_error_on_any_text(text: str) -> None:
    for fn in (parse_policy, parse_txt_record, lambda t: select_record([t, t[:5]])):
        try:
            fn(text)
        except PolicyError:
            pass
    try:
        parse_policy_bytes(text.encode("utf-8", "surrogatepass"))
    except PolicyError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_mx_matches_never_raises(pattern: str, host: str) -> None:
    assert mx_matches(pattern, host) in (True, False)


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(StsMode)),
    st.lists(
        st.tuples(st.booleans(), st.lists(LABEL, min_size=1, max_size=4)), min_size=1, max_size=4
    ),
    st.integers(0, MAX_AGE_LIMIT),
    st.sampled_from(["\n", "\r\n"]),
    st.permutations(range(4)),
)
def test_round_trip(
    mode: StsMode, mxs: list[tuple[bool, list[str]]], age: int, eol: str, order: list[int]
) -> None:
    patterns = [("*." if wild else "") + ".".join(labels) for wild, labels in mxs]
    fields = [
        "version: STSv1",
        f"mode: {mode}",
        f"max_age: {age}",
        "\n".join(f"mx: {p}" for p in patterns),
    ]
    text = "\n".join(fields[i] for i in order).replace("\n", eol) + eol
    p = parse_policy(text)
    assert (p.mode, list(p.mx), p.max_age) == (mode, patterns, age)
    for wild, labels in mxs:
        host = ".".join(labels)
        assert policy_allows(p, ("sub." + host) if wild else host)
