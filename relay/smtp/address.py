"""Envelope address syntax: parse and validate MAIL/RCPT paths (RFC 5321 section 4.1.2).

Pure functions, no I/O. ``parse_path`` reads the argument after ``FROM:``/``TO:`` and
returns the mailbox (with any source route and quoting kept visible, so relay rules can
refuse routing tricks) and the ESMTP parameters. Non-ASCII is accepted as RFC 6531
(SMTPUTF8) allows; whether the transaction asked for SMTPUTF8 is the caller's check.

Canonical form (``Mailbox.address``): the local part as written, without quotes when it
is a valid dot-string, else re-quoted; the domain lower-cased; address literals as
``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from relay.model import SmtpReply

MAX_ADDRESS = 320  # 64 (local part) + 1 + 255 (domain); RFC 5321 section 4.5.3.1
MAX_DOMAIN = 255
MAX_LABEL = 63

_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
_ASCII_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AddressError(ValueError):
    """A path or parameter that cannot be accepted; carries the SMTP reply to give."""

    def __init__(self, reply: SmtpReply) -> None:
        self.reply = reply
        super().__init__(str(reply))


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One parsed mailbox. ``local`` is dequoted; ``domain`` is lower-case."""

    local: str
    domain: str
    quoted: bool = False
    route: tuple[str, ...] = ()  # source-route hops (@a,@b:), refused or ignored by policy

    @property
    def literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def utf8(self) -> bool:
        return not (self.local.isascii() and self.domain.isascii())

    @property
    def address(self) -> str:
        """Canonical local@domain (route dropped)."""
        return f"{quote_local(self.local)}@{self.domain}"

    @property
    def path(self) -> str:
        """The path as written, route included (what relay rules look at)."""
        local = f'"{_escape(self.local)}"' if self.quoted else self.local
        prefix = ",".join("@" + hop for hop in self.route) + ":" if self.route else ""
        return f"{prefix}{local}@{self.domain}"


def quote_local(local: str) -> str:
    """A local part as it must be written: bare when a dot-string, else a quoted string."""
    if _DOT_STRING.match(local):
        return local
    return f'"{_escape(local)}"'


def _escape(local: str) -> str:
    return local.replace("\\", "\\\\").replace('"', '\\"')


def _bad(code: int, enhanced: str, text: str) -> AddressError:
    return AddressError(SmtpReply(code, f"{enhanced} {text}"))


def parse_domain(text: str, enhanced: str = "5.1.3") -> str:
    """Validate a domain or address literal; return its canonical (lower-case) form."""
    if text.startswith("["):
        return _parse_literal(text, enhanced)
    if not text or len(text) > MAX_DOMAIN:
        raise _bad(501, enhanced, "Error: bad domain in address")
    labels = text.split(".")
    for label in labels:
        if not label or len(label) > MAX_LABEL:
            raise _bad(501, enhanced, "Error: bad domain in address")
        if label.isascii():
            if not _ASCII_LABEL.match(label):
                raise _bad(501, enhanced, "Error: bad domain in address")
        else:
            try:
                label.encode("idna")
            except UnicodeError:
                raise _bad(501, enhanced, "Error: bad internationalised domain") from None
    return text.lower()


def _parse_literal(text: str, enhanced: str) -> str:
    if not text.endswith("]"):
        raise _bad(501, enhanced, "Error: bad address literal")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise _bad(501, enhanced, "Error: bad address literal") from None


def parse_mailbox(text: str, enhanced: str = "5.1.3") -> Mailbox:
    """Parse ``[@route,...:]local@domain`` (no angle brackets)."""
    if len(text) > MAX_ADDRESS + 64 or _CONTROL.search(text):
        raise _bad(501, enhanced, "Error: bad address syntax")
    route: tuple[str, ...] = ()
    if text.startswith("@"):
        hops, colon, text = text.partition(":")
        if not colon:
            raise _bad(501, enhanced, "Error: bad source route")
        route = tuple(parse_domain(h[1:], enhanced) for h in hops.split(",") if h.startswith("@"))
        if len(route) != len(hops.split(",")):
            raise _bad(501, enhanced, "Error: bad source route")
    if text.startswith('"'):
        local, rest = _read_quoted(text, enhanced)
        quoted = True
        if not rest.startswith("@"):
            raise _bad(501, enhanced, "Error: bad address syntax")
        domain_text = rest[1:]
    else:
        local, at, domain_text = text.rpartition("@")
        quoted = False
        if not at or not _DOT_STRING.match(local):
            raise _bad(501, enhanced, "Error: bad address syntax")
    if len(local.encode()) > 2 * MAX_ADDRESS:
        raise _bad(501, enhanced, "Error: bad address syntax")
    domain = parse_domain(domain_text, enhanced)
    mbox = Mailbox(local=local, domain=domain, quoted=quoted, route=route)
    if len(mbox.address.encode()) > MAX_ADDRESS:
        raise _bad(501, enhanced, "Error: address too long")
    return mbox


def _read_quoted(text: str, enhanced: str) -> tuple[str, str]:
    """Read a quoted string at the start of text; return (dequoted, rest)."""
    out: list[str] = []
    i = 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text):
                break
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), text[i + 1 :]
        out.append(c)
        i += 1
    raise _bad(501, enhanced, "Error: unterminated quoted string")


def parse_path(text: str, *, null_ok: bool, enhanced: str) -> tuple[Mailbox | None, str]:
    """Parse a reverse- or forward-path and return (mailbox or None for ``<>``, params text).

    Angle brackets are expected; a bare address (no brackets, no spaces) is tolerated
    like most MTAs do. ``enhanced`` is 5.1.7 for senders and 5.1.3 for recipients.
    """
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = _closing_bracket(text)
        if end < 0:
            raise _bad(501, enhanced, "Error: missing closing '>'")
        inner, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise _bad(501, enhanced, "Error: text after '>'")
    else:
        inner, _, rest = text.partition(" ")
    if inner == "":
        if null_ok:
            return None, rest.strip(" ")
        raise _bad(501, enhanced, "Error: empty address")
    return parse_mailbox(inner, enhanced), rest.strip(" ")


def _closing_bracket(text: str) -> int:
    in_quote = False
    i = 1
    while i < len(text):
        c = text[i]
        if in_quote and c == "\\":
            i += 2
            continue
        if c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            return i
        i += 1
    return -1


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters ``KEY[=VALUE] ...`` -> {KEY (upper-case): value or None}."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not value) or "=" in value:
            raise _bad(501, "5.5.4", "Error: bad parameter syntax")
        ukey = key.upper()
        if ukey in params:
            raise _bad(501, "5.5.4", f"Error: duplicate parameter {ukey}")
        params[ukey] = value if eq else None
    return params
