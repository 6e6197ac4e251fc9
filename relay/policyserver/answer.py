"""What the policy service answers Postfix, as pure functions (socketmap_table(5);
postconf(5) smtp_tls_policy_maps; RFC 8461; RFC 7672).

- ``parse_request(payload, map_name)``: ``name SP key`` or a PERM reply saying what is
  wrong with the request (not UTF-8, no space, another map name, an empty key).
- ``domain_of(key)``: the recipient domain to look up, or the reply for a key that is
  not one (``[host]``, ``[host]:port``, ``domain:port``, a ``.parent`` key, an address:
  NOTFOUND; a key that is no domain name: PERM).
- ``policy_reply(PolicyFacts)``: the reply for a domain from what the relay's delivery
  would use: its MTA-STS policy (the manager and cache delivery reads), whether the
  cache could be read, and the DANE state of each MX host. The MTA-STS part is the
  relay's own decision (relay.delivery.tlspolicy.decide, asked as for a job); this module
  only says it in Postfix's words. Every branch names its RFC section.

The reply table is in docs/contract.md; the set-up and the choices in docs/postfix-policy.md.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from relay.dane.policy import DaneState
from relay.delivery import tlspolicy
from relay.delivery.tlspolicy import Action, PolicyMode, TlsInputs
from relay.errors import PolicyError
from relay.model import TlsPolicy
from relay.mtasts.policy import normalise_name

MAX_REPLY = 100_000  # Postfix's socketmap reply limit (without the netstring framing)
# the least TLS version of a "secure" reply: what the relay's verified deliveries require
# (relay.delivery.tls.verifying_context); Postfix >= 3.6 syntax
MIN_PROTOCOL = "protocols=>=TLSv1.2"


class Status(enum.StrEnum):
    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    TIMEOUT = "TIMEOUT"
    PERM = "PERM"


@dataclass(frozen=True, slots=True)
class Reply:
    status: Status
    data: str = ""
    why: str = ""  # for the log: which rule gave this reply
    rfc: str = ""

    def text(self) -> str:
        """The reply as Postfix reads it: ``STATUS SP data`` (``NOTFOUND `` keeps its space)."""
        data = " ".join(self.data.split())  # one line: no CR/LF ever reaches Postfix
        return f"{self.status} {data}"

    def wire(self) -> bytes:
        body = self.text().encode("utf-8")
        if len(body) > MAX_REPLY:
            # Postfix would refuse the reply anyway; TEMP defers rather than downgrades
            body = b"TEMP reply over the socketmap limit of 100000 bytes"
        return body


def notfound(why: str, rfc: str = "") -> Reply:
    return Reply(Status.NOTFOUND, "", why, rfc)


def perm(reason: str) -> Reply:
    return Reply(Status.PERM, reason, reason, "socketmap_table(5)")


@dataclass(frozen=True, slots=True)
class Request:
    name: str
    key: str


def parse_request(payload: bytes, map_name: str) -> Request | Reply:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return perm(f"request is not UTF-8 (byte {exc.start})")
    name, sep, key = text.partition(" ")
    if not sep:
        return perm("request is not 'name key'")
    if name != map_name:
        return perm(f"unknown map name {name[:64]!r}: this server answers {map_name!r}")
    if not key:
        return perm("empty key")
    return Request(name, key)


def domain_of(key: str) -> str | Reply:
    """The domain a smtp_tls_policy_maps key names, or the reply for any other key.

    Postfix looks the table up by "the full next-hop destination" (postconf(5)): the
    recipient domain, or a transport next hop verbatim with its brackets and port; for a
    bare domain not found it tries the parent domains as ``.parent``."""
    if key.startswith("["):
        # [host] or [host]:port: a next hop without MX lookup; MTA-STS and DANE here are
        # about the MX hosts of a recipient domain (RFC 8461 section 4.1; RFC 7672 2.2.1)
        return notfound("a [host] next hop has no MX policy", "RFC 8461 4.1")
    if key.startswith("."):
        # the parent-domain lookup: a policy covers its own domain only; its subdomains
        # publish their own (RFC 8461 section 3.1: the TXT record of the domain itself)
        return notfound("parent-domain key", "RFC 8461 3.1")
    if ":" in key:
        # domain:port: a non-default port; MTA-STS and DANE SMTP are port 25 (RFC 8461
        # section 4.1 names MX hosts; RFC 7672 section 3 uses _25._tcp)
        return notfound("a next hop with a port", "RFC 8461 4.1; RFC 7672 3")
    try:
        ipaddress.ip_address(key)
    except ValueError:
        pass
    else:
        return notfound("an address is no domain", "RFC 8461 4.1")
    try:
        return normalise_name(key)
    except PolicyError as exc:
        return perm(f"invalid domain {key[:80]!r}: {exc}")


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    domain: str
    policy: TlsPolicy | None  # the MTA-STS policy delivery would apply (None: none)
    unavailable: str = ""  # the cache could not be read and nothing was fetched: why
    dane: tuple[DaneState, ...] = ()  # per MX host; () when the MX RRset is not secure


def match_patterns(mx: Iterable[str]) -> str:
    """The policy's mx patterns as a Postfix ``match`` list: ``*.example.com`` becomes
    ``.example.com`` (Postfix: any name below example.com), names stay; duplicates go."""
    out = dict.fromkeys(p[1:] if p.startswith("*.") else p for p in mx)
    return ":".join(out)


def policy_reply(f: PolicyFacts) -> Reply:
    mode = PolicyMode.UNAVAILABLE if f.unavailable else tlspolicy.policy_mode(f.policy)
    plan = tlspolicy.decide(TlsInputs(mode, reason=f.unavailable))
    if plan.action is Action.DEFER:
        # RFC 8461 section 5 (the relay's fail-closed rule): the cache may hold an
        # unexpired policy it cannot read; NOTFOUND would let Postfix downgrade, TEMP
        # makes it defer the mail, as the relay's own delivery does
        return Reply(
            Status.TEMP, f"MTA-STS policy of {f.domain} unavailable", plan.reason, plan.rfc
        )
    governed = [s for s in f.dane if s is not DaneState.NONE]
    if f.dane and len(governed) == len(f.dane):
        # RFC 8461 section 2 and RFC 7672 section 2.2: every MX host has a DNSSEC-secure
        # TLSA RRset (or a failed TLSA lookup, which forbids the host): DANE applies and
        # MTA-STS does not. dane-only: no host without usable TLSA records is used; with
        # unusable records only, "dane" gives Postfix's mandatory encryption for them
        # (RFC 7672 section 2.2, as relay.dane.policy ENCRYPT)
        level = "dane" if DaneState.ENCRYPT in governed else "dane-only"
        return Reply(Status.OK, level, "TLSA records for every MX host", "RFC 8461 2; RFC 7672 2.2")
    if plan.action is Action.REQUIRE_TLS:
        assert f.policy is not None
        # RFC 8461 sections 4.1, 4.2, 5: verified STARTTLS with a certificate for a name
        # the policy's mx patterns allow, SNI the MX host name. Postfix "secure" checks
        # the certificate against the match list (not the MX name against it). With some
        # hosts under DANE and others not, "secure" still: never less than the policy
        # asks of any host (a DANE host with a PKIX certificate still qualifies)
        data = f"secure match={match_patterns(f.policy.mx_patterns)} servername=hostname"
        why = "enforce" + (" (some MX hosts have TLSA records)" if governed else "")
        return Reply(Status.OK, f"{data} {MIN_PROTOCOL}", why, plan.rfc)
    if governed:
        # RFC 7672 section 2.2 with RFC 8461 section 2: DANE for the hosts with TLSA,
        # opportunistic TLS for the others (no enforce policy): Postfix's "dane" level
        return Reply(Status.OK, "dane", "TLSA records for some MX hosts", "RFC 7672 2.2")
    if plan.action is Action.VERIFY:
        # RFC 8461 section 5: under a testing policy the mail is delivered even when the
        # checks fail; the failures are only reported. Postfix has no such level and a
        # socketmap cannot report, so Postfix's own default level applies
        return notfound("testing policy: delivered at Postfix's own level", "RFC 8461 5")
    # no policy, mode none, or a fetch failure without a cached policy: opportunistic
    # (RFC 7435; RFC 8461 section 5 has nothing to check), Postfix's own default level
    return notfound("no MTA-STS policy", plan.rfc)
