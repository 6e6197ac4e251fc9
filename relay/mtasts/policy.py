"""MTA-STS (RFC 8461) parsing and MX matching: pure functions, no I/O.

- ``is_sts_record`` / ``parse_txt_record``: the ``_mta-sts`` TXT record (section 3.1).
- ``parse_policy``: the policy file (section 3.2).
- ``mx_matches`` / ``policy_allows``: MX host against the policy's patterns (section 4.1).

Every rejection raises ``relay.errors.PolicyError`` and names the line (policy) or the
field (TXT); nothing else is ever raised for any input (property-tested).

Decisions, where peers disagree (see tests/vectors/mta-sts and the report):

- Policy fields may come in any order (the ABNF has no order); ``version``, ``mode`` and
  ``max_age`` are required; ``mx`` is required at least once "except when mode is
  'none'" (the ABNF comment in 3.2).
- A repeated non-``mx`` field: "all entries except for the first SHALL be ignored"
  (3.2). The same rule holds for a repeated TXT tag.
- Field names and values are case-sensitive (the ABNF uses ``%s``); lines end in LF or
  CRLF; whitespace after the ``:`` and at the end of a line is allowed; a field line may
  not start with whitespace (chasquid accepts indentation; we reject it, naming the line).
  Empty lines are skipped.
- ``max_age`` is 1 to 10 digits, 0..31557600; anything else is invalid (not clamped).
- An ``mx`` pattern is a domain name, optionally with a leading ``*.`` label. ``*`` in
  any other place is invalid (Mimecast's in-label wildcards are rejected). U-labels are
  accepted and stored as A-labels (IDNA), lower case, without a trailing dot.
- Unknown fields are ignored, but must still be well-formed ``name: value`` lines.
- In the TXT record, whitespace around ``;`` and ``=`` and empty fields (``;;``) are
  tolerated; ``v=STSv1`` must come first; ``id`` (1-32 letters/digits) is required;
  other tags must be well-formed extensions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.errors import PolicyError
from relay.model import StsMode

MAX_AGE_LIMIT = 31_557_600  # RFC 8461 section 3.2
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 section 3.3 (suggested limit)

_WSP = " \t"
_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_TXT_EXT_VALUE_RE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_DIGITS_RE = re.compile(r"[0-9]{1,10}")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_STS_START_RE = re.compile(r"v[ \t]*=[ \t]*STSv1[ \t]*(?:;|$)")


@dataclass(frozen=True, slots=True)
class StsRecord:
    """A parsed ``_mta-sts`` TXT record."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()
    text: str = ""


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A parsed, valid policy file."""

    mode: StsMode
    mx: tuple[str, ...]  # normalised patterns: lower case A-labels, "*." kept
    max_age: int
    text: str  # the policy as served (decoded)
    version: str = "STSv1"
    extensions: tuple[tuple[str, str], ...] = ()

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """The policy's non-empty lines, for TLS-RPT ``policy-string`` (RFC 8460 4.3)."""
        lines = self.text.replace("\r\n", "\n").split("\n")
        return tuple(line.rstrip(_WSP) for line in lines if line.strip(_WSP))


# ---------------------------------------------------------------- TXT record (3.1)


def is_sts_record(txt: str) -> bool:
    """True when txt begins with ``v=STSv1`` followed by ``;`` or its end.

    "Records that do not begin with 'v=STSv1;' are discarded" (3.1); ``v=STSv12`` is
    not such a record. A lone ``v=STSv1`` is kept, and then fails parsing (no id)."""
    return _STS_START_RE.match(txt) is not None


def parse_txt_record(txt: str) -> StsRecord:
    """Parse one TXT record (its strings already joined without spaces)."""
    if not is_sts_record(txt):
        raise PolicyError("TXT record: does not begin with v=STSv1")
    tags = txt_tags(txt)
    seen: dict[str, str] = {}
    extensions: list[tuple[str, str]] = []
    for i, (name, value) in enumerate(tags):
        where = f"TXT record field {i + 1} ({name}={value})"
        if i == 0:
            continue  # v=STSv1, checked by is_sts_record
        if name in seen or name == "v":
            continue  # a repeated field: the first one counts (3.2)
        if name == "id":
            if not _ID_RE.fullmatch(value):
                raise PolicyError(f"{where}: id must be 1 to 32 letters or digits")
        elif not _EXT_NAME_RE.fullmatch(name):
            raise PolicyError(f"{where}: invalid field name")
        elif not _TXT_EXT_VALUE_RE.fullmatch(value):
            raise PolicyError(f"{where}: invalid field value")
        else:
            extensions.append((name, value))
        seen[name] = value
    if "id" not in seen:
        raise PolicyError("TXT record: no id field")
    return StsRecord(id=seen["id"], extensions=tuple(extensions), text=txt)


def select_record(txts: list[str]) -> StsRecord:
    """The one STS record among a name's TXT records (3.1): records not beginning with
    ``v=STSv1`` are discarded; zero or several remaining, or an invalid one, means the
    domain has no policy (PolicyError says which)."""
    sts = [t for t in txts if is_sts_record(t)]
    if not sts:
        raise PolicyError("no TXT record begins with v=STSv1")
    if len(sts) > 1:
        raise PolicyError(f"{len(sts)} TXT records begin with v=STSv1 (exactly one allowed)")
    return parse_txt_record(sts[0])


def txt_tags(txt: str) -> list[tuple[str, str]]:
    """Split a TXT record into (name, value) pairs; whitespace around names, values and
    ';' is dropped and empty fields are skipped. Raises PolicyError on a field without
    '='."""
    out: list[tuple[str, str]] = []
    for i, field in enumerate(txt.split(";")):
        field = field.strip(_WSP)
        if not field:
            continue
        if "=" not in field:
            raise PolicyError(f"TXT record field {i + 1} ({field}): no '='")
        name, value = field.split("=", 1)
        out.append((name.strip(_WSP), value.strip(_WSP)))
    return out


# ---------------------------------------------------------------- policy file (3.2)


def parse_policy_bytes(body: bytes) -> StsPolicy:
    """Decode (UTF-8) and parse a policy body."""
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy is {len(body)} bytes, over the {MAX_POLICY_BYTES} limit")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy is not UTF-8 (byte {exc.start})") from None
    return parse_policy(text)


def parse_policy(text: str) -> StsPolicy:
    """Parse and validate a policy file strictly (RFC 8461 section 3.2)."""
    fields: dict[str, tuple[int, str]] = {}
    mx: list[str] = []
    extensions: list[tuple[str, str]] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line terminator
    for n, raw in enumerate(lines, start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip(_WSP):
            continue
        where = f"line {n}"
        if line[0] in _WSP:
            raise PolicyError(f"{where}: starts with whitespace: {_show(line)}")
        if ":" not in line:
            raise PolicyError(f"{where}: no ':' in {_show(line)}")
        name, value = line.split(":", 1)
        value = value.strip(_WSP)
        if not _EXT_NAME_RE.fullmatch(name):
            raise PolicyError(f"{where}: invalid field name {_show(name)}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise PolicyError(f"{where}: control character in the value of {name}")
        if name == "mx":
            try:
                mx.append(normalise_pattern(value))
            except PolicyError as exc:
                raise PolicyError(f"{where}: mx {_show(value)}: {exc}") from None
        elif name in ("version", "mode", "max_age"):
            fields.setdefault(name, (n, value))  # a repeated field: the first counts
        else:
            if not value:
                raise PolicyError(f"{where}: empty value of {name}")
            extensions.append((name, value))

    for required in ("version", "mode", "max_age"):
        if required not in fields:
            raise PolicyError(f"policy: no {required} field")
    n, version = fields["version"]
    if version != "STSv1":
        raise PolicyError(f"line {n}: unknown version {_show(version)} (only STSv1)")
    n, mode_text = fields["mode"]
    try:
        mode = StsMode(mode_text)
    except ValueError:
        raise PolicyError(
            f"line {n}: invalid mode {_show(mode_text)} (enforce, testing or none)"
        ) from None
    n, age_text = fields["max_age"]
    if not _DIGITS_RE.fullmatch(age_text):
        raise PolicyError(f"line {n}: max_age {_show(age_text)} is not 1 to 10 digits")
    max_age = int(age_text)
    if max_age > MAX_AGE_LIMIT:
        raise PolicyError(f"line {n}: max_age {max_age} is over {MAX_AGE_LIMIT}")
    if not mx and mode is not StsMode.NONE:
        raise PolicyError(f"policy: no mx field (required in mode {mode})")
    return StsPolicy(
        mode=mode,
        mx=tuple(mx),
        max_age=max_age,
        text=text,
        version=version,
        extensions=tuple(extensions),
    )


def _show(s: str) -> str:
    return repr(s if len(s) <= 80 else s[:77] + "...")


# ---------------------------------------------------------------- MX matching (4.1)


def normalise_name(name: str) -> str:
    """Lower-case A-label form of a domain name, trailing dot removed. Raises PolicyError
    when it is not a valid host name (empty label, bad characters, too long)."""
    name = name[:-1] if name.endswith(".") else name
    if not name:
        raise PolicyError("empty name")
    if len(name) > 1024:
        raise PolicyError("name too long")
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError as exc:
        raise PolicyError(f"not a valid internationalised name: {exc}") from None
    ascii_name = ascii_name.lower()
    if len(ascii_name) > 253:
        raise PolicyError("name longer than 253 octets")
    for label in ascii_name.split("."):
        if not _LABEL_RE.fullmatch(label):
            raise PolicyError(f"invalid label {label!r}")
    return ascii_name


def normalise_pattern(pattern: str) -> str:
    """Validate an mx pattern (``["*."] Domain``) and return its normalised form."""
    if pattern.startswith("*."):
        rest = normalise_name(pattern[2:])
        return "*." + rest
    return normalise_name(pattern)


def mx_matches(pattern: str, host: str) -> bool:
    """True when MX host name ``host`` matches policy pattern ``pattern`` (RFC 8461 4.1).

    A leading ``*.`` covers exactly one label ("*.example.com" matches
    "mail.example.com", not "example.com" nor "a.b.example.com"). Case, a trailing dot
    and U-label/A-label spelling do not matter. An invalid pattern or host never
    matches. Never raises."""
    try:
        pat = normalise_pattern(pattern)
        name = normalise_name(host)
    except PolicyError:
        return False
    if pat.startswith("*."):
        first, _, rest = name.partition(".")
        return bool(first) and rest == pat[2:]
    return name == pat


def policy_allows(policy: StsPolicy, host: str) -> bool:
    """True when host matches one of the policy's mx patterns."""
    return any(mx_matches(p, host) for p in policy.mx)


def patterns_allow(patterns: tuple[str, ...], host: str) -> bool:
    """policy_allows for a bare pattern tuple (e.g. ``TlsPolicy.mx_patterns``)."""
    return any(mx_matches(p, host) for p in patterns)
