"""SASL PLAIN (RFC 4616) and LOGIN decoding for AUTH (RFC 4954): pure functions.

A client response is base64 (RFC 4954 section 4); ``*`` cancels the exchange and ``=``
is an empty initial response. Errors carry the SMTP reply RFC 4954 gives them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4616 section 2: each of authzid, authcid and passwd is at most 255 octets of UTF-8
MAX_FIELD = 255


class SaslError(Exception):
    """An exchange that ends with ``reply`` (and no credentials to check)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


CANCELLED = SaslError("501 5.7.0 Authentication cancelled")  # RFC 4954 section 4
BAD_BASE64 = SaslError("501 5.5.2 Cannot decode response (invalid base64)")
BAD_PLAIN = SaslError("501 5.5.2 Malformed PLAIN response")
BAD_UTF8 = SaslError("501 5.5.2 Credentials are not valid UTF-8")


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str = ""
    authzid: str = ""


def decode_response(line: str) -> bytes:
    """One client response: ``*`` -> CANCELLED, ``=`` -> b"" (RFC 4954 section 4: an
    empty initial response), else strict base64 (BAD_BASE64)."""
    text = line.strip(" ")
    if text == "*":
        raise CANCELLED
    if text == "=":
        return b""
    if not text:
        return b""  # an empty line answering a challenge: an empty response
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BAD_BASE64 from None


def _utf8(raw: bytes) -> str:
    if len(raw) > MAX_FIELD:
        raise BAD_PLAIN
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BAD_UTF8 from None
    return text


def parse_plain(message: bytes) -> Credentials:
    """RFC 4616 section 2: ``[authzid] NUL authcid NUL passwd``; authcid and passwd are
    not empty and no field contains NUL."""
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise BAD_PLAIN
    authzid, authcid, passwd = (_utf8(p) for p in parts)
    return Credentials(authcid, passwd, authzid)


def parse_login_field(raw: bytes) -> str:
    """One LOGIN answer (the user name or the password): UTF-8, not empty."""
    if not raw:
        raise BAD_PLAIN
    return _utf8(raw)


def encode_challenge(text: str) -> str:
    """The base64 text after ``334 `` (LOGIN's "Username:" and "Password:")."""
    return base64.b64encode(text.encode("ascii")).decode("ascii")
