"""SPF checks (RFC 7208): one record, its syntax, the 10 DNS-lookup and 2 void-lookup
limits counted through include/redirect (4.6.4) with the path that exceeds them,
``+all``/``?all``, ``ptr`` (5.5, deprecated), records over 512 octets."""

from __future__ import annotations

import re
from collections.abc import Mapping

from relay.auth.spf import is_spf_record
from relay.check import ERROR, OK, WARN, Finding

LOOKUP_LIMIT = 10
VOID_LIMIT = 2


def _terms(text: str) -> list[str]:
    return text.split()[1:]


def _is_lookup(term: str) -> bool:
    name = re.split(r"[:/=]", term.lstrip("+-~?").lower(), maxsplit=1)[0]
    return name in ("include", "a", "mx", "ptr", "exists", "redirect")


def _target(term: str) -> str | None:
    t = term.lstrip("+-~?")
    for k in ("include:", "redirect="):
        if t.lower().startswith(k):
            return t[len(k) :].lower().rstrip(".")
    return None


def host_target(term: str) -> str | None:
    """``a:<d>``, ``mx:<d>`` or ``exists:<d>`` (no macro) as the key under which the
    fetched answer is kept: ``"a:<d>"`` (exists asks A too) or ``"mx:<d>"``."""
    t = term.lstrip("+-~?").lower()
    kind, colon, rest = t.partition(":")
    if not colon or kind not in ("a", "mx", "exists"):
        return None
    name = rest.split("/", 1)[0].rstrip(".")
    if not name or "%" in name:
        return None
    return f"{'mx' if kind == 'mx' else 'a'}:{name}"


def count_lookups(
    domain: str, records: Mapping[str, list[str] | None], path: tuple[str, ...] = ()
) -> tuple[int, int, tuple[str, ...]]:
    """(DNS lookups, void lookups, the include path where the count first passed a limit)
    for domain's SPF record, through include: and redirect=. records: domain -> its TXT
    records, None when the name gave no records (a void lookup); ``"a:<d>"``/``"mx:<d>"``
    keys hold the answers for a:/exists:/mx: terms naming another domain (None: void,
    RFC 7208 4.6.4)."""
    path = (*path, domain)
    texts = records.get(domain)
    spf = [t for t in texts or [] if is_spf_record(t)]
    if not spf or len(path) > 12:
        return 0, 0, ()
    lookups = voids = 0
    over: tuple[str, ...] = ()
    for term in _terms(spf[0]):
        if not _is_lookup(term):
            continue
        lookups += 1
        host = host_target(term)
        if host is not None and host in records and records[host] is None:
            voids += 1
        target = _target(term)
        if target is None or "%" in target:  # a macro names no fixed domain: not followed
            continue
        if records.get(target) is None:
            voids += 1
        sub, subv, subover = count_lookups(target, records, path)
        lookups += sub
        voids += subv
        if not over and (subover or lookups > LOOKUP_LIMIT or voids > VOID_LIMIT):
            over = subover or (*path, target)
    if not over and (lookups > LOOKUP_LIMIT or voids > VOID_LIMIT):
        over = path
    return lookups, voids, over


def check_spf(domain: str, records: Mapping[str, list[str] | None]) -> list[Finding]:
    a = "SPF"
    spf = [t for t in records.get(domain) or [] if is_spf_record(t)]
    if not spf:
        return [
            Finding(
                a,
                "spf.missing",
                ERROR,
                f"{domain} publishes no SPF record",
                f'publish a TXT record at {domain} such as "v=spf1 mx -all"',
            )
        ]
    if len(spf) > 1:
        return [
            Finding(
                a,
                "spf.multiple",
                ERROR,
                f"{len(spf)} SPF records at {domain}",
                "RFC 7208 4.5: several records give permerror; merge them into one",
            )
        ]
    text = spf[0]
    out: list[Finding] = []
    if len(text.encode()) > 512:
        out.append(
            Finding(
                a,
                "spf.too_long",
                WARN,
                f"the SPF record is {len(text)} octets",
                "over 512 octets the answer may need TCP; flatten or shorten it",
            )
        )
    terms = [t.lower() for t in _terms(text)]
    if "+all" in terms or "all" in terms:
        out.append(
            Finding(
                a,
                "spf.plus_all",
                ERROR,
                "the record ends in +all: any host passes",
                "end the record with -all (or ~all while testing)",
            )
        )
    elif "?all" in terms:
        out.append(
            Finding(
                a,
                "spf.neutral_all",
                WARN,
                "?all: unlisted hosts are neutral",
                "end the record with -all or ~all",
            )
        )
    if any(t.lstrip("+-~?").startswith("ptr") for t in terms):
        out.append(
            Finding(
                a,
                "spf.ptr",
                WARN,
                "the record uses ptr (RFC 7208 5.5: do not)",
                "replace ptr with ip4:/ip6: or a: terms",
            )
        )
    lookups, voids, over = count_lookups(domain, records)
    if lookups > LOOKUP_LIMIT:
        out.append(
            Finding(
                a,
                "spf.lookup_limit",
                ERROR,
                f"{lookups} DNS lookups (limit {LOOKUP_LIMIT}), via " + " -> ".join(over),
                "flatten includes into ip4:/ip6: terms or drop unused ones",
            )
        )
    if voids > VOID_LIMIT:
        out.append(
            Finding(
                a,
                "spf.void_limit",
                ERROR,
                f"{voids} void lookups (limit {VOID_LIMIT}), via " + " -> ".join(over),
                "remove include:/redirect= targets that publish nothing",
            )
        )
    if not out:
        out.append(Finding(a, "spf.ok", OK, f"SPF: {text} ({lookups} DNS lookup(s))"))
    return out
