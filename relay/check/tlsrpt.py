"""TLS-RPT record checks (RFC 8460 3): ``_smtp._tls`` syntax and rua schemes."""

from __future__ import annotations

from relay.check import ERROR, OK, WARN, Finding
from relay.tlsrpt.discovery import RecordError, parse_record


def check_tlsrpt(domain: str, records: list[str] | None) -> list[Finding]:
    a = "TLS-RPT"
    name = f"_smtp._tls.{domain}"
    txts = [t for t in records or [] if t.strip().lower().startswith("v=tlsrptv1")]
    if not txts:
        return [
            Finding(
                a,
                "tlsrpt.missing",
                WARN,
                f"no TLS-RPT record at {name}",
                f'publish "v=TLSRPTv1; rua=mailto:tlsrpt@{domain}" to hear of failures',
            )
        ]
    if len(txts) > 1:
        return [
            Finding(
                a,
                "tlsrpt.multiple",
                ERROR,
                f"{len(txts)} TLS-RPT records",
                "RFC 8460 3: keep exactly one",
            )
        ]
    try:
        rec = parse_record(txts[0], domain)
    except RecordError as exc:
        return [
            Finding(
                a,
                "tlsrpt.syntax",
                ERROR,
                f"{name}: {exc}",
                "rua= takes mailto: or https: URIs, comma separated",
            )
        ]
    return [Finding(a, "tlsrpt.ok", OK, f"{name}: {len(rec.rua)} report destination(s)")]
