"""The lists' small decisions, each a pure function with its reason beside it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from relay.config import ListConfig
from relay.lists.bounces import Kind as BounceKind

Posting = Literal["accept", "hold"]

HARD_SCORE = 1.0
SOFT_SCORE = 0.5
DISABLED_REMOVE_AFTER = 14 * 86400.0  # a member disabled this long is removed
HELD_EXPIRY = 7 * 86400.0  # a held post not decided in a week is dropped, author told
CONFIRM_INTERVAL = 3600.0  # one confirmation request per address per hour
CONFIRM_VALID = 7 * 86400.0  # how long a confirmation token works


def posting_decision(cfg: ListConfig, is_member: bool) -> tuple[Posting, str]:
    """Who may post now; everyone else is held for the owners (Mailman 3's default
    action for non-members is hold, not reject)."""
    if cfg.posting == "moderated":
        return "hold", "the list is moderated"
    if cfg.posting == "anyone":
        return "accept", ""
    if is_member:
        return "accept", ""
    return "hold", "the author is not a member"


def _tag(record: str, name: str) -> str:
    m = re.search(rf"(?:^|;)\s*{name}\s*=\s*([A-Za-z]+)", record)
    return m.group(1).lower() if m else ""


def published_policy(record: str, subdomain: bool, nonexistent: bool = False) -> str:
    """The DMARC policy an author domain publishes, from its record text: p=, or sp= for
    a subdomain under its Organizational Domain's record (RFC 7489 section 6.3), or np=
    for a non-existent subdomain (RFC 9091 section 4.1) when given. "" when none."""
    p = _tag(record, "p")
    if not subdomain:
        return p
    sp = _tag(record, "sp") or p
    if nonexistent:
        return _tag(record, "np") or sp
    return sp


def needs_mitigation(cfg: ListConfig, policy: str) -> bool:
    """DMARC mitigation when the author's domain asks receivers to quarantine or reject
    unaligned mail (the list's copy is unaligned once the list changes it), or always
    when the list says so; never with dmarc_mitigation = none."""
    if cfg.dmarc_mitigation == "none":
        return False
    if cfg.mitigate_always:
        return True
    return policy in ("quarantine", "reject")


@dataclass(frozen=True, slots=True)
class Scored:
    score: float
    counted: bool  # False: already scored today
    disable: bool  # the threshold is reached now: disable delivery, send one probe


def score_bounce(
    score: float, last_day: str, today: str, kind: BounceKind, threshold: float, disabled: bool
) -> Scored:
    """Mailman 3's bounce score: hard 1.0, soft 0.5, at most one score a day (a burst of
    bounces from one outage counts once), disabled at the threshold."""
    if kind not in ("hard", "soft") or last_day == today:
        return Scored(score, False, False)
    new = score + (HARD_SCORE if kind == "hard" else SOFT_SCORE)
    return Scored(new, True, not disabled and new >= threshold)


def sender_authenticated(ar_value: str, authserv_id: str) -> bool:
    """Whether mail asking to unsubscribe its sender may be believed: our verdict (the
    Authentication-Results we added) shows an SPF, DKIM or DMARC pass; with [auth] off
    there is no verdict and the sender's word is taken (as Mailman 2 did). A forged
    unsubscribe request from an unauthenticated stranger is ignored."""
    if not ar_value:
        return True
    if ar_value.split(";", 1)[0].strip().lower() != authserv_id.lower():
        return True  # not our header: no verdict of ours to go by
    return re.search(r"\b(?:spf|dkim|dmarc)=pass\b", ar_value, re.IGNORECASE) is not None
