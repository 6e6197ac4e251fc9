"""The Authentication-Results header field (RFC 8601): build ours, strip forged ones, parse.

- ``format_value`` / ``format_header`` build exactly one A-R with our authserv-id: ``spf``
  (smtp.mailfrom or smtp.helo), ``dkim`` per signature (header.d, header.s, header.b; or
  ``dkim=none``), ``dmarc`` (comment ``p=`` applicable policy, ``dis=`` what we did, and
  on an ARC override ``arc-sealer=``; header.from; ``policy.override=trusted_forwarder``
  when a trusted ARC chain overrode a DMARC fail, the RFC 7489 Appendix C override type),
  ``arc`` (comment with the chain length, ``header.oldest-pass``, ``smtp.remote-ip``:
  RFC 8617 section 10.2). Every value taken from the message or the envelope is emitted
  as a token, a domain name or a quoted-string; anything that cannot be quoted safely
  (CR, LF, other controls, non-ASCII) is left out, so hostile input can never inject a
  header line or a result.
- ``strip_ours`` removes incoming A-R fields, and only those, whose authserv-id is ours
  (section 5: they are forgeries), before anything is evaluated.
- ``parse_value`` reads an A-R value (or an AAR's payload, ``relay.auth.arcfields``)
  back into resinfos.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from relay.auth.types import (
    ArcCv,
    AuthResults,
    DkimResult,
    DmarcResult,
    DmarcResultCode,
    SpfResult,
)
from relay.message import HeaderField, Message, ParsedMessage, as_parsed

HEADER_NAME = "Authentication-Results"
FOLD_WIDTH = 78
MAX_VALUE = 256  # longest property value emitted (longer ones are left out)
REASON_MAX = 120
TRUSTED_FORWARDER = "trusted_forwarder"

_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")  # RFC 2045 token
_ATEXT_DOTS = re.compile(r"[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+(\.[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+)*")
_DOMAIN = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


# ---- header block access ----


RawField = HeaderField  # one header field of a ParsedMessage (relay.message)


def split_header(message: Message) -> tuple[list[RawField], bytes]:
    """(header fields, the rest: empty line and body) of the parsed message."""
    pm = as_parsed(message)
    return list(pm.fields), pm.rest()


def header_fields(message: Message) -> list[tuple[str, str]]:
    """(name, value) of every header field, values with folding kept."""
    return [(f.name, f.value) for f in as_parsed(message).fields if f.name]


# ---- reading A-R values ----


class AuthResultsSyntaxError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ResInfo:
    method: str  # lower case
    result: str  # lower case
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()  # ("header.d", "example.com"), unquoted

    def prop(self, name: str) -> str:
        for k, v in self.properties:
            if k == name:
                return v
        return ""


@dataclass(frozen=True, slots=True)
class ParsedAuthResults:
    authserv_id: str
    version: str = ""
    results: tuple[ResInfo, ...] = ()


class _Reader:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def cfws(self) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "(":
                depth = 0
                while self.i < len(self.s):
                    c = self.s[self.i]
                    if c == "\\":
                        self.i += 2
                        continue
                    if c == "(":
                        depth += 1
                    elif c == ")":
                        depth -= 1
                        if depth == 0:
                            self.i += 1
                            break
                    self.i += 1
                else:
                    raise AuthResultsSyntaxError("unterminated comment")
            else:
                return

    def quoted(self) -> str:
        assert self.peek() == '"'
        self.i += 1
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < len(self.s):
                out.append(self.s[self.i + 1])
                self.i += 2
                continue
            if c == '"':
                self.i += 1
                return "".join(out)
            if c in "\r\n":
                raise AuthResultsSyntaxError("line break inside a quoted-string")
            out.append(c)
            self.i += 1
        raise AuthResultsSyntaxError("unterminated quoted-string")

    def word(self, stops: str) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in ' \t\r\n();"' + stops:
            self.i += 1
        if self.i == start:
            raise AuthResultsSyntaxError(f"expected a word at offset {start}")
        return self.s[start : self.i]

    def value(self, stops: str = "") -> str:
        if self.peek() == '"':
            return self.quoted()
        return self.word(stops)

    def expect(self, char: str) -> None:
        self.cfws()
        if self.peek() != char:
            raise AuthResultsSyntaxError(f"expected {char!r} at offset {self.i}")
        self.i += 1

    def pvalue(self) -> str:
        self.cfws()
        if self.peek() == '"':
            local = self.quoted()
            if self.peek() == "@":
                self.i += 1
                return f"{local}@{self.word('')}"
            return local
        return self.word("")


def parse_value(text: str) -> ParsedAuthResults:
    """Parse an A-R value (folding allowed). Raises AuthResultsSyntaxError."""
    r = _Reader(text)
    r.cfws()
    authserv_id = r.value("/=")
    r.cfws()
    version = ""
    if r.peek().isdigit():
        version = r.word("")
        r.cfws()
    results: list[ResInfo] = []
    while True:
        r.cfws()
        if not r.peek():
            break
        r.expect(";")
        r.cfws()
        if not r.peek():
            break  # a trailing ";" is tolerated
        method = r.word("=/.").lower()
        r.cfws()
        if r.peek() == "/":
            r.i += 1
            r.cfws()
            r.word("=")
            r.cfws()
        if method == "none" and not results and r.peek() in ("", ";"):
            break
        r.expect("=")
        r.cfws()
        result = r.word("=").lower()
        reason = ""
        props: list[tuple[str, str]] = []
        while True:
            r.cfws()
            if r.peek() in ("", ";"):
                break
            key = r.word("=.").lower()
            r.cfws()
            if r.peek() == "=" and key == "reason":
                r.i += 1
                r.cfws()
                reason = r.value("")
                continue
            r.expect(".")
            r.cfws()
            prop = r.word("=").lower()
            r.expect("=")
            props.append((f"{key}.{prop}", r.pvalue()))
        results.append(ResInfo(method, result, reason, tuple(props)))
    return ParsedAuthResults(authserv_id, version, tuple(results))


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of an A-R value, or None when it cannot be read."""
    r = _Reader(value)
    try:
        r.cfws()
        return r.value("/=;")
    except AuthResultsSyntaxError:
        return None


def _same_id(a: str, b: str) -> bool:
    return a.strip().rstrip(".").lower() == b.strip().rstrip(".").lower()


def strip_ours(message: Message, authserv_id: str) -> tuple[ParsedMessage, int]:
    """message without the Authentication-Results fields claiming authserv_id (RFC 8601
    section 5), and how many were removed. Other fields are left byte for byte."""

    def ours(f: HeaderField) -> bool:
        if f.lname != "authentication-results":
            return False
        found = authserv_id_of(f.value)
        return found is not None and _same_id(found, authserv_id)

    return as_parsed(message).without(ours)


# ---- building ours ----


def _printable(text: str) -> bool:
    """Every character is printable ASCII (0x20-0x7E), what a per-character check of
    ``0x20 <= ord(c) < 0x7F`` says, in two C calls."""
    return text.isascii() and text.isprintable()


def _quoted(text: str) -> str | None:
    if len(text) > MAX_VALUE or not _printable(text):
        return None
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(text: str) -> str | None:
    """A token, else a quoted-string, else None (not representable safely)."""
    if _TOKEN.fullmatch(text) and len(text) <= MAX_VALUE:
        return text
    return _quoted(text)


def _domain(text: str) -> str | None:
    text = text.strip()
    if _DOMAIN.fullmatch(text):
        return text.lower().rstrip(".")
    return _value(text)


def _mailbox(address: str) -> str | None:
    """local@domain as a pvalue; the domain alone when the local part cannot be kept."""
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, dom = address.rpartition("@")
    if not at:
        return _domain(address)
    domain = dom.strip().lower().rstrip(".")
    if not _DOMAIN.fullmatch(domain):
        return None
    if _ATEXT_DOTS.fullmatch(local) and len(local) <= 64:
        return f"{local}@{domain}"
    quoted = _quoted(local) if len(local) <= 64 else None
    if quoted is not None and local:
        return f"{quoted}@{domain}"
    return domain


def _comment(text: str) -> str:
    if _printable(text) and "(" not in text and ")" not in text and "\\" not in text:
        clean = text  # nothing to drop
    else:
        clean = "".join(c for c in text if 0x20 <= ord(c) < 0x7F and c not in "()\\")
    return f"({clean.strip()})" if clean.strip() else ""


def _prop(name: str, value: str | None) -> str:
    return f"{name}={value}" if value else ""


@dataclass(frozen=True, slots=True)
class ResInfoText:
    """One resinfo as parts that may be folded between (never inside)."""

    parts: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join(self.parts)


def _resinfo(*parts: str) -> ResInfoText:
    return ResInfoText(tuple(p for p in parts if p))


def _spf(spf: SpfResult, mail_from: str, helo: str) -> ResInfoText:
    if spf.identity == "helo":
        return _resinfo(f"spf={spf.result}", _prop("smtp.helo", _domain(helo or spf.domain)))
    who = _mailbox(mail_from) if mail_from.strip("<> ") else None
    return _resinfo(f"spf={spf.result}", _prop("smtp.mailfrom", who or _domain(spf.domain)))


def _reason(text: str) -> str:
    if _printable(text):
        clean = text[:REASON_MAX]
    else:
        clean = "".join(c for c in text if 0x20 <= ord(c) < 0x7F)[:REASON_MAX]
    q = _quoted(clean)
    return f"reason={q}" if clean and q else ""


def _dkim(sig: DkimResult) -> ResInfoText:
    reason = _reason(sig.reason) if sig.result != "pass" else ""
    return _resinfo(
        f"dkim={sig.result}",
        reason,
        _prop("header.d", _domain(sig.domain)) if sig.domain else "",
        _prop("header.s", _value(sig.selector)) if sig.selector else "",
        _prop("header.b", _value(sig.b)) if sig.b else "",
    )


def _dmarc(d: DmarcResult, disposition: str, override: str) -> ResInfoText:
    comment = ""
    if d.record_policy:
        words = [f"p={d.record_policy}"]
        if d.testing:
            words.append("t=y")
        if disposition:
            words.append(f"dis={disposition}")
        if override:
            words.append(f"arc-sealer={override}")
        comment = _comment(" ".join(words))
    return _resinfo(
        f"dmarc={d.result}",
        comment,
        _prop("header.from", _domain(d.header_from)) if d.header_from else "",
        # the policy that applies after sp=/np=/t= (RFC 9989 A-R registry: policy.dmarc),
        # given on a fail, where it decides what happens to the message
        _prop("policy.dmarc", d.policy)
        if d.result is DmarcResultCode.FAIL and d.record_policy
        else "",
        _prop("policy.override", TRUSTED_FORWARDER) if override else "",
    )


def _arc(results: AuthResults, client_ip: str) -> ResInfoText:
    arc = results.arc
    assert arc is not None
    if arc.cv is ArcCv.NONE:
        return _resinfo("arc=none")
    comment = f"i={arc.instances}"
    if arc.cv is ArcCv.PASS and arc.oldest_pass:
        comment += f" oldest-pass={arc.oldest_pass}"
    if arc.sealers:
        comment += " sealers=" + ",".join(s for s in arc.sealers if _DOMAIN.fullmatch(s))
    return _resinfo(
        f"arc={arc.cv}",
        _comment(comment),
        _prop("header.oldest-pass", str(arc.oldest_pass))
        if arc.cv is ArcCv.PASS and arc.oldest_pass
        else "",
        _prop("smtp.remote-ip", _value(client_ip)) if client_ip else "",
    )


def auth_resinfo(user: str) -> ResInfoText:
    """RFC 8601 section 2.7.4: the client authenticated with SMTP AUTH (RFC 4954) as user."""
    return _resinfo("auth=pass", _prop("smtp.auth", _mailbox(user) or _value(user)))


def resinfos(
    results: AuthResults,
    *,
    mail_from: str = "",
    helo: str = "",
    client_ip: str = "",
    disposition: str = "",
) -> list[ResInfoText]:
    """The resinfo list of our A-R for results (see the module docstring)."""
    out: list[ResInfoText] = []
    if results.spf is not None:
        out.append(_spf(results.spf, mail_from, helo))
    if results.helo_spf is not None and results.helo_spf is not results.spf:
        out.append(_spf(results.helo_spf, "", helo))
    if results.dkim:
        out.extend(_dkim(s) for s in results.dkim)
    elif results.spf is not None or results.dmarc is not None:
        out.append(_resinfo("dkim=none"))
    if results.dmarc is not None:
        out.append(_dmarc(results.dmarc, disposition, results.dmarc_override))
    if results.arc is not None:
        out.append(_arc(results, client_ip))
    return out


@functools.lru_cache(maxsize=64)
def _authserv(authserv_id: str) -> str:
    """Our authserv-id as written in the header (the same id on every message)."""
    v = _domain(authserv_id) or _value(authserv_id)
    if v is None:
        raise ValueError(f"authserv-id {authserv_id!r} cannot be written in a header")
    return v


def format_value(authserv_id: str, infos: Sequence[ResInfoText]) -> str:
    """The A-R value on one line: ``id; method=result ...; ...`` (``id; none`` if empty)."""
    head = _authserv(authserv_id)
    if not infos:
        return f"{head}; none"
    return "; ".join([head, *(str(i) for i in infos)])


def format_header(authserv_id: str, infos: Sequence[ResInfoText]) -> str:
    """The whole field, folded (CRLF + TAB) between resinfos and, when long, between
    their parts; ends with CRLF."""
    head = f"{HEADER_NAME}: {_authserv(authserv_id)};"
    if not infos:
        return head + " none\r\n"
    lines = [head]
    for n, info in enumerate(infos):
        end = ";" if n < len(infos) - 1 else ""
        line = "\t"
        for k, part in enumerate(info.parts):
            piece = part + (end if k == len(info.parts) - 1 else "")
            if line != "\t" and len(line) + 1 + len(piece) > FOLD_WIDTH:
                lines.append(line)
                line = "\t  " + piece
            else:
                line = line + (" " if line != "\t" else "") + piece
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def unfold(text: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", text)
