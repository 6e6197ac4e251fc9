"""Hypothesis fuzz of the parsers that read what senders write: DKIM key records
(relay.auth.keys), the ARC set structure and its i= reader (relay.auth.arc,
relay.auth.arcfields), and incoming Authentication-Results / ARC-Authentication-Results
values (relay.auth.results). Each raises only its documented error, never crashes, and
agrees with dkimpy where dkimpy has the same parser."""

from __future__ import annotations

import base64

import dkim
import dkim.util
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relay.auth.arc import ArcStructure, arc_structure
from relay.auth.arcfields import AAR, AMS, AS, aar_dmarc, aar_split, arc_instance
from relay.auth.keys import KeyRecordError, PublicKey, parse_key_record
from relay.auth.results import AuthResultsSyntaxError, authserv_id_of, parse_value
from relay.message import ParsedMessage

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- DKIM key records (RFC 6376 section 3.6.1) ----

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
RSA_P = base64.b64encode(
    _RSA.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
).decode()
ED_P = base64.b64encode(
    ed25519.Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
).decode()

junk = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
wsp = st.sampled_from(["", " ", "\t", "  ", "\r\n "])
p_value = st.one_of(
    st.sampled_from([RSA_P, ED_P, "", "AAAA", "!!!", RSA_P[:40], ED_P[:-4], RSA_P + "="]),
    st.just(RSA_P).map(lambda p: p[:20] + " " + p[20:]),
    junk,
)
tag = st.one_of(
    st.tuples(st.just("v"), st.sampled_from(["DKIM1", "DKIM2", "", "dkim1"])),
    st.tuples(st.just("k"), st.sampled_from(["rsa", "ed25519", "RSA", "dsa", ""])),
    st.tuples(st.just("p"), p_value),
    st.tuples(st.just("s"), st.sampled_from(["*", "email", "tlsrpt", "email:tlsrpt", ""])),
    st.tuples(st.just("t"), st.sampled_from(["y", "s", "y:s", "", "x"])),
    st.tuples(st.just("h"), st.sampled_from(["sha256", "sha1:sha256"])),
    st.tuples(st.sampled_from(["n", "x1", "1x", "", "é", "p"]), junk),
)


@st.composite
def key_records(draw: st.DrawFn) -> str:
    tags = draw(st.lists(tag, max_size=6))
    parts = [f"{draw(wsp)}{k}{draw(wsp)}={draw(wsp)}{v}{draw(wsp)}" for k, v in tags]
    record = ";".join(parts) + draw(st.sampled_from(["", ";", "; ", ";;"]))
    return record if draw(st.booleans()) else draw(junk) + record


def _dkimpy(record: str) -> tuple[int, bytes] | type[Exception]:
    try:
        _pk, keysize, ktag, _ = dkim.evaluate_pk(b"x", record.encode("utf-8"))
    except (dkim.KeyFormatError, dkim.DKIMException, ValueError, TypeError, IndexError) as exc:
        return type(exc)
    return keysize, ktag


@FUZZ
@given(key_records())
def test_key_record_parser_raises_only_key_record_error(record: str) -> None:
    try:
        key = parse_key_record(record)
    except KeyRecordError:
        return
    assert isinstance(key, PublicKey) and key.key_type in ("rsa", "ed25519")
    if key.key_type == "rsa":
        # dkimpy reads an RSA key we accept as the same key (ed25519 needs PyNaCl there);
        # we tolerate empty tag-specs (";;"), which dkimpy refuses, and FWS anywhere in the
        # base64 of p= (RFC 6376 3.6.1: base64string allows FWS; dkimpy 1.1.8 reads a
        # space there as no key), so both are normalised before asking it
        def norm(part: str) -> str:
            name, eq, value = part.partition("=")
            return f"{name}={''.join(value.split())}" if eq and name.strip() == "p" else part

        tolerant = ";".join(norm(p) for p in record.split(";") if p.strip())
        assert _dkimpy(tolerant) == (key.bits, b"rsa")
        assert key.bits == 1024


@pytest.mark.parametrize(
    "record",
    [f"v=DKIM1; k=rsa; p={RSA_P}", f"p={RSA_P}", f"k=rsa;p={RSA_P[:30]}\t{RSA_P[30:]};"],
)
def test_key_records_dkimpy_accepts_are_accepted(record: str) -> None:
    assert _dkimpy(record) == (1024, b"rsa")
    assert parse_key_record(record).bits == 1024


# ---- the ARC i= reader and the set structure (RFC 8617 sections 4.1, 4.2.1, 5.2) ----

tag_names = st.sampled_from(["i", "a", "b", "bh", "cv", "d", "s", "h", "t", " i", "I"])
tag_values = st.one_of(
    st.integers(0, 10**12).map(str), st.sampled_from(["", " 1", "1 ", "x", "1x", "٣"]), junk
)


@st.composite
def tag_lists(draw: st.DrawFn) -> bytes:
    tags = draw(st.lists(st.tuples(tag_names, tag_values), max_size=7))
    text = "; ".join(f"{k}{draw(wsp)}={draw(wsp)}{v}" for k, v in tags)
    return text.encode("utf-8")


@FUZZ
@given(
    st.sampled_from([AAR, AMS, AS, b"ARC-Seal", b"x-other"]), st.one_of(tag_lists(), st.binary())
)
def test_arc_instance_is_a_positive_int_or_none(name: bytes, value: bytes) -> None:
    got = arc_instance(name, value)
    assert got is None or (isinstance(got, int) and got >= 1)
    inst, rest = aar_split(value)
    assert inst is None or (inst >= 0 and value.endswith(rest))


@FUZZ
@given(tag_lists())
def test_arc_instance_agrees_with_dkimpys_tag_parser(value: bytes) -> None:
    """Where dkimpy's strict tag-list parser reads the value, its i= is our instance
    (anywhere in the list, last too)."""
    try:
        tags = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        return
    raw = tags.get(b"i")
    assume(raw is not None)
    assert raw is not None
    digits = b"".join(raw.split())
    want = int(digits) if digits.isdigit() and digits.isascii() and len(digits) <= 9 else None
    if want == 0:
        want = None
    assert arc_instance(AMS, value) == want
    assert arc_instance(AS, value) == want


@FUZZ
@given(st.integers(1, 10**9 - 1), st.sampled_from(["", " ", "\t"]), junk)
def test_aar_instance_is_read_from_the_start(n: int, space: str, payload: str) -> None:
    value = f"{space}i={space}{n}{space};{payload}".encode()
    assert arc_instance(AAR, value) == n
    m = dkim.ARC.INSTANCE_RE.search(value)  # dkimpy's reader agrees on this form
    assert m is not None and int(m.group(1)) == n
    assert arc_instance(AAR, f"x.test; i={n}".encode()) is None  # not at the start


arc_lines = st.one_of(
    st.builds(
        lambda name, body: name + b": " + body + b"\r\n",
        st.sampled_from([b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results"]),
        st.one_of(tag_lists(), st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))),
    ),
    st.sampled_from([b"From: a@b.test\r\n", b" folded\r\n", b"junk\r\n", b"\tx=1; i=2\r\n"]),
)


@FUZZ
@given(st.lists(arc_lines, max_size=10))
def test_arc_structure_never_crashes(lines: list[bytes]) -> None:
    message = ParsedMessage.parse(b"".join(lines) + b"\r\nbody\r\n")
    s = arc_structure(message)
    assert isinstance(s, ArcStructure)
    assert 0 <= s.instances
    if not s.failure:
        assert [x.instance for x in s.sets] == list(range(1, s.instances + 1))
        assert s.instances <= 50
    readable = [
        arc_instance(f.name.encode(), f.unfolded())
        for f in message.fields
        if f.lname.encode() in (AAR, AMS, AS)
    ]
    assert s.instances == max((i for i in readable if i is not None), default=0)


# ---- Authentication-Results and AAR values (RFC 8601 section 2.2) ----

ar_pieces = st.sampled_from(
    [
        "example.net",
        " 1",
        ";",
        " spf=pass",
        " dkim=fail",
        " dmarc=pass",
        " (comment",
        ")",
        " (a (nested) one)",
        ' "quoted',
        '"',
        "\\",
        " smtp.mailfrom=a@b.test",
        " header.d=",
        " reason=",
        "=",
        ".",
        "/",
        " none",
        "\r\n\t",
        "@",
        "i=1;",
    ]
)
ar_values = st.one_of(st.lists(ar_pieces, max_size=14).map("".join), st.text(max_size=40))


@FUZZ
@given(ar_values)
def test_auth_results_parser_raises_only_its_syntax_error(text: str) -> None:
    try:
        parsed = parse_value(text)
    except AuthResultsSyntaxError:
        parsed = None
    if parsed is not None:
        assert all(r.method == r.method.lower() and r.result for r in parsed.results)
    found = authserv_id_of(text)
    assert found is None or isinstance(found, str)
    result = aar_dmarc(text)
    assert result == result.lower()
    if result:
        assert parsed is not None or aar_split(text.encode())[0] is not None


def test_aar_dmarc_reads_results_not_comments_or_strings() -> None:
    assert aar_dmarc("i=1; lists.example; dmarc=pass (p=reject) header.from=x.example") == "pass"
    assert aar_dmarc(b"i=2; a.example; spf=pass; dmarc=fail") == "fail"
    assert aar_dmarc("i=1; a.example; spf=pass (dmarc=pass in a comment)") == ""
    assert aar_dmarc('i=1; a.example; spf=pass smtp.mailfrom="dmarc=pass"@x.example') == ""
