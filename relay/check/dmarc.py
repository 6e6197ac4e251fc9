"""DMARC checks (RFC 9989): the record the tree walk finds, its tags, reporting, and the
RFC 9990 authorisation of external report destinations."""

from __future__ import annotations

from collections.abc import Mapping

from relay.auth.dmarc_record import DmarcRecord
from relay.check import ERROR, OK, WARN, Finding


def _mail_domain(uri: str) -> str:
    return uri.partition("@")[2].lower().rstrip(".") if uri.lower().startswith("mailto:") else ""


def external_destinations(domain: str, org: str, record: DmarcRecord) -> list[str]:
    """Report domains outside the organisational domain: each needs
    ``<domain>._report._dmarc.<destination>`` (RFC 9990)."""
    out: list[str] = []
    for u in (*record.rua, *record.ruf):
        dest = _mail_domain(u.uri)
        if dest and dest != org and not dest.endswith("." + org) and dest not in out:
            out.append(dest)
    return out


def check_dmarc(
    domain: str,
    record: DmarcRecord | None,
    policy_domain: str,
    org: str,
    walk: tuple[str, ...],
    error: str,
    authorised: Mapping[str, bool],
) -> list[Finding]:
    a = "DMARC"
    if record is None:
        return [
            Finding(
                a,
                "dmarc.missing",
                ERROR,
                error or f"no DMARC record for {domain}",
                f'publish at _dmarc.{org or domain}: "v=DMARC1; p=none; '
                f'rua=mailto:dmarc@{org or domain}" and move to p=reject',
            )
        ]
    out: list[Finding] = []
    where = f"_dmarc.{policy_domain}"
    out.append(
        Finding(
            a,
            "dmarc.found",
            OK,
            f"policy p={record.p} at {where}, organizational "
            f"domain {org} (tree walk: {len(walk)} queries)",
        )
    )
    if record.p_implied:
        out.append(
            Finding(
                a,
                "dmarc.no_p",
                WARN,
                "the record has no valid p= (or an invalid sp=/np=): read as p=none"
                if record.applies
                else "the record has no valid p= (or an invalid sp=/np=) and no valid rua=: "
                "receivers apply no DMARC at all",
                "add p=none, p=quarantine or p=reject",
            )
        )
    if record.removed:
        out.append(
            Finding(
                a,
                "dmarc.removed_tags",
                WARN,
                "tags RFC 9989 removed: " + ", ".join(record.removed),
                "delete them; use t=y instead of pct= while testing",
            )
        )
    if record.p == "none" and not record.rua:
        out.append(
            Finding(
                a,
                "dmarc.none_no_reports",
                WARN,
                "p=none and no rua=: the policy does nothing and nobody learns anything",
                f"add rua=mailto:dmarc@{org} to receive aggregate reports",
            )
        )
    if record.t:
        out.append(
            Finding(
                a,
                "dmarc.testing",
                WARN,
                "t=y: receivers apply the policy one step lower",
                "remove t=y once legitimate mail passes",
            )
        )
    if record.p != "none" and record.sp == "none" and policy_domain == domain:
        out.append(
            Finding(
                a,
                "dmarc.sp_none",
                WARN,
                f"sp=none: subdomains of {domain} are not protected",
                "drop sp= (it defaults to p=) or set it",
            )
        )
    if record.p != "none" and not record.np and policy_domain == domain:
        out.append(
            Finding(
                a,
                "dmarc.np_advice",
                OK,
                "no np=: non-existent subdomains get sp=",
                "np=reject protects names you never use",
            )
        )
    for dest in external_destinations(domain, org, record):
        if not authorised.get(dest, False):
            out.append(
                Finding(
                    a,
                    "dmarc.external_unauthorised",
                    ERROR,
                    f"reports go to {dest}, which does not authorise them",
                    f'{dest} must publish "v=DMARC1" at {org}._report._dmarc.{dest} (RFC 9990)',
                )
            )
    return out
