"""A post made into what the list sends: pure functions over the message bytes.

``distribute`` gives the list-wide copy (archived as it is): list headers (RFC 2369,
RFC 2919, RFC 8058's List-Unsubscribe-Post), the subject prefix (not doubled), DMARC
mitigation (From munged, or the post wrapped as message/rfc822), the footer when no
author signature can break. ``personalise`` adds one member's List-Unsubscribe (the
one-click URI with the member's token, and the mailto). DKIM and ARC come after, over
these final headers (relay.lists.service).
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time
from dataclasses import dataclass
from email.header import Header, decode_header, make_header

from relay.config import ListConfig
from relay.lists.addresses import address_of, list_id
from relay.message import head_end, split_fields

# fields another list (or a spoofer) put there; ours replace them
_LIST_FIELDS = frozenset(
    {
        b"list-id",
        b"list-post",
        b"list-help",
        b"list-subscribe",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"list-owner",
        b"list-archive",
        b"archived-at",
        b"precedence",
        b"return-path",
        b"errors-to",
    }
)


@dataclass(frozen=True, slots=True)
class Field:
    name: bytes  # as written
    raw: bytes  # the whole field, folded lines and the final CRLF included

    @property
    def key(self) -> bytes:
        return self.name.lower()

    def value(self) -> str:
        """The unfolded value, decoded leniently."""
        v = self.raw.split(b":", 1)[1] if b":" in self.raw else b""
        return re.sub(rb"\r?\n[ \t]", b" ", v).strip().decode("utf-8", "replace")


def split_message(message: bytes) -> tuple[list[Field], bytes]:
    """(header fields in order, body), split by relay.message's rules (the one header
    splitter: LF-only line ends tolerated, a line that is no field kept as it came, with
    an empty name). Lines keep their endings; a header block without an empty line is
    all header."""
    end = head_end(message)
    if end < 0:
        head, body = message, b""
        if not head.endswith(b"\n"):
            head += b"\r\n"
    else:
        head = message[: end + 1]
        start = end + 1
        body = message[start + (2 if message[start : start + 2] == b"\r\n" else 1) :]
    return [Field(f.name.encode(), f.raw) for f in split_fields(head)], body


def join_message(fields: list[Field], body: bytes) -> bytes:
    return b"".join(f.raw for f in fields) + b"\r\n" + body


def first(fields: list[Field], key: bytes) -> Field | None:
    return next((f for f in fields if f.key == key), None)


def _line(name: str, value: str) -> Field:
    raw = f"{name}: {value}\r\n".encode()
    return Field(name.encode(), raw)


def author(message: bytes) -> tuple[str, str]:
    """(display name, address) of the first From mailbox; ("", "") when none."""
    return _author(split_message(message)[0])


def _author(fields: list[Field]) -> tuple[str, str]:
    f = first(fields, b"from")
    if f is None:
        return "", ""
    pairs = email.utils.getaddresses([f.value()])
    if not pairs or "@" not in pairs[0][1]:
        return "", ""
    name, addr = pairs[0]
    try:
        name = str(make_header(decode_header(name))) if name else ""
    except (ValueError, LookupError):
        pass
    return name, addr


def address_domain(address: str) -> str:
    """The domain of an author address, lower-case, without a final dot."""
    return address.rpartition("@")[2].lower().rstrip(".")


def has_our_list_id(message: bytes, cfg: ListConfig) -> bool:
    """A post that already carries our List-Id has been through this list: a loop."""
    fields, _ = split_message(message)
    ident = f"<{list_id(cfg)}>".lower()
    return any(f.key == b"list-id" and ident in f.value().lower() for f in fields)


def auto_submitted(message: bytes) -> bool:
    """RFC 3834 section 5: an Auto-Submitted value other than "no" marks mail written by
    a machine (vacation replies, bounces): it is never distributed to a list."""
    fields, _ = split_message(message)
    f = first(fields, b"auto-submitted")
    return f is not None and f.value().split(";")[0].strip().lower() not in ("", "no")


def has_author_signature(fields: list[Field], domain: str) -> bool:
    want = domain.lower()
    for f in fields:
        if f.key == b"dkim-signature":
            m = re.search(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", f.value())
            if m and m.group(1).lower().rstrip(".") == want:
                return True
    return False


def prefixed_subject(subject: str, prefix: str) -> str:
    """The subject with the prefix once: a reply ("Re: [dev] x") keeps its one prefix."""
    if not prefix:
        return subject
    if prefix.lower() in subject.lower():
        return subject
    return f"{prefix} {subject}" if subject else prefix


def _encode_phrase(text: str) -> str:
    if text.isascii():
        quoted = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}"'
    return Header(text, "utf-8").encode()


def _encode_unstructured(text: str) -> str:
    return text if text.isascii() else Header(text, "utf-8").encode()


def munged_from(cfg: ListConfig, author_name: str, author_addr: str) -> str:
    """RFC 5322 From of a mitigated post: "Alice Author via Developers" <dev@...>."""
    who = author_name or author_addr.partition("@")[0]
    return f"{_encode_phrase(f'{who} via {cfg.display_name}')} <{cfg.address}>"


def list_headers(cfg: ListConfig, base_url: str) -> list[Field]:
    """RFC 2369 / RFC 2919 / RFC 8058 fields that are the same for every member."""
    help_ = f"<mailto:{address_of(cfg, 'owner')}?subject=help>"
    subscribe = (
        f"<mailto:{address_of(cfg, 'subscribe')}?subject=subscribe>, "
        f"<{base_url}/lists/subscribe/{cfg.address}>"
    )
    return [
        _line("List-Id", f"{_encode_phrase(cfg.display_name)} <{list_id(cfg)}>"),
        _line("List-Post", f"<mailto:{cfg.address}>"),
        _line("List-Help", help_),
        _line("List-Subscribe", subscribe),
        _line("List-Owner", f"<mailto:{address_of(cfg, 'owner')}>"),
        _line("Precedence", "list"),
        _line("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]


def archive_url(cfg: ListConfig, base_url: str, archive_id: str = "") -> str:
    """The list's web archive (its index, or one post's page): BASE/lists/archive/LIST-ID/."""
    return f"{base_url}/lists/archive/{list_id(cfg)}/{archive_id}"


def with_archive(distributed: bytes, cfg: ListConfig, base_url: str, archive_id: str) -> bytes:
    """The list-wide copy with List-Archive (RFC 2369 section 3.6) and Archived-At
    (RFC 5064 section 2) below our other list fields (any earlier ones were removed)."""
    fields, body = split_message(distributed)
    new = [
        _line("List-Archive", f"<{archive_url(cfg, base_url)}>"),
        _line("Archived-At", f"<{archive_url(cfg, base_url, archive_id)}>"),
    ]
    at = next((i + 1 for i, f in enumerate(fields) if f.key == b"list-owner"), len(fields))
    return join_message(fields[:at] + new + fields[at:], body)


def unsubscribe_value(cfg: ListConfig, base_url: str, token: str) -> str:
    """RFC 8058 section 3.1: an HTTPS URI (one-click) and a mailto."""
    return (
        f"<{base_url}/lists/unsubscribe/{token}>, "
        f"<mailto:{address_of(cfg, 'unsubscribe')}?subject=unsubscribe>"
    )


def unsubscribe_field(cfg: ListConfig, base_url: str, token: str) -> bytes:
    """This member's List-Unsubscribe field, CRLF-ended."""
    return f"List-Unsubscribe: {unsubscribe_value(cfg, base_url, token)}\r\n".encode()


def personalise(distributed: bytes, cfg: ListConfig, base_url: str, token: str) -> bytes:
    """The list-wide copy with this member's List-Unsubscribe on top."""
    return unsubscribe_field(cfg, base_url, token) + distributed


def _add_footer(fields: list[Field], body: bytes, footer: str) -> bytes | None:
    """Body with the footer, or None when the body's structure has no safe place for it
    (base64 or quoted-printable text, an unknown multipart type)."""
    ctype = first(fields, b"content-type")
    cte = first(fields, b"content-transfer-encoding")
    ct = ctype.value().lower() if ctype else "text/plain"
    enc = cte.value().lower() if cte else "7bit"
    text = footer.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    if ct.startswith("text/plain") and enc in ("7bit", "8bit"):
        if not text.isascii() and "charset" in ct and "utf-8" not in ct:
            return None
        sep = b"" if body.endswith(b"\r\n") or not body else b"\r\n"
        return body + sep + b"-- \r\n" + text + b"\r\n"
    m = re.search(r'boundary="?([^";]+)"?', ctype.value() if ctype else "", re.IGNORECASE)
    if ct.startswith("multipart/mixed") and m:
        close = b"--" + m.group(1).encode() + b"--"
        at = body.rfind(close)
        if at < 0:
            return None
        part = (
            b"--" + m.group(1).encode() + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text + b"\r\n"
        )
        return body[:at] + part + body[at:]
    return None


def _wrap(post: bytes, cfg: ListConfig, subject: str, from_: str, extra: list[Field]) -> bytes:
    """RFC 2046 message/rfc822 wrapper from the list (DMARC mitigation ``wrap``)."""
    fields, _ = split_message(post)
    boundary = "=_list_" + secrets.token_hex(8)
    keep = [f for f in fields if f.key in (b"to", b"cc", b"date", b"in-reply-to", b"references")]
    head = [
        _line("From", from_),
        *extra,
        *keep,
        _line("Subject", _encode_unstructured(subject)),
        _line("Message-ID", email.utils.make_msgid(domain=cfg.domain)),
        _line("MIME-Version", "1.0"),
        _line("Content-Type", f'multipart/mixed; boundary="{boundary}"'),
    ]
    if first(head, b"date") is None:
        head.append(_line("Date", email.utils.formatdate(time.time())))
    b = boundary.encode()
    body = (
        b"--" + b + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        b"The message attached was posted to " + cfg.address.encode() + b".\r\n"
        b"\r\n--" + b + b"\r\nContent-Type: message/rfc822\r\n"
        b"Content-Disposition: inline\r\n\r\n"
        + post
        + (b"" if post.endswith(b"\r\n") else b"\r\n")
        + b"\r\n--"
        + b
        + b"--\r\n"
    )
    return join_message(head, body)


def distribute(post: bytes, cfg: ListConfig, base_url: str, mitigate: bool) -> bytes:
    """The list-wide copy of a post (see the module docstring)."""
    posted, body = split_message(post)
    name, addr = _author(posted)
    fields = [f for f in posted if f.key not in _LIST_FIELDS]
    listed = list_headers(cfg, base_url)
    subj_f = first(fields, b"subject")
    subject = subj_f.value() if subj_f else ""
    try:
        subject = str(make_header(decode_header(subject)))
    except (ValueError, LookupError):
        pass
    new_subject = prefixed_subject(subject, cfg.subject_prefix)
    if mitigate:
        from_ = munged_from(cfg, name, addr)
        reply = first(fields, b"reply-to")
        if cfg.reply_to == "list":
            author_fields = [_line("Cc", addr), _line("Reply-To", f"<{cfg.address}>")]
        else:
            author_fields = [reply or _line("Reply-To", addr)]
        if cfg.dmarc_mitigation == "wrap":
            return _wrap(post, cfg, new_subject, from_, listed + author_fields)
        drop = {b"from", b"reply-to", b"sender"} | ({b"cc"} if cfg.reply_to == "list" else set())
        kept_cc = first(fields, b"cc") if cfg.reply_to == "list" else None
        if kept_cc is not None:
            author_fields[0] = _line("Cc", f"{kept_cc.value()}, {addr}")
        out: list[Field] = []
        for f in fields:
            if f.key == b"from":
                out.append(_line("From", from_))
                out.extend(author_fields)
            elif f.key not in drop:
                out.append(f)
        fields = out
    if new_subject != subject:
        fields = [
            _line("Subject", _encode_unstructured(new_subject)) if f.key == b"subject" else f
            for f in fields
        ]
        if subj_f is None:
            fields.append(_line("Subject", _encode_unstructured(new_subject)))
    if cfg.footer and (mitigate or not has_author_signature(posted, addr.rpartition("@")[2])):
        with_footer = _add_footer(fields, body, cfg.footer)
        if with_footer is not None:
            body = with_footer
    # list fields go below the trace fields (Received, our A-R, ARC) so signatures over
    # the upper part stay in order; above the author's own fields
    at = next(
        (
            i
            for i, f in enumerate(fields)
            if f.key
            not in (
                b"received",
                b"authentication-results",
                b"arc-seal",
                b"arc-message-signature",
                b"arc-authentication-results",
            )
        ),
        len(fields),
    )
    return join_message(fields[:at] + listed + fields[at:], body)
