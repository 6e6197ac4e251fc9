"""The lookups behind one policy answer (I/O at this edge; the decision is
relay.policyserver.answer): the MTA-STS policy from the PolicyManager that delivery
uses (same cache, same single-flight lookups, same refresher), and the DANE state of
each MX host from relay.dane.lookup, both bounded by ``[policy_server] lookup_timeout``.

A lookup slower than the timeout is answered TEMP (Postfix defers; its own socketmap
timeout is 100 s): the MTA-STS lookup goes on in the background (the manager shields
it), so a later query finds the policy cached. A cache that cannot be read
(CacheUnavailable) and any unexpected error are TEMP too: never NOTFOUND, which would
let Postfix downgrade (RFC 8461 section 5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from relay.config import Config
from relay.dane.lookup import host_dane, mx_status
from relay.dane.policy import DaneState, Lookup
from relay.dns import Resolver
from relay.errors import DnsError, DnsNoData
from relay.model import TlsPolicy
from relay.mtasts.cache import CacheUnavailable
from relay.policyserver.answer import (
    PolicyFacts,
    Reply,
    Status,
    domain_of,
    parse_request,
    policy_reply,
)

log = structlog.get_logger("relay.policyserver")

PolicyLookup = Callable[[str], Awaitable[TlsPolicy]]


async def dane_states(resolver: Resolver, domain: str) -> tuple[DaneState, ...]:
    """The DANE state of each MX host of domain; () when the MX RRset is not
    DNSSEC-secure (RFC 7672 section 2.2.1: DANE does not apply) or the MX lookup
    fails (Postfix's own MX lookup decides what happens then)."""
    if await mx_status(resolver, domain) is not Lookup.SECURE:
        return ()
    try:
        names = [r.host.rstrip(".").lower() for r in await resolver.mx(domain)]
    except DnsNoData:
        names = [domain]  # RFC 5321 section 5.1: the implicit MX
    except DnsError:
        return ()
    names = [n for n in dict.fromkeys(names) if n not in ("", ".")]
    hosts = await asyncio.gather(*(host_dane(resolver, n, Lookup.SECURE) for n in names))
    return tuple(h.state for h in hosts)


class PolicyService:
    """Answers one socketmap request payload with one Reply."""

    def __init__(
        self, config: Config, policy_lookup: PolicyLookup | None, resolver: Resolver
    ) -> None:
        self.map_name = config.policy_server.map_name
        self.timeout = config.policy_server.lookup_timeout
        self.policy_lookup = policy_lookup  # None: [mta_sts] is off
        self.resolver = resolver
        self.answers: dict[str, int] = {}  # status -> count

    async def answer(self, payload: bytes) -> Reply:
        req = parse_request(payload, self.map_name)
        if isinstance(req, Reply):
            reply, key = req, payload[:80].decode("utf-8", "replace")
        else:
            key = req.key
            domain = domain_of(req.key.lower())
            reply = domain if isinstance(domain, Reply) else await self._lookup(domain)
        self.answers[reply.status.value] = self.answers.get(reply.status.value, 0) + 1
        log.info("policy_answer", key=key, reply=reply.text(), why=reply.why, rfc=reply.rfc)
        return reply

    async def _lookup(self, domain: str) -> Reply:
        try:
            facts = await asyncio.wait_for(self._facts(domain), self.timeout)
        except TimeoutError:
            why = f"policy lookup for {domain} took over {self.timeout:g} s"
            return Reply(Status.TEMP, why, why, "RFC 8461 5")
        except Exception as exc:  # noqa: BLE001 - an unknown answer must defer, not downgrade
            log.error("policy_lookup_failed", domain=domain, error=repr(exc))
            why = f"policy lookup for {domain} failed"
            return Reply(Status.TEMP, why, f"{why}: {type(exc).__name__}", "RFC 8461 5")
        return policy_reply(facts)

    async def _facts(self, domain: str) -> PolicyFacts:
        async def sts() -> tuple[TlsPolicy | None, str]:
            if self.policy_lookup is None:
                return None, ""
            try:
                return await self.policy_lookup(domain), ""
            except CacheUnavailable as exc:
                return None, exc.reason

        (policy, unavailable), dane = await asyncio.gather(
            sts(), dane_states(self.resolver, domain)
        )
        return PolicyFacts(domain, policy, unavailable, dane)
