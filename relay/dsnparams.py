"""The DSN extension's parameters (RFC 3461): parse and check what a client gives at MAIL
(RET, ENVID) and RCPT (NOTIFY, ORCPT), and encode them for the next hop.

Neutral ground: the inbound session (relay.smtp) parses with it, the outbound client
(relay.delivery) encodes with it and the queue (relay.queue) asks ``wants``; the SMTP
session's own view of MAIL and RCPT is in relay.smtp.dsnparams.

Pure functions, no I/O. A bad value raises DsnParamError carrying the 501 reply that names
the parameter (RFC 3461 section 4 and 5: "501 syntax error in parameters").
"""

from __future__ import annotations

import re

from relay.model import MailDsn, RcptDsn, SmtpReply

NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
MAX_ENVID = 100  # RFC 3461 section 4.4: at most 100 characters (encoded)
MAX_ORCPT = 500  # RFC 3461 section 4.2: at most 500 characters (encoded)
_HEX = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")  # an atom (RFC 3461 4.2)


class DsnParamError(ValueError):
    def __init__(self, param: str, problem: str) -> None:
        self.reply = SmtpReply(501, f"5.5.4 Error: bad {param} parameter: {problem}")
        super().__init__(str(self.reply))


def xtext_decode(text: str, param: str) -> str:
    """RFC 3461 section 4: xchar is "!".."~" except "+" and "="; "+" is followed by two
    upper-case hex digits. The decoded value must be printable US-ASCII here."""
    for i, ch in enumerate(text):
        if not ("!" <= ch <= "~") or ch == "=":
            raise DsnParamError(param, "not xtext")
        if ch == "+" and not _HEX.match(text, i):
            raise DsnParamError(param, "bad +XX escape")
    decoded = _HEX.sub(lambda m: chr(int(m.group(1), 16)), text)
    if any(not (" " <= c <= "~") for c in decoded):
        raise DsnParamError(param, "control characters")
    return decoded


def xtext_encode(text: str) -> str:
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}"
        for c in text.encode("ascii", "replace").decode("ascii")
    )


def parse_notify(value: str | None) -> tuple[str, ...]:
    """RFC 3461 section 4.1: NEVER alone, or one or more of SUCCESS, FAILURE, DELAY."""
    if not value:
        raise DsnParamError("NOTIFY", "needs a value")
    words = [w.upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return ("NEVER",)
    if not words or any(w not in NOTIFY_WORDS for w in words):
        raise DsnParamError("NOTIFY", "NEVER, or SUCCESS, FAILURE and/or DELAY")
    if len(set(words)) != len(words):
        raise DsnParamError("NOTIFY", "a keyword given twice")
    return tuple(w for w in NOTIFY_WORDS if w in words)


def parse_orcpt(value: str | None) -> str:
    """RFC 3461 section 4.2: addr-type ";" xtext, at most 500 characters."""
    if not value or len(value) > MAX_ORCPT:
        raise DsnParamError("ORCPT", "needs addr-type;address, at most 500 characters")
    addr_type, sep, addr = value.partition(";")
    if not sep or not _ADDR_TYPE.match(addr_type) or not addr:
        raise DsnParamError("ORCPT", "needs addr-type;address")
    decoded = xtext_decode(addr, "ORCPT")
    return f"{addr_type.lower()};{decoded}"


def parse_ret(value: str | None) -> str:
    """RFC 3461 section 4.3: FULL or HDRS."""
    if value is None or value.upper() not in ("FULL", "HDRS"):
        raise DsnParamError("RET", "FULL or HDRS")
    return value.upper()


def parse_envid(value: str | None) -> str:
    """RFC 3461 section 4.4: xtext, at most 100 characters."""
    if not value or len(value) > MAX_ENVID:
        raise DsnParamError("ENVID", "needs xtext, at most 100 characters")
    return xtext_decode(value, "ENVID")


def mail_options(dsn: MailDsn) -> list[str]:
    """What to add to MAIL FROM at a next hop that offers DSN."""
    out = []
    if dsn.ret:
        out.append(f"RET={dsn.ret}")
    if dsn.envid:
        out.append(f"ENVID={xtext_encode(dsn.envid)}")
    return out


def rcpt_options(dsn: RcptDsn) -> list[str]:
    """What to add to RCPT TO at a next hop that offers DSN."""
    out = []
    if dsn.notify:
        out.append(f"NOTIFY={','.join(dsn.notify)}")
    if dsn.orcpt:
        addr_type, _, addr = dsn.orcpt.partition(";")
        out.append(f"ORCPT={addr_type};{xtext_encode(addr)}")
    return out


def wants(notify: tuple[str, ...], what: str, default: bool) -> bool:
    """Whether a recipient asked for a DSN of kind ``what`` (SUCCESS, FAILURE, DELAY);
    ``default`` when it gave no NOTIFY (RFC 3461 4.1: FAILURE, and DELAY at our option)."""
    if not notify:
        return default
    return what in notify
