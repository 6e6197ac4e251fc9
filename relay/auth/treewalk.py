"""The DMARC DNS tree walk (RFC 9989 section 4.10): policy discovery and the
Organizational Domain without a Public Suffix List.

The RFC text was not in this project's reference corpus; the rules below are those of
draft-ietf-dmarc-dmarcbis (the text RFC 9989 was published from), section numbers as
there:

- 4.10 the walk: ask ``_dmarc.<name>`` for the start name; then, if the name has more
  than 7 labels, jump to its 7-label suffix, else drop the leftmost label; repeat down
  to the one-label name. At most 8 queries. Answers that are not ``v=DMARC1`` are
  discarded; several DMARC records at one name are all discarded.
- 4.10.1 policy discovery: the first valid record found (the author domain's own, else
  the nearest ancestor's) is the policy record; its owner is the policy domain.
- 4.10.2 the Organizational Domain: the walk stops at a record with ``psd=n`` (that name
  is the Organizational Domain) or, above the start name, ``psd=y`` (the name one label
  below it is); otherwise the name with the fewest labels that had a record; with no
  record at all, the start name itself. Our choice where the RFC is silent: once a
  record has been found, a lookup that fails above it counts as "no record" (a TLD that
  SERVFAILs ``_dmarc`` queries must not turn every verdict into temperror); a failure
  before any record is found is temperror.

``Walker`` keeps every answer it got for one message, so the author domain's walk and
the walks for the SPF and DKIM identifiers share their queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.auth.dmarc_record import DmarcRecord, DmarcRecordError, is_dmarc_record, parse_record
from relay.dns import Resolver
from relay.errors import DnsError, DnsNoData, DnsNotFound, DnsTempFail

MAX_LABELS_JUMP = 7  # 4.10: a longer name jumps to its 7-label suffix
MAX_QUERIES = 8  # 4.10: so at most 8 queries per walk


def walk_names(domain: str) -> list[str]:
    """The names a tree walk from domain asks, in order (RFC 9989 4.10)."""
    labels = domain.strip().lower().rstrip(".").split(".")
    if not labels or not all(labels):
        return []
    names = [".".join(labels)]
    k = MAX_LABELS_JUMP if len(labels) > MAX_LABELS_JUMP else len(labels) - 1
    while k >= 1:
        names.append(".".join(labels[-k:]))
        k -= 1
    return names


@dataclass(frozen=True, slots=True)
class Step:
    """One name the walk asked: its single valid record, or why it has none."""

    name: str
    record: DmarcRecord | None = None
    note: str = ""  # "several DMARC records", "not a DMARC record: ...", ""


class WalkError(Exception):
    """A lookup on the walk failed; ``temporary`` tells temperror from permerror."""

    def __init__(self, message: str, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


@dataclass
class Walker:
    """Tree walks over one resolver, answers kept per name for one evaluation."""

    resolver: Resolver
    asked: list[str] = field(default_factory=list)  # _dmarc names, in the order asked
    failed_above: list[str] = field(default_factory=list)  # failures taken as "no record"
    _steps: dict[str, Step | WalkError] = field(default_factory=dict)

    async def step(self, name: str) -> Step:
        got = self._steps.get(name)
        if got is None:
            got = await self._ask(name)
            self._steps[name] = got
        if isinstance(got, WalkError):
            raise got
        return got

    async def _ask(self, name: str) -> Step | WalkError:
        qname = f"_dmarc.{name}"
        self.asked.append(qname)
        try:
            texts = await self.resolver.txt(qname)
        except (DnsNotFound, DnsNoData):
            return Step(name)
        except DnsTempFail as exc:
            return WalkError(f"DNS lookup of {qname} failed temporarily ({exc})", True)
        except DnsError as exc:
            return WalkError(f"DNS lookup of {qname} failed ({exc})", False)
        records = [t for t in texts if is_dmarc_record(t)]
        if not records:
            return Step(name)
        if len(records) > 1:  # 4.10 step 2: several records are all discarded
            return Step(name, note=f"{qname} has several DMARC records (all discarded)")
        try:
            return Step(name, parse_record(records[0]))
        except DmarcRecordError as exc:  # pragma: no cover - is_dmarc_record checked it
            return Step(name, note=f"{qname}: {exc}")

    async def policy(self, domain: str) -> tuple[Step | None, list[Step]]:
        """4.10.1: the first step with a record (None when the walk finds none), and the
        steps taken."""
        steps: list[Step] = []
        for name in walk_names(domain):
            s = await self.step(name)
            steps.append(s)
            if s.record is not None:
                return s, steps
        return None, steps

    async def org_domain(self, domain: str) -> str:
        """4.10.2: the Organizational Domain of domain."""
        names = walk_names(domain)
        if not names:
            return domain
        start = names[0]
        labels = start.split(".")
        fewest = ""
        for name in names:
            try:
                s = await self.step(name)
            except WalkError:
                if not fewest:
                    raise
                # our choice (the RFC is silent): once a record is found, a failed lookup
                # above it (a TLD that does not answer _dmarc queries) counts as no record
                self.failed_above.append(f"_dmarc.{name}")
                continue
            r = s.record
            if r is None:
                continue
            if r.psd == "n":
                return name
            if r.psd == "y" and name != start:
                count = name.count(".") + 2  # one label below the public suffix domain
                return ".".join(labels[-count:])
            fewest = name
        return fewest or start
