"""Who may send to whom: the relay-access decision at RCPT time (no open relay).

Postfix's model (``smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination``,
``allow_untrusted_routing = no``, ``resolve_dequoted_address = yes``), for a forwarder:

* recipients in ``[relay] local_domains`` are accepted from anyone, but only when they
  resolve to an alias (``[aliases]``); any other local recipient gets 550 5.1.1;
* any other domain is accepted only from ``[relay] trusted_networks`` or an
  authenticated session (AUTH on a submission listener; 554 5.7.1 otherwise);
* from untrusted clients, routing tricks are refused with 554 5.7.1: source routes
  (``@a:b@c``), ``%`` and ``!`` in the local part, quoted local parts hiding an ``@``
  and address literals (``v@[192.0.2.1]``). Trusted clients may use them for remote
  domains (the route is ignored, RFC 5321 appendix C).

``list_check`` claims the addresses of the mailing lists (relay.lists: post, -subscribe,
-unsubscribe, -owner, -bounces+TOKEN, -confirm+TOKEN), accepted from anyone like an alias;
any other address in a list domain gets 550 5.1.1.

``extra_local_check`` lets other parts claim addresses (the SRS engineer's hook for
bounces to SRS0/SRS1 addresses): it returns None for an address it does not handle;
a 2xx SmtpReply to accept it; a 4xx/5xx SmtpReply to reject it with that reply.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.config import Config
from relay.errors import ConfigError
from relay.model import ConnInfo, SmtpReply
from relay.smtp.address import AddressError, Mailbox, parse_mailbox

MAX_ALIAS_DEPTH = 10
MAX_EXPANSION = 1000

RELAY_DENIED = SmtpReply(554, "5.7.1 Error: relay access denied")
NO_SUCH_USER = SmtpReply(550, "5.1.1 Error: no such recipient here")
SOURCE_ROUTE = SmtpReply(554, "5.7.1 Error: source routes are not accepted")
ROUTING_SYNTAX = SmtpReply(554, "5.7.1 Error: routing syntax (%, ! or quoted @) is not accepted")
LITERAL = SmtpReply(554, "5.7.1 Error: address literals are not accepted from your network")
ALIAS_LOOP = SmtpReply(550, "5.4.6 Error: alias loop")

LocalCheck = Callable[[str], SmtpReply | None]


def _key(mbox: Mailbox) -> str:
    """Alias lookup key: case-insensitive local part and domain."""
    return f"{mbox.local.lower()}@{mbox.domain}"


class RelayRules:
    """RCPT policy and alias expansion, built once from the config."""

    def __init__(
        self,
        config: Config,
        *,
        extra_local_check: LocalCheck | None = None,
        list_check: LocalCheck | None = None,
    ) -> None:
        self._local_domains = frozenset(config.relay.local_domains)
        self._extra = extra_local_check
        self._lists = list_check
        self._aliases: dict[str, tuple[str, ...]] = {}
        for name, targets in config.aliases.items():
            key = f"aliases.{name}"
            try:
                mbox = parse_mailbox(name)
            except AddressError:
                raise ConfigError(str(config.path), key, "not a valid address") from None
            canon: list[str] = []
            for t in targets:
                try:
                    canon.append(parse_mailbox(t).address)
                except AddressError:
                    raise ConfigError(
                        str(config.path), key, f"target {t!r} is not a valid address"
                    ) from None
            self._aliases.setdefault(_key(mbox), tuple(canon))

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self._local_domains

    def check_rcpt(self, conn: ConnInfo, address: str) -> SmtpReply | None:
        """None to accept ``address`` (a path as written: route and quotes kept)."""
        try:
            mbox = parse_mailbox(address)
        except AddressError as exc:
            return exc.reply
        if not conn.may_relay:
            if mbox.route:
                return SOURCE_ROUTE
            if any(c in mbox.local for c in "%!@"):
                return ROUTING_SYNTAX
            if mbox.literal:
                return LITERAL
        if self._extra is not None:
            verdict = self._extra(mbox.address)
            if verdict is not None:
                return None if verdict.code < 400 else verdict
        if self._lists is not None and mbox.domain in self._local_domains:
            listed = self._lists(mbox.address)
            if listed is not None:
                return None if listed.code < 400 else listed
        if mbox.domain in self._local_domains:
            if _key(mbox) not in self._aliases:
                return NO_SUCH_USER
            if not self.expand(mbox.address):
                return ALIAS_LOOP
            return None
        if conn.may_relay:
            return None
        return RELAY_DENIED

    def expand(self, address: str) -> tuple[str, ...]:
        """Alias -> its final targets (recursively, loops dropped, order kept, no duplicates);
        a non-alias -> ``(address,)``. Targets have lower-cased domains."""
        try:
            mbox = parse_mailbox(address)
        except AddressError:
            return (address,)
        if _key(mbox) not in self._aliases:
            return (address,)
        out: list[str] = []
        seen_out: set[str] = set()
        self._walk(mbox, set(), out, seen_out, 0)
        return tuple(out)

    def _walk(
        self, mbox: Mailbox, stack: set[str], out: list[str], seen_out: set[str], depth: int
    ) -> None:
        key = _key(mbox)
        targets = self._aliases.get(key)
        if targets is None:
            if key not in seen_out and len(out) < MAX_EXPANSION:
                seen_out.add(key)
                out.append(mbox.address)
            return
        if key in stack or depth >= MAX_ALIAS_DEPTH:
            return  # a loop or a too-deep chain: this branch gives nothing
        stack.add(key)
        for t in targets:
            self._walk(parse_mailbox(t), stack, out, seen_out, depth + 1)
        stack.discard(key)
