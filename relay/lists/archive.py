"""The web archive's pages: pure functions from archived posts to small, escaped HTML.

A post is shown by its From, Date and Subject and its text/plain parts, every one of them
HTML-escaped; an HTML part is never rendered (its presence is noted, the raw message has
it); attachments are listed by their file name only. Nothing from a post reaches the page
unescaped, and the pages are served with a Content-Security-Policy that runs no script
(relay.http_server), so a Subject or body written as markup stays text.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import html
import time
from dataclasses import dataclass
from email.message import EmailMessage, Message
from urllib.parse import quote

from relay.lists.members import Archived

PAGE_SIZE = 50
_NO_SUBJECT = "(no subject)"


@dataclass(frozen=True, slots=True)
class Shown:
    """What a page shows of one post."""

    subject: str
    author: str
    date: str
    texts: tuple[str, ...]  # the text/plain parts, decoded
    html_parts: int  # text/html parts not shown
    attachments: tuple[str, ...]  # file names


def _parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _header(msg: Message, name: str) -> str:
    """A header field decoded (RFC 2047), one line; "" when absent or undecodable."""
    try:
        value = msg.get(name)
    except (ValueError, LookupError, IndexError, TypeError):  # a malformed field
        raw = msg.get_all(name, failobj=[""])
        value = str(raw[0]) if raw else ""
    return " ".join(str(value or "").split())


def _text(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content
    except (LookupError, ValueError, KeyError, AssertionError):
        pass
    payload = part.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def _is_attachment(part: Message) -> bool:
    return part.get_content_disposition() == "attachment" or part.get_filename() is not None


def shown(data: bytes) -> Shown:
    """The parts of a post a page shows (the text of a wrapped post, message/rfc822,
    included: the walk goes into it)."""
    msg = _parse(data)
    texts: list[str] = []
    htmls = 0
    files: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if _is_attachment(part):
            files.append(str(part.get_filename() or "(unnamed)"))
        elif ctype == "text/plain":
            texts.append(_text(part))
        elif ctype == "text/html":
            htmls += 1
        else:
            files.append(f"(unnamed {ctype})")
    return Shown(
        _header(msg, "subject") or _NO_SUBJECT,
        _header(msg, "from"),
        _header(msg, "date"),
        tuple(texts),
        htmls,
        tuple(files),
    )


def _author_name(author: str) -> str:
    """The display name of a From value (the address's local part when none)."""
    name, addr = email.utils.parseaddr(author)
    return name or addr.partition("@")[0] or author


def post_path(prefix: str, archive_id: str) -> str:
    return f"{prefix}{quote(archive_id, safe='')}"


def index_body(
    prefix: str, posts: list[Archived], total: int, page: int, size: int = PAGE_SIZE
) -> str:
    """The index: one row per post (date, subject linking to the post, author's name),
    newest first, with links to the newer and older pages. prefix: the archive's path
    ("/lists/archive/LIST/")."""
    if not posts:
        return "<p>No posts yet.</p>" if page == 1 else "<p>No such page.</p>"
    rows = []
    for p in posts:
        s = shown_head(p.data)
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(p.created))
        rows.append(
            f"<tr><td>{html.escape(stamp)}</td>"
            f'<td><a href="{html.escape(post_path(prefix, p.id))}">{html.escape(s[0])}</a></td>'
            f"<td>{html.escape(_author_name(s[1]))}</td></tr>"
        )
    nav = []
    if page > 1:
        nav.append(f'<a rel="prev" href="{html.escape(prefix)}?page={page - 1}">Newer</a>')
    if page * size < total:
        nav.append(f'<a rel="next" href="{html.escape(prefix)}?page={page + 1}">Older</a>')
    first = (page - 1) * size + 1
    return (
        f"<p>Posts {first}-{first + len(posts) - 1} of {total}, newest first.</p>\n"
        "<table><thead><tr><th>Date (UTC)</th><th>Subject</th><th>From</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>\n<p>{' '.join(nav)}</p>"
    )


def shown_head(data: bytes) -> tuple[str, str]:
    """(subject, from) of a post, decoded: the header block alone is parsed."""
    end = data.find(b"\r\n\r\n")
    msg = email.message_from_bytes(
        data if end < 0 else data[: end + 4], policy=email.policy.default
    )
    return _header(msg, "subject") or _NO_SUBJECT, _header(msg, "from")


def post_body(prefix: str, post: Archived) -> tuple[str, str]:
    """(title, body) of one post's page."""
    s = shown(post.data)
    meta = "".join(
        f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>"
        for k, v in (("From", s.author), ("Date", s.date), ("Subject", s.subject))
    )
    parts = [f'<table class="headers">{meta}</table>']
    parts.extend(f"<pre>{html.escape(t)}</pre>" for t in s.texts)
    if s.html_parts:
        parts.append(
            "<p><em>An HTML part is not shown here; the raw message has it.</em></p>"
            if s.texts
            else "<p><em>This post has only an HTML part, not shown here; "
            "the raw message has it.</em></p>"
        )
    if s.attachments:
        names = "".join(f"<li>{html.escape(n)}</li>" for n in s.attachments)
        parts.append(f"<p>Attachments (in the raw message):</p><ul>{names}</ul>")
    raw = html.escape(post_path(prefix, post.id) + "/raw")
    parts.append(
        f'<p><a href="{raw}">Raw message</a> · <a href="{html.escape(prefix)}">Index</a></p>'
    )
    return s.subject, "\n".join(parts)
