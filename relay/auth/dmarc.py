"""DMARC (RFC 9989): policy discovery, identifier alignment, the result.

Discovery (``[auth] dmarc_discovery``):
- ``treewalk`` (default, RFC 9989 section 4.10, relay.auth.treewalk): the policy record
  is the first found walking up from the author domain; the Organizational Domain of each
  name (for relaxed alignment, 4.4) comes from the same walk and ``psd=``;
- ``psl`` (RFC 7489 section 6.6.3, to compare): ``_dmarc.<author domain>``, then
  ``_dmarc.<Organizational Domain>`` from the Public Suffix List (relay.auth.psl).
The record is read as RFC 9989 says in both (relay.auth.dmarc_record): no ``pct``.

The policy that applies (RFC 9989 4.10.1 and 4.7): ``p=`` for the author domain's own
record; from an ancestor's record ``np=`` when the author domain does not exist (NXDOMAIN,
RFC 8020), else ``sp=`` (both default to ``p=``); with ``t=y`` (testing) one step lower,
reject to quarantine and quarantine to none (4.7, t tag).

Choices where the RFC leaves room, all listed in docs/tests:
- a DMARC record lookup that fails temporarily gives ``temperror`` (policy none: the
  pipeline accepts); any other DNS error but NXDOMAIN/NODATA gives ``permerror``;
- no aligned pass, but an aligned identifier whose check failed temporarily (or whose
  Organizational Domain could not be had): ``temperror``;
- a From field with mailboxes in several domains: each domain is evaluated and the
  failing one with the strictest policy wins; several From fields, no From field or a
  From without a usable domain: ``permerror``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import functools
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from relay.auth.dmarc_record import (
    POLICIES,
    DmarcRecord,
    DmarcRecordError,
    ReportUri,
    _parse_cached,
    _parse_record,
    is_dmarc_record,
    parse_record,
)
from relay.auth.psl import org_domain
from relay.auth.treewalk import Walker, WalkError
from relay.auth.types import DkimResult, DmarcResult, DmarcResultCode, SpfResult, SpfResultCode
from relay.dns import Resolver
from relay.errors import DnsError, DnsNoData, DnsNotFound, DnsTempFail
from relay.message import Message, as_parsed

__all__ = [
    "POLICIES",
    "DmarcRecord",
    "DmarcRecordError",
    "ReportUri",
    "_parse_cached",
    "_parse_record",
    "is_dmarc_record",
    "parse_record",
]

DISCOVERIES = ("treewalk", "psl")
MAX_FROM_DOMAINS = 8  # distinct author domains evaluated for one message (DoS bound)
_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


# ---- discovery ----


@dataclass(frozen=True, slots=True)
class Discovery:
    """Where the policy came from."""

    author_domain: str
    org_domain: str
    record: DmarcRecord | None = None
    record_domain: str = ""  # the policy domain: whose _dmarc name held the record
    error: str = ""  # why there is no record
    result: DmarcResultCode = DmarcResultCode.NONE  # NONE, TEMPERROR or PERMERROR when no record
    walk: tuple[str, ...] = ()  # the _dmarc names queried
    method: str = "psl"
    author_exists: bool = True  # False: NXDOMAIN at the author domain (np= applies)


async def _records_at(resolver: Resolver, domain: str) -> tuple[list[str], DmarcResultCode, str]:
    name = f"_dmarc.{domain}"
    try:
        texts = await resolver.txt(name)
    except (DnsNotFound, DnsNoData):
        return [], DmarcResultCode.NONE, ""
    except DnsTempFail as exc:
        return [], DmarcResultCode.TEMPERROR, f"DNS lookup of {name} failed temporarily ({exc})"
    except DnsError as exc:
        return [], DmarcResultCode.PERMERROR, f"DNS lookup of {name} failed ({exc})"
    return [t for t in texts if is_dmarc_record(t)], DmarcResultCode.NONE, ""


async def _psl_discover(resolver: Resolver, author_domain: str) -> Discovery:
    """RFC 7489 6.6.3: the author domain's record, else its PSL Organizational Domain's."""
    org = org_domain(author_domain)
    candidates = [author_domain] if org == author_domain else [author_domain, org]
    asked: list[str] = []
    for domain in candidates:
        asked.append(f"_dmarc.{domain}")
        records, code, error = await _records_at(resolver, domain)
        walk = tuple(asked)
        if code is not DmarcResultCode.NONE:
            return Discovery(author_domain, org, error=error, result=code, walk=walk)
        if not records:
            continue
        if len(records) > 1:
            return Discovery(
                author_domain, org, error=f"_dmarc.{domain} has several DMARC records", walk=walk
            )
        record = parse_record(records[0])
        return Discovery(author_domain, org, record=record, record_domain=domain, walk=walk)
    return Discovery(
        author_domain, org, error=f"no DMARC record for {author_domain}", walk=tuple(asked)
    )


async def _walk_discover(walker: Walker, author_domain: str) -> Discovery:
    """RFC 9989 4.10.1 (policy) and 4.10.2 (Organizational Domain) by the tree walk."""
    try:
        found, steps = await walker.policy(author_domain)
        org = await walker.org_domain(author_domain)
    except WalkError as exc:
        code = DmarcResultCode.TEMPERROR if exc.temporary else DmarcResultCode.PERMERROR
        return Discovery(
            author_domain,
            "",
            error=str(exc),
            result=code,
            walk=tuple(walker.asked),
            method="treewalk",
        )
    if found is None or found.record is None:
        notes = "; ".join(s.note for s in steps if s.note)
        error = f"no DMARC record for {author_domain}" + (f" ({notes})" if notes else "")
        return Discovery(
            author_domain, org, error=error, walk=tuple(walker.asked), method="treewalk"
        )
    return Discovery(
        author_domain,
        org,
        record=found.record,
        record_domain=found.name,
        walk=tuple(walker.asked),
        method="treewalk",
    )


async def _exists(resolver: Resolver, domain: str) -> bool:
    """False only on NXDOMAIN for domain (RFC 8020: nothing at or below the name)."""
    try:
        await resolver.a(domain)
    except DnsNotFound:
        return False
    except DnsError:
        return True
    return True


async def discover(
    resolver: Resolver,
    author_domain: str,
    *,
    method: str = "treewalk",
    walker: Walker | None = None,
) -> Discovery:
    """Find the DMARC record for author_domain by ``method`` ("treewalk" | "psl"); when the
    record is an ancestor's with an ``np=`` that differs from its ``sp=``, ask whether the
    author domain exists (the only case where it changes the policy)."""
    if method == "psl":
        d = await _psl_discover(resolver, author_domain)
    else:
        d = await _walk_discover(walker or Walker(resolver), author_domain)
    r = d.record
    if r is not None and d.record_domain != author_domain and r.np and r.np != r.sp:
        if not await _exists(resolver, author_domain):
            return Discovery(
                d.author_domain,
                d.org_domain,
                r,
                d.record_domain,
                d.error,
                d.result,
                d.walk,
                d.method,
                author_exists=False,
            )
    return d


# ---- the author domain ----


@dataclass(frozen=True, slots=True)
class AuthorDomains:
    domains: tuple[str, ...] = ()
    error: str = ""  # set when no usable RFC5322.From domain could be had (permerror)


@functools.lru_cache(maxsize=1024)
def _domain_ok(domain: str) -> str | None:
    """The From domain lower-cased (A-labels) when it is a usable domain name, else None;
    remembered by text (a sender's domain is seen on all its messages)."""
    domain = domain.strip().lower()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain or len(domain) > 253:
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LDH_LABEL.match(label) for label in labels):
        return None
    return domain


# The usual From values, which email.utils.getaddresses reads as exactly the address
# written: ``local@domain`` or ``Display Name <local@domain>`` with the display name made
# of atoms (no quotes, comments, dots or other specials) and nothing but atoms and dots in
# the address. Anything else goes to getaddresses.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = rf"{_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN_FROM = re.compile(rf"(?:{_ATEXT}(?:[ \t]+{_ATEXT})*[ \t]*)?<({_ADDR_SPEC})>|({_ADDR_SPEC})")
_LINE_END = re.compile(r"\r?\n")


def _addresses(text: str) -> list[str]:
    """The addresses of a From value as ``email.utils.getaddresses([text])`` gives them."""
    m = _PLAIN_FROM.fullmatch(text)
    if m is not None:
        return [m.group(1) or m.group(2)]
    return [addr for _name, addr in email.utils.getaddresses([text])]


def author_domains(message: Message) -> AuthorDomains:
    """The RFC5322.From domain(s) of message (distinct, in order)."""
    values = [f.value for f in as_parsed(message).get_all("from")]
    if not values:
        return AuthorDomains(error="the message has no From header field")
    if len(values) > 1:
        return AuthorDomains(error="the message has more than one From header field")
    text = _LINE_END.sub("", values[0]).strip()
    shown = text if len(text) <= 80 else text[:77] + "..."
    found: list[str] = []
    for addr in _addresses(text):
        _local, at, dom = addr.rpartition("@")
        domain = _domain_ok(dom) if at else None
        if domain is None:
            return AuthorDomains(error=f"unable to extract a From domain from: {shown}")
        if domain not in found:
            found.append(domain)
    if not found:
        return AuthorDomains(error=f"unable to extract a From domain from: {shown}")
    return AuthorDomains(tuple(found[:MAX_FROM_DOMAINS]))


# ---- alignment and the result ----


def aligned(
    identifier: str, author_domain: str, mode: str, orgs: Mapping[str, str] | None = None
) -> bool:
    """Identifier alignment (RFC 9989 4.4): strict = same name, relaxed = same
    Organizational Domain; ``orgs`` maps names to their tree-walk Organizational Domain
    (absent: the Public Suffix List's, as RFC 7489 3.2)."""
    a = identifier.strip().lower().rstrip(".")
    b = author_domain.strip().lower().rstrip(".")
    if not a or not b:
        return False
    if a == b:
        return True
    if mode == "s":
        return False
    if orgs is None:
        return org_domain(a) == org_domain(b)
    oa, ob = orgs.get(a), orgs.get(b)
    return oa is not None and oa == ob


def _shares_suffix(a: str, b: str) -> bool:
    """An Organizational Domain is a suffix of its name, so two names with no common
    last label can never share one (no walk needed)."""
    return a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class Alignment:
    """One authenticated identifier compared with the From domain."""

    method: str  # "spf" | "dkim"
    domain: str  # SPF-checked domain, or DKIM d=
    result: str  # that check's result
    mode: str  # "r" | "s"
    aligned: bool  # the domain aligns with the From domain under mode (whatever the result)
    selector: str = ""
    org_domain: str = ""  # the identifier's Organizational Domain ("" = not looked up)


@dataclass(frozen=True, slots=True)
class DmarcEvaluation:
    """The DMARC result plus what led to it (for the A-R comment and `relay diagnose`)."""

    result: DmarcResult
    author_domain: str = ""
    record: DmarcRecord | None = None
    record_domain: str = ""
    alignments: tuple[Alignment, ...] = ()
    sampled_out: bool = False  # kept for callers: RFC 9989 has no pct=, so always False
    author_domains: tuple[str, ...] = ()
    org_domain: str = ""  # the author domain's Organizational Domain
    walk: tuple[str, ...] = ()  # the _dmarc names queried, in order
    testing: bool = False  # the record says t=y: the policy was lowered one step
    discovery: str = ""  # "treewalk" | "psl"
    author_exists: bool = True


_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}


def alignments(
    author_domain: str,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    aspf: str,
    adkim: str,
    orgs: Mapping[str, str] | None = None,
) -> tuple[Alignment, ...]:
    out: list[Alignment] = []

    def org_of(domain: str) -> str:
        return "" if orgs is None else orgs.get(domain.lower().rstrip("."), "")

    if spf is not None and spf.domain:
        out.append(
            Alignment(
                "spf",
                spf.domain.lower(),
                str(spf.result),
                aspf,
                aligned(spf.domain, author_domain, aspf, orgs),
                org_domain=org_of(spf.domain),
            )
        )
    for sig in dkim:
        if sig.domain:
            out.append(
                Alignment(
                    "dkim",
                    sig.domain.lower(),
                    sig.result,
                    adkim,
                    aligned(sig.domain, author_domain, adkim, orgs),
                    sig.selector,
                    org_domain=org_of(sig.domain),
                )
            )
    return tuple(out)


def applicable_policy(discovery: Discovery) -> tuple[str, str]:
    """(the policy that applies, the tag it came from) for a discovery with a record:
    RFC 9989 4.10.1: p= at the author domain; np= for a non-existent author domain
    under an ancestor's record; sp= otherwise."""
    record = discovery.record
    assert record is not None
    if discovery.record_domain == discovery.author_domain:
        return record.p, "p"
    if not discovery.author_exists and record.np:
        return record.np, "np"
    return record.sp, "sp"


def evaluate(
    discovery: Discovery,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    rng: Callable[[], float] = random.random,
    author_domains: tuple[str, ...] = (),
    orgs: Mapping[str, str] | None = None,
) -> DmarcEvaluation:
    """The DMARC result for one author domain, given its discovery and the checks;
    ``orgs`` holds the tree-walk Organizational Domains (None: the PSL's); ``rng`` is
    no longer drawn from (RFC 9989 removed ``pct=``) and stays for callers."""
    del rng
    author = discovery.author_domain
    record = discovery.record
    common = {
        "author_domain": author,
        "author_domains": author_domains,
        "org_domain": discovery.org_domain,
        "walk": discovery.walk,
        "discovery": discovery.method,
        "author_exists": discovery.author_exists,
    }
    if record is None:
        return DmarcEvaluation(
            DmarcResult(
                discovery.result,
                header_from=author,
                org_domain=discovery.org_domain,
                reason=discovery.error,
            ),
            **common,  # type: ignore[arg-type]
        )
    if not record.applies:
        # dmarcbis section 4.10.1: no valid p= (or an invalid sp=/np=) and no valid rua=
        # URI: the Mail Receiver applies no DMARC processing to this message
        where = discovery.record_domain or author
        return DmarcEvaluation(
            DmarcResult(
                DmarcResultCode.NONE,
                header_from=author,
                org_domain=discovery.org_domain,
                reason=f"the DMARC record of {where} has no valid p= (or an invalid sp=/np=) "
                "and no valid rua=: no DMARC processing (dmarcbis 4.10.1)",
            ),
            record=record,
            record_domain=discovery.record_domain,
            **common,  # type: ignore[arg-type]
        )
    published, _tag = applicable_policy(discovery)
    found = alignments(author, spf, dkim, record.aspf, record.adkim, orgs)
    spf_ok = any(a.method == "spf" and a.aligned and a.result == "pass" for a in found)
    dkim_ok = any(a.method == "dkim" and a.aligned and a.result == "pass" for a in found)
    unknown_org = orgs is not None and any(
        a.result == "pass"
        and a.mode == "r"
        and a.domain != author
        and a.domain not in orgs
        and _shares_suffix(a.domain, author)
        for a in found
    )
    policy = published
    if spf_ok or dkim_ok:
        code = DmarcResultCode.PASS
        which = " and ".join(x for x, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok)
        reason = f"{which} aligned with {author}"
    elif unknown_org or any(a.aligned and a.result == str(SpfResultCode.TEMPERROR) for a in found):
        code = DmarcResultCode.TEMPERROR
        reason = "an aligned identifier could not be checked (temporary error)"
    else:
        code = DmarcResultCode.FAIL
        reason = f"neither SPF nor DKIM passed aligned with {author}"
        if record.t:  # RFC 9989 4.7, t=y: apply the policy one step lower
            policy = _LOWER[published]
            if policy != published:
                reason += f"; t=y (testing): policy {published} applied as {policy}"
    return DmarcEvaluation(
        DmarcResult(
            code,
            header_from=author,
            policy=policy,
            record_policy=published,
            aligned_spf=spf_ok,
            aligned_dkim=dkim_ok,
            org_domain=discovery.org_domain,
            reason=reason,
            testing=record.t,
        ),
        record=record,
        record_domain=discovery.record_domain,
        alignments=found,
        testing=record.t,
        **common,  # type: ignore[arg-type]
    )


_RANK = {
    DmarcResultCode.FAIL: 4,
    DmarcResultCode.TEMPERROR: 3,
    DmarcResultCode.PERMERROR: 2,
    DmarcResultCode.PASS: 1,
    DmarcResultCode.NONE: 0,
}


def _worst(evals: Sequence[DmarcEvaluation]) -> DmarcEvaluation:
    def key(e: DmarcEvaluation) -> tuple[int, int]:
        return (_RANK[e.result.result], _STRICTNESS.get(e.result.policy, 0))

    best = evals[0]
    for e in evals[1:]:
        if key(e) > key(best):
            best = e
    return best


async def identifier_orgs(
    walker: Walker, discovery: Discovery, spf: SpfResult | None, dkim: Sequence[DkimResult]
) -> dict[str, str]:
    """The tree-walk Organizational Domain of the author domain and of each identifier
    that relaxed alignment must compare (4.4, 4.10.2): only names that differ from the
    author domain and share its last label are walked; the walker keeps the answers."""
    author = discovery.author_domain
    orgs = {author: discovery.org_domain} if discovery.org_domain else {}
    record = discovery.record
    if record is None or not discovery.org_domain:
        return orgs
    wanted: list[str] = []
    if spf is not None and spf.domain and record.aspf == "r":
        wanted.append(spf.domain)
    if record.adkim == "r":
        wanted.extend(sig.domain for sig in dkim if sig.domain)
    for name in wanted:
        name = name.strip().lower().rstrip(".")
        if name in orgs or not _shares_suffix(name, author):
            continue
        try:
            orgs[name] = await walker.org_domain(name)
        except WalkError:
            continue  # unknown: a passing identifier left unknown gives temperror
    return orgs


async def _one(
    resolver: Resolver,
    domain: str,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    method: str,
    domains: tuple[str, ...],
) -> DmarcEvaluation:
    if method == "psl":
        d = await discover(resolver, domain, method="psl")
        return evaluate(d, spf, dkim, author_domains=domains)
    walker = Walker(resolver)
    d = await discover(resolver, domain, method="treewalk", walker=walker)
    orgs = await identifier_orgs(walker, d, spf, dkim)
    ev = evaluate(d, spf, dkim, author_domains=domains, orgs=orgs)
    if len(walker.asked) > len(ev.walk):  # the identifiers' walks asked more names
        return dataclasses.replace(ev, walk=tuple(walker.asked))
    return ev


async def check_dmarc(
    resolver: Resolver,
    message: Message,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    rng: Callable[[], float] = random.random,
    discovery: str = "treewalk",
) -> DmarcEvaluation:
    """DMARC for message, given its SPF (MAIL FROM or HELO identity) and DKIM results;
    ``discovery`` is ``[auth] dmarc_discovery`` ("treewalk" | "psl"); ``rng`` is unused
    (RFC 9989 has no pct= sampling) and kept for callers."""
    del rng
    if discovery not in DISCOVERIES:
        raise ValueError(f"unknown DMARC discovery {discovery!r}")
    authors = author_domains(message)
    if authors.error:
        return DmarcEvaluation(
            DmarcResult(DmarcResultCode.PERMERROR, reason=authors.error), discovery=discovery
        )
    domains = authors.domains
    if len(domains) == 1:  # the usual case: no task and gathering future
        evals = [await _one(resolver, domains[0], spf, dkim, discovery, domains)]
    else:
        evals = list(
            await asyncio.gather(
                *(_one(resolver, d, spf, dkim, discovery, domains) for d in domains)
            )
        )
    return _worst(evals)
