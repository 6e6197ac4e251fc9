"""The DMARC policy record (RFC 9989 section 4.7): ``v=DMARC1`` and its tags, parsed once.

RFC 9989 changes from RFC 7489, each applied here:
- ``pct``, ``rf`` and ``ri`` are no longer DMARC tags: they are ignored, and listed in
  ``DmarcRecord.removed`` so ``relay diagnose`` and ``relay check`` can say so;
- ``np`` (policy for non-existent subdomains, default ``sp``), ``t`` (testing, ``y`` |
  ``n``, default ``n``) and ``psd`` (``y`` | ``n`` | ``u``, default ``u``) are new;
- ``p`` is RECOMMENDED, not required (dmarcbis section 4.10.1): a record without a valid
  ``p``, or with an invalid ``sp``/``np``, is read as ``p=none`` (``p_implied``) when its
  ``rua`` holds at least one valid URI, so a reporting-only record (``v=DMARC1; rua=...``)
  is a valid record; without one, no DMARC processing applies (``applies`` False);
- unknown tags, and known tags with a value outside their grammar, are ignored (kept in
  ``ignored``) and the tag's default applies.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

POLICIES = ("none", "quarantine", "reject")
REMOVED_TAGS = ("pct", "rf", "ri")  # RFC 7489 tags that RFC 9989 removed
KNOWN_TAGS = ("v", "p", "sp", "np", "adkim", "aspf", "t", "psd", "rua", "ruf", "fo")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*:[^!\s]+)(?:!([0-9]+)([kmgtKMGT]?))?$")
_VERSION = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")


class DmarcRecordError(ValueError):
    """The text is not a DMARC record (no DMARC processing follows)."""


@dataclass(frozen=True, slots=True)
class ReportUri:
    uri: str
    max_size: int = 0  # bytes; 0 means no limit


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed ``v=DMARC1`` record, defaults filled in."""

    p: str
    sp: str
    np: str = ""  # "" = not given: sp applies
    adkim: str = "r"
    aspf: str = "r"
    t: bool = False  # t=y: the policy is being tested (RFC 9989 section 4.7)
    psd: str = "u"  # y | n | u
    rua: tuple[ReportUri, ...] = ()
    ruf: tuple[ReportUri, ...] = ()
    fo: tuple[str, ...] = ("0",)
    p_implied: bool = False  # no valid p= (or an invalid sp=/np=): read as p=none
    # False: no valid p= (or an invalid sp=/np=) and no valid rua= URI, so receivers
    # apply no DMARC processing at all (dmarcbis section 4.10.1)
    applies: bool = True
    removed: tuple[str, ...] = ()  # pct=/rf=/ri= terms present, ignored (RFC 9989)
    ignored: tuple[str, ...] = ()  # terms discarded as unknown or syntax errors
    raw: str = ""

    @property
    def np_effective(self) -> str:
        return self.np or self.sp


def is_dmarc_record(text: str) -> bool:
    """True when text starts with the version tag ``v=DMARC1``."""
    return _VERSION.match(text) is not None


def _uris(value: str) -> tuple[ReportUri, ...]:
    out = []
    for item in value.split(","):
        item = re.sub(r"\s+", "", item)
        m = _URI.match(item)
        if m is None:
            continue
        size = int(m.group(2)) * _SIZE_UNITS[m.group(3).lower()] if m.group(2) else 0
        out.append(ReportUri(m.group(1), size))
    return tuple(out)


def parse_record(text: str) -> DmarcRecord:
    """Parse one DMARC TXT record. Raises DmarcRecordError only when it is not a DMARC
    record (no ``v=DMARC1`` first); every other fault is ignored in favour of defaults.
    Remembered by record text (a domain's record is seen on every message from it)."""
    parsed = _parse_cached(text)
    if isinstance(parsed, str):
        raise DmarcRecordError(parsed)
    return parsed


@functools.lru_cache(maxsize=1024)
def _parse_cached(text: str) -> DmarcRecord | str:
    """The record, or why it is not one (the DmarcRecordError text)."""
    try:
        return _parse_record(text)
    except DmarcRecordError as exc:
        return str(exc)


def _parse_record(text: str) -> DmarcRecord:
    if not is_dmarc_record(text):
        raise DmarcRecordError("record does not start with v=DMARC1")
    tags: dict[str, str] = {}
    ignored: list[str] = []
    removed: list[str] = []
    for term in text.split(";")[1:]:
        term = term.strip()
        if not term:
            continue
        name, eq, value = term.partition("=")
        name = name.strip().lower()
        if not eq or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in tags:
            ignored.append(term)
            continue
        if name in REMOVED_TAGS:  # RFC 9989: no longer DMARC tags
            removed.append(f"{name}={value.strip()}")
            continue
        if name not in KNOWN_TAGS:  # RFC 9989: unknown tags are ignored
            ignored.append(term)
            continue
        tags[name] = value.strip()

    def pick(tag: str, allowed: tuple[str, ...], default: str) -> str:
        if tag not in tags:
            return default
        v = tags[tag].lower()
        if v not in allowed:
            ignored.append(f"{tag}={tags[tag]}")
            return default
        return v

    p = pick("p", POLICIES, "")
    bad_sub = any(t in tags and tags[t].lower() not in POLICIES for t in ("sp", "np"))
    sp = pick("sp", POLICIES, p)
    np = pick("np", POLICIES, "")
    rua = _uris(tags.get("rua", ""))
    implied = p == "" or bad_sub
    applies = True
    if implied:
        # dmarcbis section 4.10.1: no valid p=, or an invalid sp=/np=: with a valid rua=
        # URI act as if the record held p=none; without one, apply no DMARC processing
        p, sp, np = "none", "none", ""
        applies = bool(rua)
    fo = tuple(x.strip().lower() for x in tags.get("fo", "0").split(":"))
    if not fo or any(x not in ("0", "1", "d", "s") for x in fo):
        ignored.append(f"fo={tags.get('fo', '')}")
        fo = ("0",)
    return DmarcRecord(
        p=p,
        sp=sp,
        np=np,
        adkim=pick("adkim", ("r", "s"), "r"),
        aspf=pick("aspf", ("r", "s"), "r"),
        t=pick("t", ("y", "n"), "n") == "y",
        psd=pick("psd", ("y", "n", "u"), "u"),
        rua=rua,
        ruf=_uris(tags.get("ruf", "")),
        fo=fo,
        p_implied=implied,
        applies=applies,
        removed=tuple(removed),
        ignored=tuple(ignored),
        raw=text,
    )
