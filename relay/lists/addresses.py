"""Which list address a recipient is: post, -subscribe, -unsubscribe, -owner,
-bounces+TOKEN (VERP, the envelope sender of every copy) or -confirm+TOKEN."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from relay.config import ListConfig

Kind = Literal["post", "subscribe", "unsubscribe", "owner", "bounces", "confirm"]
_SUFFIX: dict[str, Kind] = {
    "-subscribe": "subscribe",
    "-unsubscribe": "unsubscribe",
    "-owner": "owner",
    "-bounces": "bounces",
    "-confirm": "confirm",
}
_TOKENED: frozenset[Kind] = frozenset({"bounces", "confirm"})
TOKEN_RE = re.compile(r"[a-z0-9]{16,64}")


@dataclass(frozen=True, slots=True)
class ListAddress:
    list: ListConfig
    kind: Kind
    token: str = ""


def parse_list_address(address: str, lists: Mapping[str, ListConfig]) -> ListAddress | None:
    """The list address ``address`` is, or None. Local parts compare case-insensitively
    (tokens are lower-case); -bounces and -confirm need a token, the others have none."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at:
        return None
    local, domain = local.lower(), domain.lower().rstrip(".")
    base, plus, token = local.partition("+")
    direct = lists.get(f"{base}@{domain}")
    if direct is not None:
        return None if plus else ListAddress(direct, "post")
    for suffix, kind in _SUFFIX.items():
        if not base.endswith(suffix):
            continue
        cfg = lists.get(f"{base[: -len(suffix)]}@{domain}")
        if cfg is None:
            return None
        if kind in _TOKENED:
            # a bare -bounces@ (no token) is still ours: a bounce we cannot tie to anyone
            if plus and not TOKEN_RE.fullmatch(token):
                return None
            return ListAddress(cfg, kind, token if plus else "")
        return None if plus else ListAddress(cfg, kind)
    return None


def address_of(cfg: ListConfig, kind: Kind, token: str = "") -> str:
    """The address of kind for list cfg (inverse of parse_list_address)."""
    if kind == "post":
        return cfg.address
    tail = f"+{token}" if token else ""
    return f"{cfg.local}-{kind}{tail}@{cfg.domain}"


def list_id(cfg: ListConfig) -> str:
    """RFC 2919 list identifier: the address with its @ as a dot."""
    return f"{cfg.local}.{cfg.domain}"
