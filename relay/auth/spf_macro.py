"""SPF macro strings (RFC 7208 section 7): syntax check, tokenising and expansion.

A macro string is parsed once into a tuple of tokens (literal text or a ``Macro``) and
cached, so a record seen many times is never re-parsed. Expansion is pure: the caller
supplies every macro letter's value in a ``MacroValues`` (the ``p`` letter needs DNS,
so the evaluator resolves it first, and only when a string uses it).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote


class MacroSyntaxError(ValueError):
    """A macro string or domain-spec that RFC 7208 section 7.1 does not allow."""


@dataclass(frozen=True, slots=True)
class Macro:
    """One ``%{...}`` expansion: letter (lower case), digits (0 = all), reverse, delimiters."""

    letter: str
    digits: int
    reverse: bool
    delimiters: str
    escape: bool  # upper-case letter: URL-escape the result (section 7.3)


Token = str | Macro


@dataclass(frozen=True, slots=True)
class MacroValues:
    """The value of each macro letter for one check_host() evaluation."""

    s: str  # <sender>
    l: str  # noqa: E741  local-part of <sender>
    o: str  # domain of <sender>
    d: str  # <domain>
    i: str  # <ip>, dotted (IPv4) or dot-separated nibbles (IPv6)
    p: str  # validated domain name of <ip> (resolved lazily by the evaluator)
    v: str  # "in-addr" or "ip6"
    h: str  # HELO/EHLO domain
    c: str  # SMTP client IP, readable form (exp only)
    r: str  # receiving host domain (exp only)
    t: str  # current timestamp (exp only)


ALL_LETTERS = frozenset("slodiphcrtv")
DOMAIN_LETTERS = frozenset("slodiphv")  # c, r, t are for exp text only (section 7.2)

_EXPAND = r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}|%%|%_|%-"
_DOMAIN_TOKEN = re.compile(rf"(?:{_EXPAND})|[\x21-\x24\x26-\x7e]+")
_EXPLAIN_TOKEN = re.compile(rf"(?:{_EXPAND})|[\x20-\x24\x26-\x7e]+")
_TOPLABEL_END = re.compile(
    r"\.(?:[0-9A-Za-z]*[A-Za-z][0-9A-Za-z]*|[0-9A-Za-z]+-[0-9A-Za-z\-]*[0-9A-Za-z])\.?\Z"
)
_SIMPLE = {"%%": "%", "%_": " ", "%-": "%20"}


def _tokenise(
    text: str, pattern: re.Pattern[str], letters: frozenset[str]
) -> tuple[tuple[Token, ...], tuple[bool, ...]]:
    """Tokens of text, and for each whether it was a macro-expand (``%{..}``, ``%%``...)."""
    tokens: list[Token] = []
    kinds: list[bool] = []
    pos = 0
    while pos < len(text):
        m = pattern.match(text, pos)
        if m is None:
            raise MacroSyntaxError(f"invalid character or macro at {pos}: {text[pos : pos + 8]!r}")
        pos = m.end()
        whole = m.group(0)
        if whole in _SIMPLE:
            tokens.append(_SIMPLE[whole])
            kinds.append(True)
        elif m.group(1) is not None:
            letter = m.group(1)
            if letter.lower() not in letters:
                raise MacroSyntaxError(f"macro letter {letter!r} not allowed here")
            digits = int(m.group(2)) if m.group(2) else 0
            if m.group(2) and digits == 0:
                raise MacroSyntaxError("macro digit transformer must be non-zero")
            tokens.append(
                Macro(letter.lower(), digits, bool(m.group(3)), m.group(4), letter.isupper())
            )
            kinds.append(True)
        else:
            tokens.append(whole)
            kinds.append(False)
    return tuple(tokens), tuple(kinds)


@functools.lru_cache(maxsize=4096)
def parse_macro_string(text: str, letters: frozenset[str] = ALL_LETTERS) -> tuple[Token, ...]:
    """Tokens of a macro-string (no spaces). Raises MacroSyntaxError."""
    return _tokenise(text, _DOMAIN_TOKEN, letters)[0]


@functools.lru_cache(maxsize=4096)
def parse_domain_spec(text: str) -> tuple[Token, ...]:
    """Tokens of a domain-spec: a macro-string ending in a macro-expand or ``.toplabel[.]``.

    One leniency: a macro-expand followed by a single trailing dot (``%{d}.``) is accepted.
    """
    if not text:
        raise MacroSyntaxError("empty domain-spec")
    tokens, kinds = _tokenise(text, _DOMAIN_TOKEN, DOMAIN_LETTERS)
    last = tokens[-1]
    if kinds[-1]:
        return tokens
    if isinstance(last, str) and _TOPLABEL_END.search(last):
        return tokens
    if last == "." and len(kinds) > 1 and kinds[-2]:
        return tokens
    raise MacroSyntaxError(f"domain-spec {text!r} does not end in a macro or a top label")


@functools.lru_cache(maxsize=1024)
def parse_explain_string(text: str) -> tuple[Token, ...]:
    """Tokens of an explanation text (spaces and the c, r, t letters allowed)."""
    return _tokenise(text, _EXPLAIN_TOKEN, ALL_LETTERS)[0]


def uses_letter(tokens: tuple[Token, ...], letter: str) -> bool:
    return any(isinstance(t, Macro) and t.letter == letter for t in tokens)


@functools.lru_cache(maxsize=64)
def _splitter(delimiters: str) -> re.Pattern[str]:
    return re.compile("[" + re.escape(delimiters) + "]")


def _transform(value: str, macro: Macro) -> str:
    if not macro.delimiters and not macro.reverse and not macro.digits:
        return value
    parts = _splitter(macro.delimiters or ".").split(value)
    if macro.reverse:
        parts.reverse()
    if macro.digits and macro.digits < len(parts):
        parts = parts[-macro.digits :]
    return ".".join(parts)


def expand(tokens: tuple[Token, ...], values: MacroValues) -> str:
    """Expand parsed tokens with the given letter values (section 7.3)."""
    out: list[str] = []
    for tok in tokens:
        if isinstance(tok, str):
            out.append(tok)
            continue
        value = _transform(str(getattr(values, tok.letter)), tok)
        out.append(quote(value, safe="", errors="surrogateescape") if tok.escape else value)
    return "".join(out)


def truncate_domain(name: str) -> str:
    """Drop left-hand labels until the name fits 253 characters (section 7.3)."""
    name = name[:-1] if name.endswith(".") else name
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


def ip_values(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[str, str, str]:
    """(i, v, c) macro values for a client address (section 7.3)."""
    if ip.version == 4:
        return str(ip), "in-addr", str(ip)
    return ".".join(ip.exploded.replace(":", "")), "ip6", str(ip)
