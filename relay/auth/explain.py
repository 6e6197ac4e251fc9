"""Plain-words explanations of an authentication verdict, for people (`relay diagnose`).

Given the checks' results and how DMARC came out (relay.auth.dmarc.DmarcEvaluation), it
says per check what happened and why (which identifier aligned or not, and under which
mode; a missing or misaligned DKIM signature; a body changed after signing; SPF broken
by forwarding; an unlisted sending source; an ARC chain that would rescue the message),
and what the domain owner or the relay operator can do. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.auth.dmarc import DmarcEvaluation
from relay.auth.types import (
    ArcCv,
    ArcResult,
    AuthResults,
    DkimResult,
    DmarcResultCode,
    SpfResult,
    SpfResultCode,
)

_MODE = {"r": "relaxed", "s": "strict"}


@dataclass(frozen=True, slots=True)
class Facts:
    """What the explanation needs besides the results."""

    client_ip: str = ""
    trusted_sealers: tuple[str, ...] = ()
    spf_evaluated: bool = True  # False when no client IP was known


def _mode(m: str) -> str:
    return _MODE.get(m, m)


def _from_signed(results: AuthResults, ev: DmarcEvaluation | None) -> bool:
    """The author's domain (aligned) signed the message: it left its origin properly."""
    if ev is None:
        return False
    return any(a.method == "dkim" and a.aligned for a in ev.alignments)


def _forwarded(results: AuthResults, ev: DmarcEvaluation | None) -> bool:
    arc = results.arc
    return (arc is not None and arc.instances > 0) or _from_signed(results, ev)


def spf_line(spf: SpfResult | None, facts: Facts) -> str:
    if spf is None or not facts.spf_evaluated:
        return "SPF: not evaluated (no client IP given; use --client-ip)"
    who = f"{spf.domain} ({spf.identity})"
    ip = facts.client_ip or "the client"
    text = {
        SpfResultCode.PASS: f"{ip} is a permitted sender of {spf.domain}",
        SpfResultCode.FAIL: f"{spf.domain} says {ip} is not a permitted sender",
        SpfResultCode.SOFTFAIL: f"{spf.domain} says {ip} is probably not a permitted sender",
        SpfResultCode.NEUTRAL: f"{spf.domain} makes no assertion about {ip}",
        SpfResultCode.NONE: f"{spf.domain} publishes no SPF record",
        SpfResultCode.TEMPERROR: f"a DNS problem prevented checking {spf.domain}",
        SpfResultCode.PERMERROR: f"the SPF record of {spf.domain} is broken",
    }[spf.result]
    extra = (
        f" ({spf.explanation})" if spf.explanation and spf.result is not SpfResultCode.PASS else ""
    )
    return f"SPF {spf.result} for {who}: {text}{extra}"


def dkim_line(sig: DkimResult) -> str:
    where = f"d={sig.domain} s={sig.selector}" if sig.domain else "a signature"
    if sig.result == "pass":
        return f"DKIM pass, {where}: the signature verifies"
    why = sig.reason or "no reason given"
    if sig.reason == "body hash mismatch":
        why = "body hash mismatch: the body was changed after it was signed"
    return f"DKIM {sig.result}, {where}: {why}"


def dmarc_lines(ev: DmarcEvaluation | None) -> list[str]:
    if ev is None:
        return ["DMARC: not evaluated"]
    d = ev.result
    lines: list[str] = []
    if ev.record is None:
        lines.append(f"DMARC {d.result}: {d.reason or 'no policy'}")
        lines.extend(discovery_lines(ev))
        return lines
    where = f"_dmarc.{ev.record_domain}"
    if ev.record_domain != ev.author_domain:
        tag = "np=" if not ev.author_exists and ev.record.np else "sp="
        why = (
            f"{ev.author_domain} does not exist, so np= applies"
            if tag == "np="
            else "so sp= applies"
        )
        where += f" (an ancestor of {ev.author_domain}, {why})"
    testing = (
        f"; t=y (testing), so {d.policy}" if ev.testing and d.policy != d.record_policy else ""
    )
    lines.append(
        f"DMARC {d.result} for From domain {d.header_from}: policy {d.record_policy} "
        f"from {where}{testing}"
    )
    lines.extend(discovery_lines(ev))
    if len(ev.author_domains) > 1:
        lines.append(
            "  the From field names several domains (" + ", ".join(ev.author_domains) + "); "
            f"the strictest failing one, {ev.author_domain}, is reported"
        )
    for a in ev.alignments:
        mode = _mode(a.mode)
        rel = "aligns" if a.aligned else "does not align"
        how = (
            "same name"
            if a.domain == ev.author_domain
            else ("same organizational domain" if a.aligned else "different domains")
        )
        if not a.aligned and a.mode == "s" and _same_org(a, ev):
            how = "strict mode needs the exact From domain"
        ok = "passed" if a.result == "pass" else f"did not pass ({a.result})"
        name = "SPF" if a.method == "spf" else f"DKIM d={a.domain} s={a.selector}"
        ident = f" {a.domain}" if a.method == "spf" else ""
        joint = "and" if a.aligned == (a.result == "pass") else "but"
        lines.append(f"  {name}{ident} {rel} with {d.header_from} ({mode}: {how}) {joint} {ok}")
    if not any(a.method == "dkim" for a in ev.alignments):
        lines.append("  no DKIM signature to align")
    if not any(a.method == "spf" for a in ev.alignments):
        lines.append("  no SPF result to align")
    return lines


def discovery_lines(ev: DmarcEvaluation) -> list[str]:
    """How the policy and the organizational domain were found (RFC 9989 4.10), and the
    record's tags RFC 9989 ignores."""
    out: list[str] = []
    how = (
        "DNS tree walk (RFC 9989)"
        if ev.discovery == "treewalk"
        else "Public Suffix List (RFC 7489, [auth] dmarc_discovery = psl)"
    )
    if ev.walk:
        out.append(f"  discovery by {how}: asked " + ", ".join(ev.walk))
    if ev.org_domain:
        out.append(f"  organizational domain of {ev.author_domain}: {ev.org_domain}")
    if ev.record is not None and ev.record.removed:
        out.append(
            "  ignored: " + ", ".join(ev.record.removed) + " (RFC 9989 removed pct, rf and ri)"
        )
    return out


def _same_org(a: object, ev: DmarcEvaluation) -> bool:
    from relay.auth.psl import org_domain

    domain = getattr(a, "domain", "")
    org = getattr(a, "org_domain", "")
    if ev.discovery == "treewalk" and org and ev.org_domain:
        return bool(org == ev.org_domain)
    return org_domain(domain) == org_domain(ev.author_domain)


def arc_line(arc: ArcResult | None, facts: Facts) -> str:
    if arc is None:
        return "ARC: not evaluated"
    if arc.cv is ArcCv.NONE:
        return "ARC none: the message carries no ARC chain"
    sealers = ", ".join(arc.sealers) or "unknown"
    if arc.cv is ArcCv.FAIL:
        return f"ARC fail ({arc.instances} set(s), sealers {sealers}): {arc.reason}"
    trusted = [s for s in arc.sealers if s.lower() in _lower(facts.trusted_sealers)]
    note = f"trusted: {', '.join(trusted)}" if trusted else "no sealer is in [arc] trusted_sealers"
    dm = f"; the oldest AAR says dmarc={arc.first_aar_dmarc}" if arc.first_aar_dmarc else ""
    return f"ARC pass: {arc.instances} set(s) sealed by {sealers} ({note}){dm}"


def _lower(items: tuple[str, ...]) -> set[str]:
    return {i.strip().lower().rstrip(".") for i in items}


def advice(results: AuthResults, ev: DmarcEvaluation | None, facts: Facts) -> list[str]:
    """What the domain owner (or the relay's operator) can do, most useful first."""
    out: list[str] = []
    spf, dkim, arc = results.spf, results.dkim, results.arc
    d = ev.result if ev is not None else None
    from_dom = d.header_from if d is not None and d.header_from else "the From domain"
    if d is not None and d.result is DmarcResultCode.PERMERROR and not d.header_from:
        out.append(f"Fix the From header field: {d.reason}.")
    if d is not None and d.result is DmarcResultCode.TEMPERROR:
        out.append(f"DMARC could not be decided now: {d.reason}. A later retry may differ.")
    if d is not None and d.result is DmarcResultCode.NONE and d.header_from:
        out.append(
            f"{from_dom} publishes no DMARC policy: publish a TXT record at "
            f'_dmarc.{d.org_domain or from_dom} such as "v=DMARC1; p=none; '
            f'rua=mailto:dmarc-reports@{d.org_domain or from_dom}" to start monitoring.'
        )
    if spf is not None and facts.spf_evaluated:
        forwarded = _forwarded(results, ev)
        if spf.result in (SpfResultCode.FAIL, SpfResultCode.SOFTFAIL):
            if forwarded:
                out.append(
                    f"SPF {spf.result} for {spf.domain} looks like forwarding: the message "
                    f"reached us from {facts.client_ip or 'a host'} that {spf.domain} does not "
                    "list. Forwarding breaks SPF; the forwarder should rewrite the envelope "
                    f"sender (SRS), and {from_dom} should rely on DKIM, which survives "
                    "forwarding."
                )
            else:
                out.append(
                    f"The sending source {facts.client_ip or '(unknown)'} is not listed in the "
                    f"SPF record of {spf.domain}. If it legitimately sends for {spf.domain} "
                    "(a mailing service, a new server), add it to the record "
                    f"(ip4:/ip6:{facts.client_ip or 'ADDR'} or the service's include:)."
                )
        elif spf.result is SpfResultCode.NONE:
            out.append(
                f"{spf.domain} publishes no SPF record: publish one listing the hosts that "
                'send its mail ("v=spf1 ... -all").'
            )
        elif spf.result is SpfResultCode.PERMERROR:
            out.append(f"Repair the SPF record of {spf.domain}: {spf.explanation}.")
        elif spf.result is SpfResultCode.TEMPERROR:
            out.append(
                f"DNS for {spf.domain} failed temporarily; retry later or check its servers."
            )
    if ev is not None and ev.record is not None and d is not None:
        spf_al = [a for a in ev.alignments if a.method == "spf"]
        if spf_al and spf_al[0].result == "pass" and not spf_al[0].aligned:
            out.append(
                f"SPF passed for {spf_al[0].domain}, which does not align with {from_dom} "
                f"({_mode(spf_al[0].mode)}): use an envelope sender (bounce address) in "
                f"{from_dom}'s domain, or rely on a DKIM signature with d={from_dom}."
            )
        dk = [a for a in ev.alignments if a.method == "dkim"]
        if not dkim:
            out.append(
                f"The message has no DKIM signature: have every service that sends for "
                f"{from_dom} sign with d={from_dom}"
                + (" (or a subdomain: adkim is relaxed)." if ev.record.adkim == "r" else ".")
            )
        elif not any(a.aligned for a in dk):
            names = ", ".join(sorted({a.domain for a in dk}))
            out.append(
                f"DKIM signatures are by {names}, not aligned with {from_dom} "
                f"({_mode(ev.record.adkim)}): sign with d={from_dom}"
                + (" or a subdomain of it." if ev.record.adkim == "r" else " exactly (adkim=s).")
            )
    for sig in dkim:
        if sig.reason == "body hash mismatch":
            out.append(
                f"The body changed after {sig.domain} signed it (body hash mismatch): a "
                "mailing list or forwarder added a footer or re-encoded it. The list should "
                "leave the body alone or seal with ARC; the receiver can trust that ARC seal."
            )
        elif sig.result == "fail":
            out.append(
                f"The signature by {sig.domain} no longer verifies: a signed header was "
                "changed on the way, or the published key does not match the signing key."
            )
        elif sig.result == "permerror" and "key" in sig.reason:
            out.append(
                f"Publish the DKIM key of {sig.domain} at {sig.selector}._domainkey."
                f"{sig.domain} ({sig.reason})."
            )
    if d is not None and d.result is DmarcResultCode.FAIL:
        if results.dmarc_override:
            out.append(
                f"DMARC failed here, but the ARC chain sealed by {results.dmarc_override} "
                "(a trusted sealer) says DMARC passed when it received the message: the "
                "relay accepts it."
            )
        elif arc is not None and arc.cv is ArcCv.PASS:
            sealer = arc.sealers[-1] if arc.sealers else "the last sealer"
            if arc.first_aar_dmarc == "pass":
                out.append(
                    f"An ARC chain sealed by {', '.join(arc.sealers)} validates and says DMARC "
                    f"passed at its first hop: if {sealer} is a forwarder you trust, add it to "
                    "[arc] trusted_sealers and such mail will be accepted."
                )
        if d.policy == "none":
            out.append(
                f"{from_dom}'s policy is none, so failing mail is still delivered; once "
                "legitimate sources pass, the owner can move to p=quarantine, then p=reject."
            )
    if ev is not None and ev.testing and d is not None and d.result is DmarcResultCode.FAIL:
        out.append(
            f"{from_dom}'s record says t=y (testing): the policy {d.record_policy} was applied "
            f"one step lower ({d.policy}); remove t=y once legitimate mail passes."
        )
    if ev is not None and ev.record is not None and ev.record.removed:
        out.append(
            f"Remove {', '.join(ev.record.removed)} from the DMARC record: RFC 9989 dropped "
            "these tags and receivers ignore them (use t=y instead of pct=)."
        )
    if not out and d is not None and d.result is DmarcResultCode.PASS:
        out.append(f"Nothing to do: the message passes DMARC for {from_dom}.")
    return out
