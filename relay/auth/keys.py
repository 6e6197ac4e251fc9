"""DKIM key records (RFC 6376 section 3.6.1, RFC 8463): find, fetch and parse them.

Owns three things: the list of ``selector._domainkey.domain`` names a message's
DKIM-Signature and ARC headers need, their concurrent prefetch through our async
resolver into a picklable ``KeyRecords`` (so the CPU-bound verification can run in a
worker process with no DNS of its own), and the parsing of one TXT key record into a
``cryptography`` public key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from relay.dns import Resolver
from relay.errors import DnsError, DnsNoData, DnsNotFound
from relay.message import Message, as_parsed

# Header fields that carry s= and d= tags naming a key.
KEYED_HEADERS = (b"dkim-signature", b"arc-message-signature", b"arc-seal")
# Bound on the distinct key names fetched for one message (DoS guard).
MAX_KEY_NAMES = 32

_WSP = re.compile(rb"\s+")
_TAG_RE = re.compile(rb"(?:^|;)\s*([a-zA-Z][a-zA-Z0-9_]*)\s*=\s*([^;]*)")


class LookupOutcome(enum.StrEnum):
    FOUND = "found"
    NOT_FOUND = "notfound"  # NXDOMAIN or no TXT records
    TEMPFAIL = "tempfail"  # SERVFAIL, timeout, refused


@dataclass(frozen=True, slots=True)
class KeyLookup:
    name: str
    outcome: LookupOutcome
    records: tuple[str, ...] = ()
    detail: str = ""


class KeyLookupError(Exception):
    """A key could not be had: ``temporary`` says whether trying later may help."""

    def __init__(self, name: str, temporary: bool, detail: str = "") -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.temporary = temporary
        self.detail = detail


@dataclass(frozen=True, slots=True)
class KeyRecords:
    """Prefetched key TXT records; picklable, so it travels to worker processes."""

    lookups: tuple[KeyLookup, ...] = ()

    def get(self, name: str) -> KeyLookup | None:
        wanted = normalise_name(name)
        for lookup in self.lookups:
            if lookup.name == wanted:
                return lookup
        return None

    def txt(self, name: str) -> tuple[str, ...]:
        """The TXT records of name; raises KeyLookupError when there are none or DNS failed.
        A name that was not prefetched counts as a temporary failure (never a DNS query)."""
        lookup = self.get(name)
        if lookup is None:
            raise KeyLookupError(normalise_name(name), True, "key was not prefetched")
        if lookup.outcome is LookupOutcome.TEMPFAIL:
            raise KeyLookupError(lookup.name, True, lookup.detail or "DNS temporary failure")
        if lookup.outcome is LookupOutcome.NOT_FOUND or not lookup.records:
            raise KeyLookupError(lookup.name, False, lookup.detail or "key not found")
        return lookup.records


def normalise_name(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.strip().rstrip(".").lower()


def header_values(message: Message, wanted: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """(lower-case name, unfolded value) of the header fields in ``wanted`` (lower case),
    read from the parsed message's fields."""
    want = frozenset(wanted)
    out: list[tuple[bytes, bytes]] = []
    for f in as_parsed(message).fields:
        if f.name:
            name = f.name.lower().encode("ascii")
            if name in want:
                out.append((name, f.unfolded()))
    return out


def split_lines(data: bytes) -> list[bytes]:
    """``re.split(rb"\\r?\\n", data)``: every LF ends a line, with the CR right before it
    (CRLF pairs never overlap, so replacing them first gives the same pieces, faster)."""
    return data.replace(b"\r\n", b"\n").split(b"\n")


def signature_tags(value: bytes) -> dict[bytes, bytes]:
    """Loose tag=value parse of a signature header value (first occurrence wins); the
    same value is parsed once (key prefetch, then the DKIM or ARC check)."""
    return dict(_signature_tags(value))


@functools.lru_cache(maxsize=256)
def _signature_tags(value: bytes) -> tuple[tuple[bytes, bytes], ...]:
    tags: dict[bytes, bytes] = {}
    for m in _TAG_RE.finditer(value):
        tags.setdefault(m.group(1).lower(), _WSP.sub(b"", m.group(2)))
    return tuple(tags.items())


def key_name(selector: bytes, domain: bytes) -> str:
    return normalise_name(selector + b"._domainkey." + domain)


def key_names(
    message: Message, headers: Iterable[bytes] = KEYED_HEADERS, limit: int | None = None
) -> tuple[str, ...]:
    """Distinct key names (in order of appearance) the message's signatures refer to,
    from the first ``limit`` matching header fields."""
    names: list[str] = []
    for _, value in header_values(message, headers)[:limit]:
        tags = signature_tags(value)
        s, d = tags.get(b"s"), tags.get(b"d")
        if not s or not d:
            continue
        try:
            name = key_name(s, d)
            name.encode("ascii")
        except UnicodeError:
            continue
        if name not in names:
            names.append(name)
    return tuple(names)


async def _fetch_one(resolver: Resolver, name: str) -> KeyLookup:
    try:
        records = await resolver.txt(name)
    except (DnsNotFound, DnsNoData) as exc:
        return KeyLookup(name, LookupOutcome.NOT_FOUND, detail=f"key not found ({exc})")
    except DnsError as exc:
        return KeyLookup(name, LookupOutcome.TEMPFAIL, detail=f"DNS temporary failure ({exc})")
    return KeyLookup(name, LookupOutcome.FOUND, tuple(records))


async def fetch_keys(resolver: Resolver, names: Iterable[str]) -> KeyRecords:
    """Fetch every key name concurrently (at most MAX_KEY_NAMES of them)."""
    unique = list(dict.fromkeys(normalise_name(n) for n in names))[:MAX_KEY_NAMES]
    if len(unique) == 1:  # the usual case: no task and gathering future for one name
        return KeyRecords((await _fetch_one(resolver, unique[0]),))
    lookups = await asyncio.gather(*(_fetch_one(resolver, n) for n in unique))
    return KeyRecords(tuple(lookups))


# ---- key record parsing (RFC 6376 section 3.6.1) ----


class KeyRecordError(Exception):
    """A key record that cannot be used (bad syntax, unknown k=, revoked, wrong service)."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    key_type: str  # "rsa" | "ed25519"
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    bits: int
    strict: bool = False  # t=s: i= domain must equal d=
    testing: bool = False  # t=y


def parse_tag_list(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise KeyRecordError(f"malformed tag {part!r}")
        k, v = part.split("=", 1)
        k = k.strip()
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", k):
            raise KeyRecordError(f"malformed tag name {k!r}")
        if k in tags:
            raise KeyRecordError(f"duplicate tag {k}=")
        tags[k] = re.sub(r"\s+", "", v) if k == "p" else v.strip()
    return tags


@functools.lru_cache(maxsize=256)
def parse_key_record(record: str) -> PublicKey:
    """Parse one DKIM key TXT record into a public key, or raise KeyRecordError. Results
    are remembered by record text (keys are immutable; a sender's key is seen on every
    message of that sender), failures are not."""
    tags = parse_tag_list(record)
    if "v" in tags and tags["v"] != "DKIM1":
        raise KeyRecordError("bad version (v= is not DKIM1)")
    if "p" not in tags:
        raise KeyRecordError("no p= tag")
    if tags["p"] == "":
        raise KeyRecordError("key revoked (empty p=)")
    services = {s.strip() for s in tags.get("s", "*").split(":")}
    if not services & {"*", "email"}:
        raise KeyRecordError(f"key not for email (s={tags['s']})")
    flags = {f.strip() for f in tags.get("t", "").split(":")}
    try:
        raw = base64.b64decode(tags["p"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyRecordError(f"p= is not base64 ({exc})") from None
    k = tags.get("k", "rsa")  # case-sensitive (RFC 6376 3.2): "RSA" is no known type
    if k == "ed25519":
        if len(raw) != 32:
            raise KeyRecordError("ed25519 key is not 32 bytes")
        key_ed = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        return PublicKey("ed25519", key_ed, 256, "s" in flags, "y" in flags)
    if k != "rsa":
        raise KeyRecordError(f"unknown key type k={k}")
    try:
        loaded = load_der_public_key(raw)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyRecordError(f"could not parse RSA key ({exc})") from None
    if not isinstance(loaded, rsa.RSAPublicKey):
        raise KeyRecordError("k=rsa but p= is not an RSA key")
    return PublicKey("rsa", loaded, loaded.key_size, "s" in flags, "y" in flags)
