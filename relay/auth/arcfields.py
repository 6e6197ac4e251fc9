"""The one reader of an ARC header field's instance (``i=``) and of an AAR's ``dmarc=``.

RFC 8617 section 4.2.1: every ARC header field carries its set's instance. In the
ARC-Message-Signature and the ARC-Seal it is the tag ``i=`` of a DKIM-style tag-list
(section 4.1.2, 4.1.3; the tag may stand anywhere in the list, last too); the
ARC-Authentication-Results value starts with it, ``i=N;`` followed by an
Authentication-Results payload (section 4.1.1). Every part of the relay that needs an
instance (the chain structure, the verifier's set grouping, the seal's next instance,
the ARC override's AAR lookup) asks ``arc_instance``; nothing else parses ``i=``.

``aar_dmarc`` gives the ``dmarc=`` result an AAR records (the ARC override and ``relay
diagnose`` read it), through the one A-R value parser (``results.parse_value``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from relay.auth.results import AuthResultsSyntaxError, parse_value

AAR = b"arc-authentication-results"
AMS = b"arc-message-signature"
AS = b"arc-seal"
ARC_HEADERS = (AAR, AMS, AS)

# A decimal instance of at most 9 digits (RFC 8617 section 4.2.1 caps the chain at 50;
# a longer number is no instance we could ever accept or seal after).
_AAR_PREFIX = re.compile(rb"[ \t\r\n]*i[ \t\r\n]*=[ \t\r\n]*([0-9]{1,9})[ \t\r\n]*(?:;|$)")
_WSP = re.compile(rb"[ \t\r\n]+")


def _tag_instance(value: bytes) -> int | None:
    """The ``i=`` tag of a tag-list (RFC 6376 section 3.2: ``tag-spec *( ";" tag-spec )``,
    FWS around names and values, names case-sensitive), wherever it stands; None when
    missing, duplicated, or not a decimal number."""
    found: int | None = None
    for spec in value.split(b";"):
        name, eq, raw = spec.partition(b"=")
        if not eq or _WSP.sub(b"", name) != b"i":  # tag names are case-sensitive
            continue
        if found is not None:
            return None  # a duplicated tag makes the tag-list invalid (section 3.2)
        digits = _WSP.sub(b"", raw)
        if not digits.isdigit() or not digits.isascii() or len(digits) > 9:
            return None
        found = int(digits)
    return found


def aar_split(value: bytes) -> tuple[int | None, bytes]:
    """(instance, the A-R payload after ``i=N;``) of an ARC-Authentication-Results value;
    (None, value) when it does not start with an instance (RFC 8617 section 4.1.1)."""
    m = _AAR_PREFIX.match(value)
    if m is None:
        return None, value
    return int(m.group(1)), value[m.end() :]


def arc_instance(name: bytes, value: bytes) -> int | None:
    """The instance of one ARC header field (name in any case, value unfolded or not),
    or None when it has none that can be read. Instances start at 1."""
    lname = name.strip().lower()
    if lname == AAR:
        inst, _ = aar_split(value)
    elif lname in (AMS, AS):
        inst = _tag_instance(value)
    else:
        return None
    return inst if inst is not None and inst >= 1 else None


def aar_dmarc(aar_value: str | bytes) -> str:
    """The dmarc= result recorded in an ARC-Authentication-Results value, lower case;
    "" when none can be read (a comment or a quoted-string saying "dmarc=pass" is no
    result)."""
    raw = aar_value.encode("utf-8", "replace") if isinstance(aar_value, str) else aar_value
    _, payload = aar_split(raw)
    try:
        parsed = parse_value(payload.decode("utf-8", "replace"))
    except AuthResultsSyntaxError:
        return ""
    for res in parsed.results:
        if res.method == "dmarc":
            return res.result
    return ""


def sorted_arc_headers(
    relaxed_headers: Sequence[Any],
) -> tuple[int, list[tuple[int, tuple[bytes, bytes]]]]:
    """dkim.ARC.sorted_arc_headers over headers that are already relaxed-canonical, the
    instance read by ``arc_instance`` (the highest readable one is first)."""
    found: list[tuple[int, tuple[bytes, bytes]]] = []
    for name, value in relaxed_headers:
        inst = arc_instance(name, value)
        if inst is not None:
            found.append((inst, (name, value)))
    if not found:
        return 0, []
    found.sort(key=lambda a: [a[0], a[1][0].lower(), a[1][1].lower()], reverse=True)
    return found[0][0], found
