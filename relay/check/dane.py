"""DANE checks (RFC 7672) from relay.dane's own lookups (the code delivery uses): the
DNSSEC status of the MX RRset, each MX host's addresses and its TLSA RRset, and the
usability of the records. The certificate match is checked by the probe."""

from __future__ import annotations

from collections.abc import Mapping

from relay.check import ERROR, OK, WARN, Finding
from relay.dane.lookup import DaneHost
from relay.dane.policy import DaneState, Lookup


def check_dane(domain: str, mx: Lookup, hosts: Mapping[str, DaneHost]) -> list[Finding]:
    a = "DANE"
    if mx is Lookup.BOGUS:
        return [
            Finding(
                a,
                "dane.bogus",
                ERROR,
                f"the MX RRset of {domain} fails DNSSEC validation (bogus)",
                "fix the zone's DNSSEC signatures or DS record",
            )
        ]
    if mx is Lookup.FAILED:
        # run_checks stops with "could not check" when its own MX query fails; this is
        # the DNSSEC MX query failing after that one answered
        return [
            Finding(
                a,
                "dane.dns_failed",
                ERROR,
                f"the MX lookup of {domain} failed",
                "the domain's name servers must answer every query",
            )
        ]
    if mx is not Lookup.SECURE:
        return [
            Finding(
                a,
                "dane.no_dnssec",
                WARN,
                f"the MX RRset of {domain} is not "
                "DNSSEC-signed (or the resolver does not validate): DANE cannot "
                "apply",
                "sign the zone, then publish TLSA records for each MX",
            )
        ]
    out: list[Finding] = []
    for host, d in sorted(hosts.items()):
        if d.state is DaneState.DANE:
            out.append(
                Finding(
                    a,
                    "dane.ok",
                    OK,
                    f"{host}: {len(d.policy.records)} usable TLSA record(s) at {d.tlsa_name}",
                )
            )
        elif d.state is DaneState.ENCRYPT:
            out.append(
                Finding(
                    a,
                    "dane.unusable_tlsa",
                    ERROR,
                    f"{host}: only unusable TLSA records at {d.tlsa_name}",
                    "publish 3 1 1 (DANE-EE) or 2 1 1 (DANE-TA) records (RFC 7672 3.1)",
                )
            )
        elif d.state is DaneState.DEFER and d.tlsa_lookup is Lookup.FAILED:
            # RFC 7672 section 2.2: a TLSA lookup that fails (SERVFAIL, timeout) is not
            # "no TLSA": DANE senders skip the host until it answers
            out.append(
                Finding(
                    a,
                    "dane.dns_failed",
                    ERROR,
                    f"{host}: the TLSA lookup of {d.tlsa_name} failed ({d.policy.reason})",
                    "the zone's name servers must answer TLSA queries (NODATA if there "
                    "are none): senders using DANE defer mail to this host until they do",
                )
            )
        elif d.state is DaneState.DEFER:
            out.append(
                Finding(
                    a,
                    "dane.tlsa_failed",
                    ERROR,
                    f"{host}: {d.policy.reason}",
                    "senders using DANE will not deliver to this host",
                )
            )
        elif d.address_status != "secure":
            out.append(
                Finding(
                    a,
                    "dane.address_insecure",
                    WARN,
                    f"{host}: addresses not DNSSEC-secure",
                    "sign the zone of the MX host",
                )
            )
        else:
            out.append(
                Finding(
                    a,
                    "dane.no_tlsa",
                    WARN,
                    f"{host}: no TLSA records at _25._tcp.{host}",
                    "publish TLSA 3 1 1 for the certificate",
                )
            )
    return out
