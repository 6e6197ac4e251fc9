"""The message as every stage reads it: parsed once at the end of DATA, never mutated.

``ParsedMessage`` holds the raw bytes, the header block split into fields (each with its
raw bytes, folding and line ends included, and its name), and where the body starts.
Intake parses the bytes the SMTP session accepted once; each stage that adds or removes
header fields (our Received field, the forged Authentication-Results removal, our A-R,
the ARC set) makes a new value with ``prepend`` / ``without``, which parse only the
prepended lines and reuse every other field. The SPF, DKIM, DMARC and ARC checks, the
seal, the aliases and SRS (envelope only) and the spool all read the value they are
handed; no stage parses the header block again and no module keeps "the last message".

Splitting rules (RFC 5322 section 2.2, tolerant of LF-only line ends): the header block
ends at the first empty line; a line starting with WSP continues the field before it; a
line with no field name and colon is kept as a field with name "" (so the bytes stay as
they came; the DKIM view in ``relay.auth.fastrsa`` rejects it as dkimpy does).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*")  # RFC 5322 ftext, then WSP before the colon


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field as it appears in the message, folding and line end included."""

    name: str  # as written (WSP before the colon removed); "" for a line that is no field
    raw: bytes

    @property
    def lname(self) -> str:
        return self.name.lower()

    @property
    def value(self) -> str:
        """The text after the colon, folding kept, the final line end removed."""
        _, _, v = self.raw.partition(b":")
        return v.decode("utf-8", "replace").rstrip("\r\n")

    def unfolded(self) -> bytes:
        """The value's bytes unfolded: its lines (line ends removed) joined by one space,
        each continuation line keeping its leading WSP."""
        _, _, v = self.raw.partition(b":")
        lines = v.replace(b"\r\n", b"\n").split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        return b" ".join(lines)


def head_end(message: bytes) -> int:
    """Where the header block ends: the index of the first LF followed by an empty line
    (``\\n\\r?\\n``), or -1. Two plain finds, which beat a regex search of the body."""
    crlf = message.find(b"\n\r\n")
    lf = message.find(b"\n\n", 0, len(message) if crlf < 0 else crlf + 1)
    return lf if lf >= 0 else crlf


def _field_name(line: bytes) -> str:
    name, colon, _ = line.partition(b":")
    if colon and _FIELD_NAME.fullmatch(name) is not None:
        return name.decode("ascii").strip()
    return ""


def split_fields(head: bytes) -> list[HeaderField]:
    """The fields of a header block (no empty line in it), bytes kept as they are."""
    lines = head.split(b"\n")
    tail = lines.pop()  # b"" when head ends with a line end
    fields: list[HeaderField] = []
    pieces: list[bytes] = []  # the current field's lines, line ends restored
    name = ""
    for bare in lines:
        line = bare + b"\n"
        if pieces and line[:1] in (b" ", b"\t"):  # a continuation line
            pieces.append(line)
            continue
        if pieces:
            fields.append(HeaderField(name, b"".join(pieces)))
        name = _field_name(line)
        pieces = [line]
    if tail:
        if pieces and tail[:1] in (b" ", b"\t"):
            pieces.append(tail)
        else:
            if pieces:
                fields.append(HeaderField(name, b"".join(pieces)))
            name = _field_name(tail)
            pieces = [tail]
    if pieces:
        fields.append(HeaderField(name, b"".join(pieces)))
    return fields


def _rebuild(raw: bytes) -> ParsedMessage:
    return ParsedMessage.parse(raw)


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """One message: raw bytes, header fields, where the empty line and the body start.

    ``head_len`` is the header block's length (the fields' raw bytes end to end);
    ``body_offset`` the index of the body, after the empty line (``len(raw)`` when the
    message has no empty line). Pickled as its bytes (a worker process parses it again).
    """

    raw: bytes
    fields: tuple[HeaderField, ...]
    head_len: int
    body_offset: int

    @classmethod
    def parse(cls, raw: bytes) -> ParsedMessage:
        if raw.startswith((b"\r\n", b"\n")):
            return cls(raw, (), 0, 2 if raw.startswith(b"\r\n") else 1)
        end = head_end(raw)
        if end < 0:
            return cls(raw, tuple(split_fields(raw)), len(raw), len(raw))
        skip = 2 if raw[end + 1 : end + 2] == b"\n" else 3
        return cls(raw, tuple(split_fields(raw[: end + 1])), end + 1, end + skip)

    def __reduce__(self) -> tuple[Callable[[bytes], ParsedMessage], tuple[bytes]]:
        return _rebuild, (self.raw,)

    # ---- reading ----

    @property
    def has_empty_line(self) -> bool:
        """The header block ends with an empty line (else the message is all header)."""
        return self.body_offset > self.head_len or not self.raw

    def header_block(self) -> bytes:
        """The header fields' bytes, without the empty line."""
        return self.raw[: self.head_len]

    def rest(self) -> bytes:
        """The empty line and the body."""
        return self.raw[self.head_len :]

    def body(self) -> bytes:
        return self.raw[self.body_offset :]

    def get_all(self, name: str) -> tuple[HeaderField, ...]:
        """Every field of that name (any case), top first."""
        want = name.lower()
        return tuple(f for f in self.fields if f.name and f.name.lower() == want)

    def first(self, name: str) -> HeaderField | None:
        found = self.get_all(name)
        return found[0] if found else None

    # ---- new values ----

    def prepend(self, *lines: bytes) -> ParsedMessage:
        """A new message with whole header fields (each ending with a line end) put on
        top; only those are parsed, the rest is reused."""
        prefix = b"".join(lines)
        if not prefix:
            return self
        if (
            not prefix.endswith(b"\n")
            or head_end(prefix + b"x") >= 0
            or prefix.startswith((b"\r\n", b"\n"))
            or (self.raw[:1] in (b" ", b"\t"))  # would continue the last prepended field
            or not self.has_empty_line
        ):
            return ParsedMessage.parse(prefix + self.raw)
        new = tuple(split_fields(prefix))
        n = len(prefix)
        return ParsedMessage(
            prefix + self.raw, new + self.fields, self.head_len + n, self.body_offset + n
        )

    def without(self, drop: Callable[[HeaderField], bool]) -> tuple[ParsedMessage, int]:
        """A new message without the fields ``drop`` picks, and how many were dropped."""
        kept = [f for f in self.fields if not drop(f)]
        removed = len(self.fields) - len(kept)
        if not removed:
            return self, 0
        head = b"".join(f.raw for f in kept)
        raw = head + self.rest()
        cut = self.head_len - len(head)
        return ParsedMessage(raw, tuple(kept), len(head), self.body_offset - cut), removed


Message = ParsedMessage | bytes


def as_parsed(message: Message) -> ParsedMessage:
    """The parsed value (callers at the edges, tests and ``relay diagnose``, hand bytes;
    the pipeline hands the value intake parsed)."""
    return message if isinstance(message, ParsedMessage) else ParsedMessage.parse(message)
