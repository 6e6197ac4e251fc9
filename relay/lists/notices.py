"""The mail a list writes itself: confirmation requests, held-post notices to the
owners, rejection and expiry notices to authors, the probe sent when a member's delivery
is disabled. Plain text, From the list's -owner address (the confirmation: -confirm+TOKEN
as Reply-To), ready for DKIM signing by the list domain."""

from __future__ import annotations

import email.utils
import time

from relay.config import ListConfig
from relay.lists.addresses import address_of


def _message(cfg: ListConfig, to: str, subject: str, body: str, extra: str = "") -> bytes:
    owner = address_of(cfg, "owner")
    head = (
        f'From: "{cfg.display_name}" <{owner}>\r\n'
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {email.utils.formatdate(time.time())}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain=cfg.domain)}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"{extra}"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    text = body.replace("\r\n", "\n").replace("\n", "\r\n")
    return head.encode() + text.encode("utf-8") + b"\r\n"


def confirmation(cfg: ListConfig, to: str, token: str, base_url: str) -> bytes:
    """RFC 8058 is for unsubscribing; subscribing is double opt-in: a reply to the
    -confirm+TOKEN address or a POST of the confirm page subscribes."""
    reply = address_of(cfg, "confirm", token)
    return _message(
        cfg,
        to,
        f"confirm {token}",
        f"Someone asked to subscribe {to} to the list {cfg.address}.\n\n"
        f"To confirm, reply to this message (to {reply}), or open\n\n"
        f"    {base_url}/lists/confirm/{token}\n\n"
        "and press the button there. If you did not ask, ignore this message.",
        f"Reply-To: <{reply}>\r\n",
    )


def held_notice(
    cfg: ListConfig, owner: str, held_id: str, author: str, subject: str, reason: str
) -> bytes:
    return _message(
        cfg,
        owner,
        f"{cfg.address}: post from {author} held for approval",
        f"A post to {cfg.address} is held: {reason}.\n\n"
        f"  From:    {author}\n  Subject: {subject}\n  Id:      {held_id}\n\n"
        f"  relay list approve {cfg.address} {held_id}\n"
        f"  relay list reject {cfg.address} {held_id} --reason TEXT\n\n"
        "It expires in 7 days.",
    )


def rejected_notice(cfg: ListConfig, author: str, subject: str, reason: str) -> bytes:
    return _message(
        cfg,
        author,
        f"Your post to {cfg.address} was not accepted",
        f"Your post to {cfg.address} (subject: {subject}) was rejected by the list's "
        f"moderators.\n\nReason: {reason or 'none given'}",
    )


def expired_notice(cfg: ListConfig, author: str, subject: str) -> bytes:
    return _message(
        cfg,
        author,
        f"Your post to {cfg.address} expired",
        f"Your post to {cfg.address} (subject: {subject}) waited 7 days for a moderator "
        "and has been discarded.",
    )


def probe_notice(cfg: ListConfig, member: str) -> bytes:
    return _message(
        cfg,
        member,
        f"Delivery from {cfg.address} to you is disabled",
        f"Mail from the list {cfg.address} to {member} has bounced too often, so the list "
        "stopped sending to you. If this reaches you, ask the list owner "
        f"({address_of(cfg, 'owner')}) to enable it again, or subscribe anew. You will be "
        "removed from the list in 14 days.",
    )
