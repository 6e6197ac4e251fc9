"""The one header parse (relay.message.ParsedMessage), read through relay.auth.results'
split_header and relay.auth.keys' header_values, gives what the earlier regex-driven
splits (kept here as the reference) gave, on any header block."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import keys
from relay.auth.keys import header_values, split_lines
from relay.auth.results import RawField, split_header
from relay.message import head_end

_HEADER_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:", re.MULTILINE)

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def reference_split_header(message: bytes) -> tuple[list[RawField], bytes]:
    """relay.auth.results' header split before the fast path."""
    if message.startswith((b"\r\n", b"\n")):
        return [], message
    m = _HEADER_END.search(message)
    if m is None:
        head, rest = message, b""
    else:
        cut = message.index(b"\n", m.start()) + 1  # the line end of the last field line
        head, rest = message[:cut], message[cut:]
    fields: list[RawField] = []
    for line in re.findall(rb"[^\n]*\n|[^\n]+$", head):
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = RawField(last.name, last.raw + line)
            continue
        name, colon, _ = line.partition(b":")
        ok = bool(colon) and re.fullmatch(rb"[!-9;-~]+[ \t]*", name) is not None
        fields.append(RawField(name.decode("ascii").strip() if ok else "", line))
    return fields, rest


def reference_header_values(
    message: bytes, want: frozenset[bytes] | None
) -> list[tuple[bytes, bytes]]:
    """relay.auth.keys' header values before the fast path, but for two fixes that make
    it agree with every other reader of the header block (there is one now): a message
    that starts with an empty line has no header fields (RFC 5322 section 2.1), and
    "LF CR LF" ends the block as it does for dkimpy; the old split read fields out of
    the body in both cases."""
    if message.startswith((b"\r\n", b"\n")):
        return []
    end = head_end(message)  # the old search missed an empty line after a bare LF
    head = message[: end + 1 if end >= 0 else len(message)]
    out: list[tuple[bytes, bytes]] = []
    current: list[bytes] | None = None
    name = b""
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            out.append((name, b" ".join(current)))
            current = None
        m = _HEADER_RE.match(line)
        if m and (want is None or m.group(1).lower() in want):
            name = m.group(1).lower()
            current = [line[m.end() :]]
    if current is not None:
        out.append((name, b" ".join(current)))
    return out


LINES = [b"From: a@b.test", b"\tcont", b" x", b"Subject:s", b"bad line", b"From x", b"To:"]
LINES += [b"", b"\r", b"DKIM-Signature: v=1", b"arc-seal :i=1", b"X \t: y", b"k:v:w", b"\x7f:"]
LINES += [b"\xc3\xa9: u", b":v", b"body text", b"ARC-Seal: i=2; b=A\r B"]
ENDS = [b"\r\n", b"\n", b"\r\r\n", b"", b"\r"]
messages = st.lists(
    st.tuples(st.sampled_from(LINES), st.sampled_from(ENDS)).map(b"".join), max_size=12
).map(b"".join)
WANTED = [frozenset({b"dkim-signature"}), frozenset(keys.KEYED_HEADERS), frozenset({b"to"})]


@settings(max_examples=300, deadline=None)
@given(messages)
def test_split_header_matches_the_reference(message: bytes) -> None:
    assert split_header(message) == reference_split_header(message)


@settings(max_examples=300, deadline=None)
@given(messages, st.sampled_from(WANTED))
def test_header_values_match_the_reference(message: bytes, want: frozenset[bytes]) -> None:
    assert header_values(message, want) == reference_header_values(message, want)


def test_a_folded_field_and_the_body_split_apart() -> None:
    message = b"DKIM-Signature: v=1;\r\n\tb=AB\r\n CD\r\nFrom: a@b.test\r\n\r\nbody\n\nmore\r\n"
    fields, rest = split_header(message)
    assert [f.name for f in fields] == ["DKIM-Signature", "From"]
    assert fields[0].raw == b"DKIM-Signature: v=1;\r\n\tb=AB\r\n CD\r\n"
    assert rest == b"\r\nbody\n\nmore\r\n"
    assert header_values(message, [b"dkim-signature", b"from"]) == [
        (b"dkim-signature", b" v=1; \tb=AB  CD"),
        (b"from", b" a@b.test"),
    ]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b" ", b"\r\r\n"]), max_size=16))
def test_split_lines_is_the_regex_split(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert split_lines(data) == re.split(rb"\r?\n", data)
