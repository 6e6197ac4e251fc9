"""MX checks: null MX (RFC 7505), MX hosts that are IP literals or CNAMEs, hosts without
addresses, an unusual number of MX records."""

from __future__ import annotations

import ipaddress

from relay.check import ERROR, OK, WARN, Finding

MAX_USUAL_MX = 10


def check_mx(
    domain: str,
    mx: list[tuple[int, str]],
    addresses: dict[str, list[str]],
    cnames: set[str],
) -> list[Finding]:
    """mx: (preference, host) as published; addresses: host -> A/AAAA found; cnames: the
    hosts that are aliases (RFC 5321 5.1 / RFC 2181 10.3 say an MX must not be one)."""
    a = "MX"
    if not mx:
        return [
            Finding(
                a,
                "mx.none",
                WARN,
                f"{domain} publishes no MX: mail goes to its A record (implicit MX)",
                "publish an MX record naming your mail host",
            )
        ]
    if any(h in ("", ".") for _p, h in mx):
        if len(mx) == 1:
            return [
                Finding(
                    a,
                    "mx.null",
                    OK,
                    f"{domain} publishes a null MX (RFC 7505): it accepts no mail",
                    "",
                )
            ]
        return [
            Finding(
                a,
                "mx.null_mixed",
                ERROR,
                "a null MX beside other MX records",
                "RFC 7505: the null MX must be the only MX record",
            )
        ]
    out: list[Finding] = []
    for _pref, host in mx:
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            out.append(
                Finding(
                    a,
                    "mx.ip_literal",
                    ERROR,
                    f"MX {host} is an IP address",
                    "an MX names a host; publish an A record and name it",
                )
            )
            continue
        if host in cnames:
            out.append(
                Finding(
                    a,
                    "mx.cname",
                    WARN,
                    f"MX {host} is a CNAME",
                    "name the canonical host in the MX (RFC 2181 10.3)",
                )
            )
        if not addresses.get(host):
            out.append(
                Finding(
                    a,
                    "mx.no_address",
                    ERROR,
                    f"MX {host} has no A/AAAA record",
                    f"publish an address for {host} or remove the MX",
                )
            )
    if len(mx) > MAX_USUAL_MX:
        out.append(
            Finding(
                a,
                "mx.many",
                WARN,
                f"{len(mx)} MX records",
                f"more than {MAX_USUAL_MX} is unusual; senders try only some",
            )
        )
    if not out:
        hosts = ", ".join(h for _p, h in sorted(mx))
        out.append(Finding(a, "mx.ok", OK, f"MX: {hosts}"))
    return out
