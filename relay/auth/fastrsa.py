"""DKIM and ARC signing and verifying over dkimpy, with OpenSSL crypto (RFC 6376, RFC 8463,
RFC 8617), against one pinned dkimpy.

The choice (docs/design.md, "dkimpy"): the relay keeps these re-implementations, each
proven byte for byte against dkimpy by hypothesis tests and the DKIM/ARC vectors, and
pins dkimpy exactly (pyproject.toml ``dkimpy==DKIMPY_VERSION``); importing this module
with another dkimpy raises ImportError naming both versions, because the subclasses
below override dkimpy internals whose behaviour is only proven for that version.

What this module replaces in dkimpy (``FastDKIM`` / ``FastARC`` subclass ``dkim.DKIM``
/ ``dkim.ARC``; plain ``dkim.*`` users are unaffected, no dkimpy global is touched):

- parsing: ``rfc822_parse`` (``dkim_view``: dkimpy's header list built from the one
  ``relay.message.ParsedMessage``), ``parse_tag_value`` (``tag_value``),
  ``validate_signature_fields``, ``DKIM.verify_headerprep`` (with an injectable clock,
  ``check_times``), ``ARC.sorted_arc_headers`` and ``ARC.verify_instance`` (the one i=
  reader of ``relay.auth.arcfields``, i= anywhere in the tag list, ed25519-sha256 in
  ARC, l= coverage);
- hashing: ``select_headers``, ``hash_headers``, the b= removal (``strip_b_value``),
  relaxed header canonicalisation (``relaxed_header``), ``fold``, and a fast path of
  relaxed body canonicalisation (``canonical_body``, with a memo bounded by bytes);
- public-key work: ``DomainSigner.gen_header`` (signing with ``cryptography``;
  dkimpy signs RSA in pure Python, about 7 ms a signature, and needs PyNaCl for
  Ed25519), ``verify_sig`` / ``verify_sig_process`` (keys from records prefetched by
  our async resolver through ``dnsfunc(name) -> tuple[str, ...]`` raising
  ``keys.KeyLookupError``, parsed by ``keys.parse_key_record``), private key loading
  (``load_signing_key``).

What it still takes from dkimpy: the ``DomainSigner`` object and its message state
(``set_message``, ``default_sign_headers``, ``should_not_sign``), ``DKIM.verify`` and
``ARC.verify`` (the loops over signatures and over the chain's sets), the
canonicalisation policies (``CanonicalizationPolicy``, simple header canonicalisation,
body canonicalisation other than the fast path), the hash constructors
(``dkim.crypto.HASH_ALGORITHMS``), the exception types, the cv constants, and
``dkim.rfc822_parse`` / ``dkim.fold`` for the unusual inputs they are handed.

RSASSA-PKCS1-v1_5 is deterministic, so a signature made here is byte-identical to the
one dkimpy's ``dkim.crypto.RSASSA_PKCS1_v1_5_sign`` makes for the same input
(``PurePythonRsaKey`` wraps that function for tests and the benchmark).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dkim
import dkim.crypto
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
    correct_empty_body,
    strip_trailing_lines,
)
from dkim.util import DuplicateTag, InvalidTagSpec, InvalidTagValueList

from relay.auth.arcfields import AMS, arc_instance, sorted_arc_headers
from relay.auth.keys import (
    KeyLookupError,
    KeyRecordError,
    PublicKey,
    parse_key_record,
    split_lines,
)
from relay.message import Message, ParsedMessage

# The one dkimpy release the overrides here are proven against (pyproject.toml pins it).
DKIMPY_VERSION = "1.1.8"


def _check_dkimpy(installed: str) -> None:
    if installed != DKIMPY_VERSION:
        raise ImportError(
            f"relay.auth.fastrsa is proven against dkimpy {DKIMPY_VERSION}, but dkimpy "
            f"{installed} is installed: install dkimpy=={DKIMPY_VERSION}"
        )


_check_dkimpy(importlib.metadata.version("dkimpy"))

DnsFunc = Callable[[str], Sequence[str]]

# Time slop dkimpy allows for t= in the future and x= in the past (10 hours).
CLOCK_SLOP = 36000
# At most this many key records of one name are tried (RFC 6376 leaves several undefined).
MAX_KEY_RECORDS = 3

_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}  # noqa: S303


class KeyTooSmallError(ValueError):
    """An RSA signing key below the minimum size."""


class SigningKey(Protocol):
    """A private key as the signers use it: sign a SHA-256 digest."""

    @property
    def algorithm(self) -> bytes: ...  # b"rsa-sha256" | b"ed25519-sha256"

    @property
    def bits(self) -> int: ...

    def sign(self, digest: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class OpenSslKey:
    """An RSA or Ed25519 private key signed with OpenSSL through ``cryptography``."""

    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    @property
    def algorithm(self) -> bytes:
        return (
            b"ed25519-sha256" if isinstance(self.key, ed25519.Ed25519PrivateKey) else b"rsa-sha256"
        )

    @property
    def bits(self) -> int:
        return 256 if isinstance(self.key, ed25519.Ed25519PrivateKey) else self.key.key_size

    def sign(self, digest: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 digest
        return self.key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


class _Digest:
    """The two attributes dkimpy's EMSA-PKCS1-v1_5 encoder reads from a hash object."""

    name = "sha256"

    def __init__(self, value: bytes) -> None:
        self._value = value

    def digest(self) -> bytes:
        return self._value


@dataclass(frozen=True, slots=True)
class PurePythonRsaKey:
    """dkimpy's own pure-Python RSA signer, for byte-identity tests and the benchmark."""

    parsed: dict[str, int]

    @classmethod
    def from_pem(cls, pem: bytes) -> PurePythonRsaKey:
        return cls(dkim.crypto.parse_pem_private_key(pem))

    @property
    def algorithm(self) -> bytes:
        return b"rsa-sha256"

    @property
    def bits(self) -> int:
        return int(self.parsed["modulus"]).bit_length()

    def sign(self, digest: bytes) -> bytes:
        return bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(_Digest(digest), self.parsed))


def load_signing_key(data: bytes, *, min_rsa_bits: int = 2048) -> OpenSslKey:
    """Load a PEM private key (RSA PKCS#1/PKCS#8 or Ed25519 PKCS#8), or a base64 Ed25519
    seed (dkimpy's format). RSA keys below ``min_rsa_bits`` raise KeyTooSmallError."""
    if b"-----BEGIN" in data:
        key = load_pem_private_key(data, password=None)
    else:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not a PEM key nor a base64 Ed25519 seed: {exc}") from None
        if len(seed) != 32:
            raise ValueError("a base64 Ed25519 seed must be 32 bytes")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < min_rsa_bits:
            raise KeyTooSmallError(
                f"RSA key has {key.key_size} bits; at least {min_rsa_bits} are required"
            )
        return OpenSslKey(key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return OpenSslKey(key)
    raise ValueError(f"unsupported key type {type(key).__name__}; use RSA or Ed25519")


# ---- body canonicalisation, once per message ----

# (body algorithm, body) -> canonical body, oldest first: with crypto threads two messages
# may be between their DKIM check and their seal at once. Bounded by the bytes it holds
# (each body and its canonical form), not by entries: eight 25 MB bodies would be 400 MB.
_BODY_MEMO: dict[tuple[object, bytes], bytes] = {}
_BODY_MEMO_BYTES = 8 * 1024 * 1024
_body_memo_held = 0
_body_memo_lock = threading.Lock()


def body_memo_bytes() -> int:
    """Bytes the canonical-body memo holds now (bodies and canonical bodies)."""
    return _body_memo_held


def _remember_body(key: tuple[object, bytes], out: bytes) -> None:
    global _body_memo_held
    cost = len(key[1]) + len(out)
    if cost > _BODY_MEMO_BYTES:
        return  # larger than the whole memo: canonicalised again when asked again
    with _body_memo_lock:
        if key in _BODY_MEMO:
            return
        while _BODY_MEMO and _body_memo_held + cost > _BODY_MEMO_BYTES:
            old_key = next(iter(_BODY_MEMO))  # the oldest entry
            _body_memo_held -= len(old_key[1]) + len(_BODY_MEMO.pop(old_key))
        _BODY_MEMO[key] = out
        _body_memo_held += cost


def canonical_body(canon_policy: Any, body: bytes) -> bytes:
    """``canon_policy.canonicalize_body(body)``, remembering recent results: the relay
    canonicalises the same body for the DKIM check and again for the AMS it seals (relaxed
    body canonicalisation of 4 KB costs about 0.2 ms). At most ``_BODY_MEMO_BYTES`` are
    kept, the oldest entries dropped first. A body with no tab, no two spaces in a row
    and no space before CRLF skips dkimpy's whitespace regexes, which would leave it
    unchanged."""
    algorithm = canon_policy.body_algorithm
    key = (algorithm, body)
    known = _BODY_MEMO.get(key)
    if known is not None:
        return known
    if algorithm is Relaxed and b"\t" not in body and b"  " not in body and b" \r\n" not in body:
        # no run of whitespace to compress and none before a line end: relaxed body
        # canonicalisation reduces to simple's (dkimpy's regexes would change nothing)
        out = bytes(correct_empty_body(strip_trailing_lines(body)))
    else:
        out = bytes(algorithm.canonicalize_body(body))
    _remember_body(key, out)
    return out


# ---- header canonicalisation, once per header field ----

_HEADER_MEMO: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}
_HEADER_MEMO_MAX = 4096  # fields remembered; cleared when full (a message has a few dozen)
_WSP_RUN = re.compile(rb"[\t ]+")


def relaxed_header(field: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """dkimpy's relaxed canonicalisation of one header field (``Relaxed.canonicalize_headers``
    on ``[field]``), with the same bytes: name lower-cased and right-stripped; value
    unfolded (every LF removed, and a CR right before it), runs of WSP made one space,
    stripped, CRLF appended. Remembered per field: within one message the DKIM check, the
    ARC validation and the seal canonicalise the same fields again."""
    out = _HEADER_MEMO.get(field)
    if out is not None:
        return out
    name, value = field
    if b"\n" in value:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    out = (name.lower().rstrip(), value.strip() + b"\r\n")
    if len(_HEADER_MEMO) >= _HEADER_MEMO_MAX:
        _HEADER_MEMO.clear()
    _HEADER_MEMO[field] = out
    return out


def canonicalize_headers(canon_policy: Any, headers: list[Any]) -> list[Any]:
    """``canon_policy.canonicalize_headers(headers)``, relaxed through ``relaxed_header``."""
    if canon_policy.header_algorithm is Relaxed:
        return [relaxed_header((f[0], f[1])) for f in headers]
    return canon_policy.canonicalize_headers(headers)  # type: ignore[no-any-return]


# dkimpy's RE_BTAG, ``([;\s]b FWS =)(?:FWS [a-zA-Z0-9+/=])*(?:\r?\n\Z)?`` with FWS =
# ``(?:(?:\s*\r?\n)?\s+)?``, which matches any run of whitespace (empty too): the same
# matches, as a character run backed off to its last base64 character, instead of one
# group iteration a character (about 20 times faster on a 2048-bit b= value).
_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


def strip_b_value(value: bytes) -> bytes:
    """``dkim.RE_BTAG.sub(b"\\1", value)``: the b= tag's value removed, byte for byte."""
    pieces: list[bytes] = []
    pos = 0
    for m in _BTAG.finditer(value):  # no template substitution, which costs more per call
        pieces.append(value[pos : m.end(1)])
        pos = m.end()
    if not pieces:
        return value
    pieces.append(value[pos:])
    return b"".join(pieces)


def select_headers(headers: Sequence[Any], include_headers: Sequence[bytes]) -> list[Any]:
    """``dkim.select_headers``: for each name in include_headers (lower case), the last
    field of that name not selected yet, scanning up from the bottom. Each field's name is
    lower-cased once here, where dkimpy lower-cases it again for every included name."""
    below: dict[bytes, list[int]] = {}  # lower-case name -> its fields' indices, top first
    for i, field in enumerate(headers):
        below.setdefault(field[0].lower(), []).append(i)
    sign_headers = []
    for h in include_headers:
        assert h == h.lower()  # as dkimpy
        found = below.get(h)
        if found:
            sign_headers.append(headers[found.pop()])
    return sign_headers


def select_canonical(
    canon_policy: Any, headers: Sequence[Any], include_headers: Sequence[bytes]
) -> list[Any]:
    """``select_headers(canonicalize_headers(canon_policy, headers), include_headers)``,
    the same list, with only the selected fields canonicalised under relaxed: selection
    looks at names only, and a relaxed name is the name lower-cased and right-stripped
    (a message's unsigned fields, most of a list copy's, are never canonicalised)."""
    if canon_policy.header_algorithm is not Relaxed:
        return select_headers(canonicalize_headers(canon_policy, list(headers)), include_headers)
    below: dict[bytes, list[int]] = {}  # relaxed name -> its fields' indices, top first
    for i, field in enumerate(headers):
        below.setdefault(field[0].lower().rstrip(), []).append(i)
    selected = []
    for h in include_headers:
        assert h == h.lower()  # as dkimpy
        found = below.get(h)
        if found:
            field = headers[found.pop()]
            selected.append(relaxed_header((field[0], field[1])))
    return selected


def hash_headers(
    hasher: Any,
    canon_policy: Any,
    headers: list[Any],
    include_headers: Sequence[bytes],
    sigheader: tuple[bytes, bytes],
    *,
    b_stripped: bool = False,
    canonical: bool = True,
) -> list[Any]:
    """``dkim.hash_headers`` (same bytes hashed), the signature field canonicalised through
    ``canonicalize_headers``. ``b_stripped``: the signature field's b= value has been
    removed already (``strip_b_value`` is idempotent, so removing it again changes
    nothing). ``canonical``: ``headers`` are canonicalised already; else they are raw and
    only the selected ones are canonicalised (``select_canonical``)."""
    if canonical:
        sign_headers = select_headers(headers, include_headers)
    else:
        sign_headers = select_canonical(canon_policy, headers, include_headers)
    value = sigheader[1] if b_stripped else strip_b_value(sigheader[1])
    cheaders = canonicalize_headers(canon_policy, [(sigheader[0], value)])
    for x, y in sign_headers:
        hasher.update(x)
        hasher.update(b":")
        hasher.update(y)
    for x, y in cheaders:
        hasher.update(x)
        hasher.update(b":")
        hasher.update(y.rstrip())
    return sign_headers


_UNSIGNED_MEMO: dict[tuple[bytes, int, bool], bytes] = {}
_UNSIGNED_MEMO_MAX = 256


def _unsigned_value(value: bytes, namelen: int, standardize: bool) -> bytes:
    """A new signature's value as hashed: folded (unless ``standardize``), b= emptied.
    Remembered: the copies of a list post signed in the same second share every tag
    but b= (t=, h= and bh= too), so this is worked out once for them."""
    key = (value, namelen, standardize)
    out = _UNSIGNED_MEMO.get(key)
    if out is None:
        folded = value if standardize else fold(value, namelen=namelen, linesep=b"\r\n")
        out = strip_b_value(folded)
        if len(_UNSIGNED_MEMO) >= _UNSIGNED_MEMO_MAX:
            _UNSIGNED_MEMO.clear()
        _UNSIGNED_MEMO[key] = out
    return out


def fold(header: bytes, namelen: int = 0, linesep: bytes = b"\r\n") -> bytes:
    """``dkim.fold``, the same bytes: a signature value folded at column 72 (the field
    name's length counted on the first line), breaking after the last space that fits,
    or hard at the limit. Pieces are collected and joined once instead of the remainder
    being copied on every line."""
    maxleng = 72 - namelen
    if maxleng <= 0:
        return dkim.fold(header, namelen=namelen, linesep=linesep)  # type: ignore[no-any-return]
    if len(header) <= maxleng:
        return header
    if len(header) - header.rfind(b"\r\n") == 2 and len(header) <= maxleng + 2:
        return header
    pieces: list[bytes] = []
    pos = 0
    folded = header.rfind(b"\r\n ")  # folded already up to here: kept as it is
    if folded != -1:
        pos = folded + 3
        pieces.append(header[:pos])
    end = len(header)
    brk = linesep + b" "
    while end - pos > maxleng:
        space = header.rfind(b" ", pos, pos + maxleng)
        if space == -1:
            pieces.append(header[pos : pos + maxleng])
            pos += maxleng
        else:
            pieces.append(header[pos:space])
            pos = space + 1
        pieces.append(brk)
        maxleng = 71
    pieces.append(header[pos:])
    return b"".join(pieces)


# ---- message parsing ----

_LINE_END = re.compile(rb"\r?\n")
_DKIM_FIELD = re.compile(rb"([\x21-\x7e]+?):")


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """``dkim.rfc822_parse`` with the same result (and the same errors), through the one
    header parse of ``relay.message.ParsedMessage`` (see ``dkim_view``)."""
    return dkim_view(ParsedMessage.parse(message))


def dkim_view(message: ParsedMessage) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's (headers, body) of a parsed message, what ``dkim.rfc822_parse`` gives for
    its bytes: each field ``[name, value]`` with every line ended by CRLF, the body with
    bare LFs made CRLF. Built from the message's fields (no second parse of the header
    block); a block with a line dkimpy treats apart (no field name, a ``From `` line, a
    space before the colon) goes through ``parse_head``, and unusual messages (no empty
    line, or one at the very start) to dkimpy itself. Fresh lists each call (dkimpy's
    fields are mutable)."""
    raw = message.raw
    if not message.fields or not message.has_empty_line or raw[:1] in (b"\r", b"\n"):
        return dkim.rfc822_parse(raw)  # type: ignore[no-any-return]
    headers: list[list[bytes]] = []
    for f in message.fields:
        lines = split_lines(f.raw)
        if lines[-1] == b"":
            lines.pop()
        m = _DKIM_FIELD.match(lines[0]) if f.name else None
        if m is None:
            headers = parse_head(message.header_block() + b"\n")
            break
        value = lines[0][m.end() :] + b"\r\n"
        if len(lines) > 1:
            value += b"".join(line + b"\r\n" for line in lines[1:])
        headers.append([m.group(1), value])
    body = message.body()
    if body.count(b"\n") != body.count(b"\r\n"):
        body = _LINE_END.sub(b"\r\n", body)
    return headers, body


def parse_head(head: bytes) -> list[list[bytes]]:
    """``dkim.rfc822_parse(head)[0]``, the same fields and the same exceptions
    (MessageFormatError for a line that is no field, IndexError for a continuation line
    before the first field), with precompiled patterns."""
    headers: list[list[bytes]] = []
    for line in split_lines(head):
        if not line:
            break  # the end of the header block
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"
            continue
        m = _DKIM_FIELD.match(line)
        if m is not None:
            headers.append([m.group(1), line[m.end() :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return headers


class PrependView:
    """dkimpy's (headers, body) of messages made of a few whole header fields on top of
    one base message (list copies: a member's List-Unsubscribe, then a DKIM-Signature,
    above the list-wide copy): the base is parsed once and its canonical body hashed
    once; each message's own fields are parsed alone (``parse_head``). ``view(top)`` is
    what ``rfc822_parse(top + base)`` gives; ``usual`` is False for a base that
    ``dkim_view`` hands to dkimpy whole (no field, no empty line, a line end first),
    whose messages are then to be parsed whole."""

    def __init__(self, base: bytes) -> None:
        self.base = base
        pm = ParsedMessage.parse(base)
        self.usual = bool(pm.fields) and pm.has_empty_line and base[:1] not in (b"\r", b"\n")
        self.headers, self.body = dkim_view(pm)
        self._bodyhash: dict[tuple[object, bytes], bytes] = {}

    def view(self, top: bytes) -> tuple[list[list[bytes]], bytes]:
        """(headers, body) of top + base; top: whole header fields, each line CRLF-ended."""
        return parse_head(top) + [list(h) for h in self.headers], self.body

    def bodyhash(self, canon_policy: Any, algorithm: bytes) -> bytes:
        """base64 of the hash (algorithm's, DKIM a=) of the canonical body: bh=."""
        key = (canon_policy.body_algorithm, algorithm)
        known = self._bodyhash.get(key)
        if known is None:
            hasher = dkim.crypto.HASH_ALGORITHMS[algorithm]
            known = base64.b64encode(hasher(canonical_body(canon_policy, self.body)).digest())
            self._bodyhash[key] = known
        return known


# ---- dkimpy subclasses ----


_DIGITS = re.compile(rb"\d+$")
_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_H_SPLIT = re.compile(rb"\s*:\s*")


def _no_space(value: bytes) -> bytes:
    """``re.sub(rb"\\s+", b"", value)``: bytes.split() splits on the same six ASCII
    whitespace characters as ``\\s`` in a bytes pattern."""
    return b"".join(value.split())


def tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """``dkim.util.parse_tag_value`` (RFC 6376 section 3.2), the same tags and the same
    exceptions, without a regex call per tag: dkimpy's name check
    ``^[a-zA-Z](\\w)*`` only tests the first character."""
    tags: dict[bytes, bytes] = {}
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:
        tag_specs.pop()  # trailing semicolons are valid
    for tag_spec in tag_specs:
        key, eq, value = tag_spec.partition(b"=")
        if not eq:
            raise InvalidTagSpec(tag_spec)
        key = key.strip()
        if not key[:1].isalpha():  # bytes.isalpha: ASCII letters only
            raise InvalidTagSpec(tag_spec)
        if key in tags:
            raise DuplicateTag(key)
        tags[key] = value.strip()
    return tags


_BASE64ISH = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")
_D_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_L_DIGITS = re.compile(rb"\d{,76}$")
_MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")


def validate_signature_fields(
    sig: dict[bytes, bytes], mandatory_fields: Sequence[bytes] = _MANDATORY, arc: bool = False
) -> None:
    """``dkim.validate_signature_fields`` (dkimpy 1.1.8) step for step: the same checks in
    the same order with the same ValidationError texts (its quirk kept: the bh= syntax
    check reads b=), with precompiled patterns and no regex for whitespace removal."""
    error = dkim.ValidationError
    hashes = dkim.ARC_HASH_ALGORITHMS if arc else dkim.HASH_ALGORITHMS
    for field in mandatory_fields:
        if field not in sig:
            raise error(f"missing {field!r}=")
    a, b, bh = sig.get(b"a"), sig.get(b"b"), sig.get(b"bh")
    if a is not None and a not in hashes:
        raise error(f"unknown signature algorithm: {a!r}")
    if b is not None:
        if _BASE64ISH.match(b) is None or len(_no_space(b)) % 4 != 0:
            raise error(f"b= value is not valid base64 ({b!r})")
    if bh is not None:
        if _BASE64ISH.match(sig[b"b"]) is None or len(_no_space(bh)) % 4 != 0:
            raise error(f"bh= value is not valid base64 ({bh!r})")
    cv = sig.get(b"cv")
    if cv is not None and cv not in (dkim.CV_Pass, dkim.CV_Fail, dkim.CV_None):
        raise error(f"cv= value is not valid ({cv!r})")
    d = sig[b"d"]
    try:
        str(d, "ascii")
        if _D_SPECIALS.search(d) is not None:
            raise error(f"d= value is not valid ({d!r})")
    except UnicodeDecodeError:
        pass  # not an ASCII domain: not checked
    i = sig.get(b"i")
    if (
        not arc
        and i is not None
        and (not i.lower().endswith(d.lower()) or i[-len(d) - 1] not in ("@", ".", 64, 46))
    ):
        raise error(f"i= domain is not a subdomain of d= (i={i!r} d={d!r})")
    length = sig.get(b"l")
    if length is not None and _L_DIGITS.match(length) is None:
        raise error(f"l= value is not a decimal integer ({length!r})")
    q = sig.get(b"q")
    if q is not None and q != b"dns/txt":
        raise error(f"q= value is not dns/txt ({q!r})")
    t, x = sig.get(b"t"), sig.get(b"x")
    t_sign = None
    if t is not None:
        if _DIGITS.match(t) is None:
            raise error(f"t= value is not a decimal integer ({t!r})")
        t_sign = int(t)
        if t_sign > int(time.time()) + CLOCK_SLOP:
            raise error(f"t= value is in the future ({t!r})")
    v = sig.get(b"v")
    if v is not None and v != b"1":
        raise error(f"v= value is not 1 ({v!r})")
    if x is not None:
        if _DIGITS.match(x) is None:
            raise error(f"x= value is not a decimal integer ({x!r})")
        x_sign = int(x)
        if x_sign < int(time.time()) - CLOCK_SLOP:
            raise error(f"x= value is past ({x!r})")
        if t_sign and x_sign < t_sign:
            raise error(f"x= value is less than t= value (x={x!r} t={t!r})")


class KeyUnavailable(dkim.DKIMException):  # type: ignore[misc]
    """No usable key: DNS said there is none, or DNS failed (``temporary``)."""

    def __init__(self, message: str, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


class StrictIdentityError(dkim.ValidationError):  # type: ignore[misc]
    """The key has t=s but the signature's i= domain is not d= (RFC 6376 section 3.6.1)."""


def check_times(sig: dict[bytes, bytes], now: float) -> None:
    """dkimpy's t= / x= checks, against an injected clock instead of time.time()."""
    t_sign = None
    if b"t" in sig:
        if _DIGITS.match(sig[b"t"]) is None:
            raise dkim.ValidationError(f"t= value is not a decimal integer ({sig[b't']!r})")
        t_sign = int(sig[b"t"])
        if t_sign > now + CLOCK_SLOP:
            raise dkim.ValidationError(f"t= value is in the future ({sig[b't']!r})")
    if b"x" in sig:
        if _DIGITS.match(sig[b"x"]) is None:
            raise dkim.ValidationError(f"x= value is not a decimal integer ({sig[b'x']!r})")
        x_sign = int(sig[b"x"])
        if x_sign < now - CLOCK_SLOP:
            raise dkim.ValidationError(f"signature expired (x={x_sign})")
        if t_sign and x_sign < t_sign:
            raise dkim.ValidationError("x= value is less than t= value")


class _FastCrypto:
    """Mixin over dkim.DomainSigner: public-key steps through ``cryptography``."""

    identity_check = False  # DKIM checks i= against t=s keys; in ARC i= is the instance
    headers_relaxed = False  # set by a signer that has canonicalised self.headers (relaxed)
    # (octets the last verified signature's l= covers, canonical body octets) when l= is
    # shorter than the body, else None: content after l= is signed by nobody
    covered: tuple[int, int] | None = None

    def set_message(self, message: Message) -> None:
        """dkim.DomainSigner.set_message over a parsed message (``dkim_view``), or bytes
        (parsed here)."""
        super().set_message(b"")  # type: ignore[misc]
        if isinstance(message, ParsedMessage):
            self.headers, self.body = dkim_view(message)
        elif message:
            self.headers, self.body = rfc822_parse(message)

    # attributes provided by dkim.DomainSigner
    headers: list[Any]
    body: bytes
    minkey: int
    linesep: bytes
    signed_headers: list[Any]
    hasher: Any
    keysize: int

    def gen_header(
        self,
        fields: list[tuple[bytes, bytes]],
        include_headers: Sequence[bytes],
        canon_policy: Any,
        header_name: bytes,
        pk: SigningKey,
        standardize: bool = False,
    ) -> bytes:
        """dkim.DomainSigner.gen_header with the signature made by ``pk.sign``."""
        if standardize:
            lower = [(x, y.lower().replace(b" ", b"")) for (x, y) in fields if x != b"bh"]
            reg = [(x, y.replace(b" ", b"")) for (x, y) in fields if x == b"bh"]
            fields = sorted(lower + reg, key=lambda x: x[0])
        header_value = b"; ".join(b"=".join(x) for x in fields)
        header_value = _unsigned_value(header_value, len(header_name), standardize)
        header = (header_name, b" " + header_value)
        h = self.hasher()
        # already canonical (relaxed is idempotent), or raw: only the signed ones are made so
        relaxed = self.headers_relaxed and canon_policy.header_algorithm is Relaxed
        # b= removed above: the space put before the value can only make a new b= tag
        # match when the value starts with "b"
        stripped = not header_value.startswith(b"b")
        self.signed_headers = hash_headers(
            h,
            canon_policy,
            self.headers,
            include_headers,
            header,
            b_stripped=stripped,
            canonical=relaxed,
        )
        signature = pk.sign(h.digest())
        idx = [i for i in range(len(fields)) if fields[i][0] == b"b"][0]
        fields[idx] = (b"b", base64.b64encode(signature))
        header_value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        if not standardize:
            header_value = fold(header_value, namelen=len(header_name), linesep=self.linesep)
        return bytes(header_value)

    def verify_sig(
        self,
        sig: dict[bytes, bytes],
        include_headers: list[bytes],
        sig_header: tuple[bytes, bytes],
        dnsfunc: DnsFunc,
    ) -> bool:
        """Look the key up through ``dnsfunc`` and verify; raises DKIMException subclasses
        with a plain reason (KeyUnavailable, KeyFormatError, ValidationError)."""
        name = (sig[b"s"] + b"._domainkey." + sig[b"d"]).decode("ascii", "replace")
        try:
            records = dnsfunc(name)
        except KeyLookupError as exc:
            reason = "DNS temporary failure" if exc.temporary else "key not found"
            raise KeyUnavailable(reason, exc.temporary) from None
        want = "ed25519" if sig[b"a"].startswith(b"ed25519") else "rsa"
        keys: list[PublicKey] = []
        problems: list[str] = []
        for record in records:
            try:
                key = parse_key_record(record)
            except KeyRecordError as exc:
                problems.append(str(exc))
                continue
            if key.key_type == want:
                keys.append(key)
            else:
                problems.append(f"key type {key.key_type} does not match a={sig[b'a'].decode()}")
        if not keys:
            raise dkim.KeyFormatError("; ".join(problems) or "no usable key record")
        for key in keys[:MAX_KEY_RECORDS]:
            if key.key_type == "rsa" and key.bits < self.minkey:
                raise dkim.KeyFormatError(f"public key too small ({key.bits} bits)")
            if self.identity_check and key.strict and b"i" in sig:
                ident = sig[b"i"].rsplit(b"@", 1)[-1].lower()
                if ident != sig[b"d"].lower():
                    raise StrictIdentityError("key requires i= domain equal to d= (t=s)")
            self.keysize = key.bits
            if self._verify_with_key(sig, list(include_headers), sig_header, key):
                return True
        return False

    def _verify_with_key(
        self,
        sig: dict[bytes, bytes],
        include_headers: list[bytes],
        sig_header: tuple[bytes, bytes],
        key: PublicKey,
    ) -> bool:
        """dkim.DomainSigner.verify_sig_process with the public-key step swapped."""
        try:
            canon_policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as e:
            raise dkim.MessageFormatError(f"invalid c= value: {e.args[0]}") from None
        hasher = dkim.crypto.HASH_ALGORITHMS[sig[b"a"]]
        self.covered = None
        if b"bh" in sig:
            body = canonical_body(canon_policy, self.body)
            if b"l" in sig:
                signed = int(sig[b"l"])
                if signed < len(body):
                    self.covered = (signed, len(body))  # RFC 6376 section 8.2
                body = body[:signed]
            bodyhash = hasher(body).digest()
            try:
                bh = base64.b64decode(_no_space(sig[b"bh"]))
            except (binascii.Error, ValueError) as e:
                raise dkim.MessageFormatError(str(e)) from None
            if bodyhash != bh:
                raise dkim.ValidationError("body hash mismatch")
        if b"from" in include_headers:
            include_headers.append(b"from")  # dkimpy: any extra From breaks the signature
        h = hasher()
        self.signed_headers = hash_headers(
            h, canon_policy, self.headers, include_headers, sig_header, canonical=False
        )
        try:
            signature = base64.b64decode(_no_space(sig[b"b"]))
        except (binascii.Error, ValueError) as e:
            raise dkim.MessageFormatError(str(e)) from None
        digest = h.digest()
        try:
            if isinstance(key.key, ed25519.Ed25519PublicKey):
                key.key.verify(signature, digest)
            else:
                algo = _HASHES[h.name.lower()]
                key.key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(algo))
        except InvalidSignature:
            return False
        return True


class FastDKIM(_FastCrypto, dkim.DKIM):  # type: ignore[misc]
    """dkim.DKIM with OpenSSL crypto and an injectable clock for t= / x=."""

    identity_check = True

    def __init__(self, message: Message, *, now: float | None = None, minkey: int = 1024) -> None:
        try:
            super().__init__(message, minkey=minkey)
        except IndexError:  # dkimpy: a continuation line before the first header field
            raise dkim.MessageFormatError("continuation line before the first header") from None
        self.now = now

    def verify_headerprep(self, idx: int = 0) -> Any:
        sigheaders = [(x, y) for x, y in self.headers if x.lower() == b"dkim-signature"]
        if len(sigheaders) <= idx:
            return False
        try:
            sig = tag_value(sigheaders[idx][1])
        except InvalidTagValueList as e:
            raise dkim.MessageFormatError(str(e)) from None
        self.signature_fields = sig
        timeless = {k: v for k, v in sig.items() if k not in (b"t", b"x")}
        validate_signature_fields(timeless)
        check_times(sig, time.time() if self.now is None else self.now)
        self.domain = sig[b"d"]
        self.selector = sig[b"s"]
        include_headers = [x.lower() for x in _H_SPLIT.split(sig[b"h"])]
        self.include_headers = tuple(include_headers)
        return sig, include_headers, sigheaders


class FastARC(_FastCrypto, dkim.ARC):  # type: ignore[misc]
    """dkim.ARC with OpenSSL crypto (verification through ``ARC.verify``)."""

    def __init__(self, message: Message, *, minkey: int = 1024) -> None:
        try:
            super().__init__(message, minkey=minkey)
        except IndexError:
            raise dkim.MessageFormatError("continuation line before the first header") from None

    def sorted_arc_headers(self) -> tuple[int, list[tuple[int, tuple[bytes, bytes]]]]:
        """dkim.ARC.sorted_arc_headers with the instance read by ``arcfields.arc_instance``
        (dkimpy's ARC.verify groups the sets through this method)."""
        return sorted_arc_headers(canonicalize_headers(_RELAXED, self.headers))

    def verify_instance(
        self, arc_headers_w_instance: list[Any], instance: int, dnsfunc: DnsFunc
    ) -> dict[str, Any]:
        """dkim.ARC.verify_instance, also accepting a=ed25519-sha256 (RFC 8463 keys) where
        dkimpy accepts rsa-sha256 only; the rest follows dkimpy step by step."""
        if instance == 0 or not arc_headers_w_instance:
            raise dkim.ParameterError(f"request to verify instance {instance} not present")
        values: dict[bytes, bytes] = {}
        arc_headers = []
        for i, arc_header in arc_headers_w_instance:
            if i > instance:
                continue
            arc_headers.append(arc_header)
            if i == instance:
                name = arc_header[0].lower()
                if name in values:
                    raise dkim.MessageFormatError(f"Duplicate {name!r} for instance {instance}")
                values[name] = arc_header[1]
        if len(values) != 3:
            raise dkim.MessageFormatError(f"Incomplete ARC set for instance {instance}")
        output: dict[str, Any] = {
            "instance": instance,
            "aar-value": values[b"arc-authentication-results"],
        }
        sig = _arc_tags(values[b"arc-message-signature"])
        _validate_arc_fields(sig, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"])
        output["ams-domain"], output["ams-selector"] = sig[b"d"], sig[b"s"]
        include_headers = [x.lower() for x in _H_SPLIT.split(sig[b"h"])]
        if b"arc-seal" in include_headers:
            raise dkim.ParameterError("The Arc-Message-Signature MUST NOT sign ARC-Seal")
        # the AMS field of this instance as it stands (its own c= canonicalises it), the
        # instance read by the one i= reader wherever the tag stands (RFC 8617 4.1.2)
        raw_ams_header = next(
            (
                (x, y)
                for (x, y) in self.headers
                if x.lower() == AMS and arc_instance(x, y) == instance
            ),
            None,
        )
        if raw_ams_header is None:
            raise dkim.MessageFormatError(f"ARC-Message-Signature i={instance} not found")
        sig.setdefault(b"c", b"relaxed/relaxed")
        try:
            output["ams-valid"] = self.verify_sig(sig, include_headers, raw_ams_header, dnsfunc)
        except dkim.DKIMException:
            output["ams-valid"] = False
        if output["ams-valid"] and self.covered is not None:
            # an AMS whose l= leaves body content unsigned vouches for none of it: it does
            # not validate for the chain, so no override rests on it (RFC 6376 section 8.2)
            output["ams-valid"] = False
            output["ams-reason"] = "l= covers {} of {} body octets".format(*self.covered)
        sig = _arc_tags(values[b"arc-seal"])
        _validate_arc_fields(sig, [b"i", b"a", b"b", b"cv", b"d", b"s"])
        if b"h" in sig:
            raise dkim.ValidationError("h= tag not permitted in ARC-Seal header field")
        output["as-domain"], output["as-selector"], output["cv"] = sig[b"d"], sig[b"s"], sig[b"cv"]
        as_include_headers = [x[0].lower() for x in arc_headers]
        as_include_headers.reverse()
        as_header = (b"ARC-Seal", b" " + values[b"arc-seal"])
        sig.setdefault(b"c", b"relaxed/relaxed")
        try:
            output["as-valid"] = self.verify_sig(sig, as_include_headers[:-1], as_header, dnsfunc)
        except dkim.DKIMException:
            output["as-valid"] = False
        return output


ARC_ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")


def _arc_tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return tag_value(value)
    except InvalidTagValueList as e:
        raise dkim.MessageFormatError(str(e)) from None


def _validate_arc_fields(sig: dict[bytes, bytes], mandatory: list[bytes]) -> None:
    """dkimpy's ARC field checks, with ed25519-sha256 accepted besides rsa-sha256."""
    if sig.get(b"a") in ARC_ALGORITHMS:
        checked = dict(sig)
        checked[b"a"] = b"rsa-sha256"
        validate_signature_fields(checked, mandatory, True)
    else:
        validate_signature_fields(sig, mandatory, True)
