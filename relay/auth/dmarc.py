"""DMARC (RFC 7489): policy discovery, record parsing, identifier alignment, the result.

Discovery (section 6.6.3) asks ``_dmarc.<author domain>`` and, when that gives no DMARC
record, ``_dmarc.<Organizational Domain>`` (relay.auth.psl). Alignment (section 3.1)
compares the RFC5322.From domain with the SPF-authenticated domain and each passing DKIM
``d=``, relaxed (same Organizational Domain) or strict (equal). The result carries the
policy that applies: ``p=`` for the author domain's own record, ``sp=`` (default ``p=``)
when the record came from the Organizational Domain, lowered one step when the
message falls outside the ``pct=`` sample (section 6.6.4). The random source is injected.

Choices where RFC 7489 leaves room, all listed in docs/tests:
- a DMARC record lookup that fails temporarily gives ``temperror`` (policy none: the
  pipeline accepts); any other DNS error but NXDOMAIN/NODATA gives ``permerror``;
- no aligned pass, but an aligned identifier whose check failed temporarily: ``temperror``;
- a From field with mailboxes in several domains (6.6.1): each domain is evaluated and the
  failing one with the strictest policy wins; several From fields, no From field or a
  From without a usable domain: ``permerror``.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.auth.psl import org_domain
from relay.auth.types import DkimResult, DmarcResult, DmarcResultCode, SpfResult, SpfResultCode
from relay.dns import Resolver
from relay.errors import DnsError, DnsNoData, DnsNotFound, DnsTempFail
from relay.message import Message, as_parsed

POLICIES = ("none", "quarantine", "reject")
MAX_FROM_DOMAINS = 8  # distinct author domains evaluated for one message (DoS bound)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*:[^!\s]+)(?:!([0-9]+)([kmgtKMGT]?))?$")
_VERSION = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")
_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class DmarcRecordError(ValueError):
    """The text is not a usable DMARC record (no DMARC processing follows)."""


@dataclass(frozen=True, slots=True)
class ReportUri:
    uri: str
    max_size: int = 0  # bytes; 0 means no limit


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed ``v=DMARC1`` record (RFC 7489 section 6.3), defaults filled in."""

    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[ReportUri, ...] = ()
    ruf: tuple[ReportUri, ...] = ()
    fo: tuple[str, ...] = ("0",)
    rf: str = "afrf"
    ri: int = 86400
    p_implied: bool = False  # no valid p=/sp= but a valid rua=: taken as p=none (6.6.3)
    ignored: tuple[str, ...] = ()  # terms discarded as syntax errors (6.3)
    raw: str = ""


def is_dmarc_record(text: str) -> bool:
    """True when text starts with the version tag ``v=DMARC1`` (section 6.6.3 step 3)."""
    return _VERSION.match(text) is not None


def _uris(value: str) -> tuple[ReportUri, ...]:
    out = []
    for item in value.split(","):
        item = re.sub(r"\s+", "", item)
        m = _URI.match(item)
        if m is None:
            continue
        size = int(m.group(2)) * _SIZE_UNITS[m.group(3).lower()] if m.group(2) else 0
        out.append(ReportUri(m.group(1), size))
    return tuple(out)


def parse_record(text: str) -> DmarcRecord:
    """Parse one DMARC TXT record. Raises DmarcRecordError when it is not a DMARC record,
    or has no valid ``p=`` (or an invalid ``sp=``) and no valid ``rua=`` (6.6.3 step 6).
    Other syntax errors are ignored in favour of defaults (6.3). Remembered by record text
    (a domain's record is seen on every message from it; the record is immutable)."""
    parsed = _parse_cached(text)
    if isinstance(parsed, str):
        raise DmarcRecordError(parsed)
    return parsed


@functools.lru_cache(maxsize=1024)
def _parse_cached(text: str) -> DmarcRecord | str:
    """The record, or why it is not one (the DmarcRecordError text)."""
    try:
        return _parse_record(text)
    except DmarcRecordError as exc:
        return str(exc)


def _parse_record(text: str) -> DmarcRecord:
    if not is_dmarc_record(text):
        raise DmarcRecordError("record does not start with v=DMARC1")
    tags: dict[str, str] = {}
    ignored: list[str] = []
    for term in text.split(";")[1:]:
        term = term.strip()
        if not term:
            continue
        name, eq, value = term.partition("=")
        name = name.strip().lower()
        if not eq or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in tags:
            ignored.append(term)
            continue
        tags[name] = value.strip()
    rua = _uris(tags.get("rua", ""))
    ruf = _uris(tags.get("ruf", ""))
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    implied = False
    if p not in POLICIES or sp not in POLICIES:
        if not rua:
            what = "p=" if p not in POLICIES else "sp="
            raise DmarcRecordError(f"no valid {what} tag and no valid rua= tag")
        p = sp = "none"
        implied = True

    def pick(tag: str, allowed: tuple[str, ...], default: str) -> str:
        v = tags.get(tag, default).lower()
        if v not in allowed:
            ignored.append(f"{tag}={tags[tag]}")
            return default
        return v

    pct = 100
    if "pct" in tags:
        if re.fullmatch(r"[0-9]{1,3}", tags["pct"]) and int(tags["pct"]) <= 100:
            pct = int(tags["pct"])
        else:
            ignored.append(f"pct={tags['pct']}")
    fo = tuple(x.strip().lower() for x in tags.get("fo", "0").split(":"))
    if not fo or any(x not in ("0", "1", "d", "s") for x in fo):
        ignored.append(f"fo={tags.get('fo', '')}")
        fo = ("0",)
    ri = 86400
    if "ri" in tags:
        if re.fullmatch(r"[0-9]{1,10}", tags["ri"]):
            ri = int(tags["ri"])
        else:
            ignored.append(f"ri={tags['ri']}")
    return DmarcRecord(
        p=p,
        sp=sp,
        pct=pct,
        adkim=pick("adkim", ("r", "s"), "r"),
        aspf=pick("aspf", ("r", "s"), "r"),
        rua=rua,
        ruf=ruf,
        fo=fo,
        rf=tags.get("rf", "afrf").lower(),
        ri=ri,
        p_implied=implied,
        ignored=tuple(ignored),
        raw=text,
    )


# ---- discovery ----


@dataclass(frozen=True, slots=True)
class Discovery:
    """Where the policy came from (section 6.6.3)."""

    author_domain: str
    org_domain: str
    record: DmarcRecord | None = None
    record_domain: str = ""  # the domain whose _dmarc name held the record
    error: str = ""  # why there is no record
    result: DmarcResultCode = DmarcResultCode.NONE  # NONE, TEMPERROR or PERMERROR when no record


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


async def discover(resolver: Resolver, author_domain: str) -> Discovery:
    """Find the DMARC record for author_domain: its own, else its Organizational Domain's."""
    org = org_domain(author_domain)
    candidates = [author_domain] if org == author_domain else [author_domain, org]
    for domain in candidates:
        records, code, error = await _records_at(resolver, domain)
        if code is not DmarcResultCode.NONE:
            return Discovery(author_domain, org, error=error, result=code)
        if not records:
            continue
        if len(records) > 1:
            return Discovery(author_domain, org, error=f"_dmarc.{domain} has several DMARC records")
        try:
            record = parse_record(records[0])
        except DmarcRecordError as exc:
            return Discovery(author_domain, org, error=f"_dmarc.{domain}: {exc}")
        return Discovery(author_domain, org, record=record, record_domain=domain)
    return Discovery(author_domain, org, error=f"no DMARC record for {author_domain}")


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


def aligned(identifier: str, author_domain: str, mode: str) -> bool:
    """Identifier alignment (3.1): strict = same name, relaxed = same Organizational Domain."""
    a = identifier.strip().lower().rstrip(".")
    b = author_domain.strip().lower().rstrip(".")
    if not a or not b:
        return False
    if a == b:
        return True
    return mode != "s" and org_domain(a) == org_domain(b)


@dataclass(frozen=True, slots=True)
class Alignment:
    """One authenticated identifier compared with the From domain."""

    method: str  # "spf" | "dkim"
    domain: str  # SPF-checked domain, or DKIM d=
    result: str  # that check's result
    mode: str  # "r" | "s"
    aligned: bool  # the domain aligns with the From domain under mode (whatever the result)
    selector: str = ""


@dataclass(frozen=True, slots=True)
class DmarcEvaluation:
    """The DMARC result plus what led to it (for the A-R comment and `relay diagnose`)."""

    result: DmarcResult
    author_domain: str = ""
    record: DmarcRecord | None = None
    record_domain: str = ""
    alignments: tuple[Alignment, ...] = ()
    sampled_out: bool = False  # outside the pct= sample: policy lowered one step
    author_domains: tuple[str, ...] = ()


_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}


def alignments(
    author_domain: str, spf: SpfResult | None, dkim: Sequence[DkimResult], aspf: str, adkim: str
) -> tuple[Alignment, ...]:
    out: list[Alignment] = []
    if spf is not None and spf.domain:
        out.append(
            Alignment(
                "spf",
                spf.domain.lower(),
                str(spf.result),
                aspf,
                aligned(spf.domain, author_domain, aspf),
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
                    aligned(sig.domain, author_domain, adkim),
                    sig.selector,
                )
            )
    return tuple(out)


def evaluate(
    discovery: Discovery,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    rng: Callable[[], float] = random.random,
    author_domains: tuple[str, ...] = (),
) -> DmarcEvaluation:
    """The DMARC result for one author domain, given its discovery and the checks;
    ``author_domains`` (every From domain of the message) is recorded as it is."""
    author = discovery.author_domain
    record = discovery.record
    if record is None:
        return DmarcEvaluation(
            DmarcResult(
                discovery.result,
                header_from=author,
                org_domain=discovery.org_domain,
                reason=discovery.error,
            ),
            author_domain=author,
            author_domains=author_domains,
        )
    subdomain = discovery.record_domain != author
    published = record.sp if subdomain else record.p
    found = alignments(author, spf, dkim, record.aspf, record.adkim)
    spf_ok = any(a.method == "spf" and a.aligned and a.result == "pass" for a in found)
    dkim_ok = any(a.method == "dkim" and a.aligned and a.result == "pass" for a in found)
    sampled_out = False
    policy = published
    if spf_ok or dkim_ok:
        code = DmarcResultCode.PASS
        which = " and ".join(x for x, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok)
        reason = f"{which} aligned with {author}"
    elif any(a.aligned and a.result == str(SpfResultCode.TEMPERROR) for a in found):
        code = DmarcResultCode.TEMPERROR
        reason = "an aligned identifier could not be checked (temporary error)"
    else:
        code = DmarcResultCode.FAIL
        reason = f"neither SPF nor DKIM passed aligned with {author}"
        if record.pct < 100 and not (record.pct > 0 and rng() * 100 < record.pct):
            sampled_out = True
            policy = _LOWER[published]
            reason += f"; outside the pct={record.pct} sample, policy lowered to {policy}"
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
        ),
        author_domain=author,
        record=record,
        record_domain=discovery.record_domain,
        alignments=found,
        sampled_out=sampled_out,
        author_domains=author_domains,
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


async def check_dmarc(
    resolver: Resolver,
    message: Message,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    rng: Callable[[], float] = random.random,
) -> DmarcEvaluation:
    """DMARC for message, given its SPF (MAIL FROM or HELO identity) and DKIM results."""
    authors = author_domains(message)
    if authors.error:
        return DmarcEvaluation(DmarcResult(DmarcResultCode.PERMERROR, reason=authors.error))
    if len(authors.domains) == 1:  # the usual case: no task and gathering future
        discoveries = [await discover(resolver, authors.domains[0])]
    else:
        discoveries = await asyncio.gather(*(discover(resolver, d) for d in authors.domains))
    domains = authors.domains
    return _worst([evaluate(d, spf, dkim, rng=rng, author_domains=domains) for d in discoveries])
