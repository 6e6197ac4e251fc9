"""relay.auth.fastrsa's fast paths give dkimpy's results byte for byte: the b= tag removal
(dkim.RE_BTAG), the header block parse (dkim.rfc822_parse, errors included) and the end
of the header block."""

from __future__ import annotations

import re
import time

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth.fastrsa import (
    _no_space,
    fold,
    parse_head,
    rfc822_parse,
    select_canonical,
    select_headers,
    strip_b_value,
    tag_value,
    validate_signature_fields,
)
from relay.message import head_end

# ---- b= removal ----

B_PIECES = [b"b", b"=", b" ", b"\t", b"\r\n", b"\n", b"\r", b";", b"a", b"Z", b"+", b"/"]
B_PIECES += [b"0", b"bh", b"\x0b", b"\x0c", b"-", b"B", b"==", b"; b=", b"\r\n\t", b"\xff"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(B_PIECES), max_size=30).map(b"".join))
def test_strip_b_value_is_dkimpys_re_btag(value: bytes) -> None:
    assert strip_b_value(value) == dkim.RE_BTAG.sub(b"\\1", value)


def _signature_value(tags: list[tuple[str, str]], fold: bool) -> bytes:
    value = "; ".join(f"{k}={v}" for k, v in tags).encode()
    return dkim.fold(value, namelen=16) if fold else value


signature_values = st.builds(
    _signature_value,
    st.lists(
        st.tuples(
            st.sampled_from(["v", "a", "b", "bh", "d", "s", "h", " b ", "b\t"]),
            st.text(alphabet="ab+/=019 \t\r\n", max_size=120),
        ),
        max_size=8,
    ),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(signature_values)
def test_strip_b_value_on_signature_like_values(value: bytes) -> None:
    assert strip_b_value(value) == dkim.RE_BTAG.sub(b"\\1", value)


def test_strip_b_value_on_a_real_folded_signature() -> None:
    b64 = b"UO2zYwHDN9d1ItLYm17VjIBC2+Bhhwc4udv/GZmv/++0oyPgITGJIoOP0UiVIVV539zvg" * 5
    value = dkim.fold(b"v=1; a=rsa-sha256; d=x.test; s=s; bh=AAAA=; b=" + b64 + b"==", 16)
    value = b" " + value + b"\r\n"
    assert strip_b_value(value) == dkim.RE_BTAG.sub(b"\\1", value)
    assert strip_b_value(value).endswith(b"b=")


# ---- the header block ----

HEAD_LINES = [b"From: a@b.test", b"\tcont", b" x", b"Subject:s", b"bad line", b"From x"]
HEAD_LINES += [b"To:", b"", b"\r", b"X-\x7f: y", b":empty", b"a b: c", b"X:\r", b"\xc3\xa9: u"]
HEAD_LINES += [b"k:v:w", b"Date: 1 2 3 12:00:00"]
ENDS = [b"\r\n", b"\n", b"\r\r\n", b""]
lines = st.lists(st.tuples(st.sampled_from(HEAD_LINES), st.sampled_from(ENDS)).map(b"".join))


def _outcome(fn: object, data: bytes) -> object:
    try:
        return fn(data)  # type: ignore[operator]
    except (dkim.MessageFormatError, IndexError) as exc:
        return (type(exc), str(exc))


@settings(max_examples=300, deadline=None)
@given(lines.map(b"".join))
def test_parse_head_is_dkimpys_rfc822_parse(head: bytes) -> None:
    want = _outcome(lambda h: dkim.rfc822_parse(h)[0], head)
    assert _outcome(parse_head, head) == want


@settings(max_examples=300, deadline=None)
@given(lines.map(b"".join), st.sampled_from([b"", b"body\r\n", b"a\nb\r\n", b"\r\n\r\n"]))
def test_rfc822_parse_is_dkimpys(head: bytes, body: bytes) -> None:
    message = head + body
    assert _outcome(rfc822_parse, message) == _outcome(dkim.rfc822_parse, message)


_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _head_end_by_regex(message: bytes) -> int:
    """The end the regex searches found before (results, fastrsa)."""
    m = _HEADER_END.search(message)
    return -1 if m is None else message.index(b"\n", m.start())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b" "]), max_size=20).map(b"".join))
def test_head_end_is_the_regex_search(message: bytes) -> None:
    assert head_end(message) == _head_end_by_regex(message)
    if head_end(message) >= 0:
        found = re.search(rb"\n\r?\n", message)
        assert found is not None and found.start() == head_end(message)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(B_PIECES), max_size=30).map(b"".join))
def test_strip_b_value_twice_changes_nothing_unless_the_value_starts_with_b(value: bytes) -> None:
    once = strip_b_value(value)
    assert strip_b_value(once) == once
    if not once.startswith(b"b"):  # gen_header's condition for skipping the second removal
        assert strip_b_value(b" " + once) == b" " + once


# ---- header selection ----

NAMES = [b"From", b"from", b"FROM", b"To", b"Subject", b"x-a", b"ARC-Seal", b"arc-seal"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(NAMES), st.binary(max_size=3)), max_size=10),
    st.lists(st.sampled_from([n.lower() for n in NAMES] + [b"cc"]), max_size=8),
)
def test_select_headers_is_dkimpys(
    headers: list[tuple[bytes, bytes]], include: list[bytes]
) -> None:
    got = select_headers(headers, include)
    want = dkim.select_headers(headers, include)
    assert got == want
    assert all(a is b for a, b in zip(got, want, strict=True))  # the same field objects


CANON_NAMES = NAMES + [b"From ", b"subject\t", b"To  "]  # obsolete WSP before the colon
VALUES = [b"", b" x", b"  a\r\n\tb ", b"\tc", b" d\n e", b"x  y"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(CANON_NAMES), st.sampled_from(VALUES)), max_size=12),
    st.lists(st.sampled_from([n.lower() for n in NAMES] + [b"cc"]), max_size=8),
    st.sampled_from([b"relaxed/relaxed", b"simple/simple", b"simple/relaxed"]),
)
def test_select_canonical_is_canonicalise_all_then_select(
    headers: list[tuple[bytes, bytes]], include: list[bytes], c: bytes
) -> None:
    """Canonicalising only the selected fields gives dkimpy's list: every field
    canonicalised, then selected (the names with WSP before the colon included)."""
    policy = dkim.CanonicalizationPolicy.from_c_value(c)
    want = dkim.select_headers(policy.canonicalize_headers([list(h) for h in headers]), include)
    got = select_canonical(policy, headers, include)
    assert [tuple(f) for f in got] == [tuple(f) for f in want]


# ---- tag=value lists ----

TAG_PIECES = [b"v", b"=", b"1", b";", b" ", b"\t", b"\r\n ", b"b", b"bh", b"_x", b"9a", b"a_1"]
TAG_PIECES += [b"\xc3\xa9", b"==", b";;", b"d=x.test", b"h=from : to", b"\x0b", b"A"]


def _tags_outcome(fn: object, value: bytes) -> object:
    try:
        return fn(value)  # type: ignore[operator]
    except InvalidTagValueList as exc:
        return (type(exc), exc.args)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TAG_PIECES), max_size=16).map(b"".join))
def test_tag_value_is_dkimpys_parse_tag_value(value: bytes) -> None:
    assert _tags_outcome(tag_value, value) == _tags_outcome(parse_tag_value, value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_no_space_is_the_regex_removal(value: bytes) -> None:
    assert _no_space(value) == re.sub(rb"\s+", b"", value)


# ---- signature field checks ----

NOW = int(time.time())  # t= and x= values well inside dkimpy's 10 hours of slop
FIELD_VALUES = {
    b"v": [b"1", b"2"],
    b"a": [b"rsa-sha256", b"rsa-sha1", b"ed25519-sha256", b"hmac"],
    b"b": [b"QUJD", b"QUJ", b"QU JD\r\n ==", b"=QUJD", b"QUJD==", b"QU=JD", b"", b"Q!JD"],
    b"bh": [b"QUJD", b"QUJ", b"QUJD==", b"", b"Q U J D"],
    b"d": [b"x.test", b"x.Test", b"a@b", b"\xc3\xa9.test", b"(x)", b""],
    b"i": [b"@x.test", b"u@sub.x.test", b"x.test", b"u@X.TEST", b"u@other.test", b"ux.test"],
    b"h": [b"from"],
    b"s": [b"sel"],
    b"l": [b"10", b"x", b"1" * 80, b""],
    b"q": [b"dns/txt", b"dns"],
    b"t": [b"1", b"x", b"99999999999", b"", b"%d" % (NOW - 100)],
    b"x": [b"1", b"x", b"99999999999", b"2", b"%d" % (NOW - 200), b"%d" % (NOW + 100)],
    b"cv": [b"pass", b"fail", b"none", b"maybe"],
}
sig_dicts = st.lists(
    st.sampled_from(sorted(FIELD_VALUES)).flatmap(
        lambda k: st.tuples(st.just(k), st.sampled_from(FIELD_VALUES[k]))
    ),
    max_size=12,
).map(dict)


def _check_outcome(
    fn: object, sig: dict[bytes, bytes], mandatory: list[bytes], arc: bool
) -> object:
    try:
        fn(dict(sig), mandatory, arc)  # type: ignore[operator]
    except (dkim.ValidationError, KeyError, IndexError) as exc:
        return (type(exc), str(exc))
    return None


@settings(max_examples=400, deadline=None)
@given(
    sig_dicts,
    st.sampled_from(
        [
            [b"v", b"a", b"b", b"bh", b"d", b"h", b"s"],
            [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"],
            [b"i", b"a", b"b", b"cv", b"d", b"s"],
            [],
        ]
    ),
    st.booleans(),
)
def test_validate_signature_fields_is_dkimpys(
    sig: dict[bytes, bytes], mandatory: list[bytes], arc: bool
) -> None:
    ours = _check_outcome(validate_signature_fields, sig, mandatory, arc)
    assert ours == _check_outcome(dkim.validate_signature_fields, sig, mandatory, arc)


def test_validate_signature_fields_default_mandatory_list_is_dkimpys() -> None:
    sig = {b"v": b"1", b"a": b"rsa-sha256", b"b": b"QUJD", b"d": b"x.test", b"h": b"from"}
    for fn in (validate_signature_fields, dkim.validate_signature_fields):
        try:
            fn(sig)
        except dkim.ValidationError as exc:
            assert str(exc) == "missing b'bh'="
        else:
            raise AssertionError("bh= is mandatory")


def test_validate_signature_fields_time_checks_are_dkimpys() -> None:
    base = {b"v": b"1", b"a": b"rsa-sha256", b"b": b"QUJD", b"bh": b"QUJD", b"d": b"x.test"}
    base |= {b"h": b"from", b"s": b"sel", b"i": b"@x.test"}
    outcomes = set()
    for t in [None, *FIELD_VALUES[b"t"]]:
        for x in [None, *FIELD_VALUES[b"x"]]:
            sig = dict(base)
            if t is not None:
                sig[b"t"] = t
            if x is not None:
                sig[b"x"] = x
            ours = _check_outcome(validate_signature_fields, sig, [], False)
            assert ours == _check_outcome(dkim.validate_signature_fields, sig, [], False)
            outcomes.add("ok" if ours is None else str(ours[1]).split("(")[0])  # type: ignore[index]
    assert len(outcomes) >= 6  # passes, and each time check fails somewhere


# ---- folding ----

FOLD_PIECES = [
    b"a",
    b"bb",
    b" ",
    b"\r\n ",
    b"\r\n",
    b";",
    b"xyz" * 5,
    b"  ",
    b"\n",
    b"b=" + b"A" * 40,
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(FOLD_PIECES), max_size=40).map(b"".join),
    st.sampled_from([0, 5, 14, 21, 22, 60, 71, 72, 73, 80]),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_fold_is_dkimpys(header: bytes, namelen: int, linesep: bytes) -> None:
    assert fold(header, namelen=namelen, linesep=linesep) == dkim.fold(
        header, namelen=namelen, linesep=linesep
    )
