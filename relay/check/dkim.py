"""DKIM key record checks, per selector: syntax, key type and size, t=y, revoked."""

from __future__ import annotations

from relay.auth.keys import KeyRecordError, parse_key_record
from relay.check import ERROR, OK, WARN, Finding


def check_dkim(domain: str, selector: str, records: list[str] | None) -> list[Finding]:
    a = "DKIM"
    name = f"{selector}._domainkey.{domain}"
    if not records:
        return [
            Finding(
                a,
                "dkim.missing",
                ERROR,
                f"no key at {name}",
                f"publish the selector's public key at {name}",
            )
        ]
    if len(records) > 1:
        return [
            Finding(
                a,
                "dkim.multiple",
                ERROR,
                f"{len(records)} TXT records at {name}",
                "publish exactly one key record per selector",
            )
        ]
    try:
        key = parse_key_record(records[0])
    except KeyRecordError as exc:
        if "revoked" in str(exc):
            return [
                Finding(
                    a,
                    "dkim.revoked",
                    WARN,
                    f"{name}: key revoked (empty p=)",
                    "fine if retired; sign with another selector",
                )
            ]
        return [Finding(a, "dkim.syntax", ERROR, f"{name}: {exc}", "fix the key record")]
    out: list[Finding] = []
    if key.key_type == "rsa" and key.bits < 1024:
        out.append(
            Finding(
                a,
                "dkim.rsa_broken",
                ERROR,
                f"{name}: RSA {key.bits} bits",
                "receivers ignore RSA keys under 1024 bits; publish 2048",
            )
        )
    elif key.key_type == "rsa" and key.bits < 2048:
        out.append(
            Finding(
                a, "dkim.rsa_weak", WARN, f"{name}: RSA {key.bits} bits", "rotate to a 2048-bit key"
            )
        )
    if key.testing:
        out.append(
            Finding(
                a,
                "dkim.testing",
                WARN,
                f"{name}: t=y (testing)",
                "remove t=y: some receivers treat test keys as unsigned",
            )
        )
    if not out:
        out.append(Finding(a, "dkim.ok", OK, f"{name}: {key.key_type} {key.bits} bits"))
    return out
