"""MTA-STS checks (RFC 8461): the TXT record, the policy (fetched by the same code
delivery uses), its mode, max_age, and whether every MX is covered."""

from __future__ import annotations

from relay.check import ERROR, OK, WARN, Finding
from relay.model import StsMode
from relay.mtasts.policy import StsPolicy, patterns_allow

MIN_MAX_AGE = 86400
MAX_MAX_AGE = 31557600


def check_mtasts(
    domain: str,
    txt_status: str,
    txt_reason: str,
    policy: StsPolicy | None,
    fetch_error: str,
    mx_hosts: list[str],
    fetch_cert: bool = False,
) -> list[Finding]:
    """fetch_cert: the fetch failed on the policy host's certificate (sts-webpki-invalid)."""
    a = "MTA-STS"
    if txt_status == "none":
        return [
            Finding(
                a,
                "mtasts.missing",
                WARN,
                f"no MTA-STS record: {txt_reason}",
                "publish _mta-sts TXT and a policy at https://mta-sts." + domain,
            )
        ]
    if txt_status == "error":
        return [Finding(a, "mtasts.txt_error", ERROR, txt_reason, "fix the _mta-sts record")]
    if policy is None and fetch_cert:
        return [
            Finding(
                a,
                "mtasts.certificate",
                ERROR,
                f"policy host certificate: {fetch_error}",
                f"serve https://mta-sts.{domain} with a certificate valid for that name "
                "from a public CA (RFC 8461 3.3)",
            )
        ]
    if policy is None:
        return [
            Finding(
                a,
                "mtasts.fetch",
                ERROR,
                f"policy fetch failed: {fetch_error}",
                "serve the policy as text/plain over HTTPS with a valid certificate",
            )
        ]
    out: list[Finding] = []
    if policy.mode is StsMode.TESTING:
        out.append(
            Finding(
                a,
                "mtasts.testing",
                WARN,
                "mode: testing",
                "move to mode: enforce once TLS-RPT reports are clean",
            )
        )
    elif policy.mode is StsMode.NONE:
        out.append(Finding(a, "mtasts.mode_none", WARN, "mode: none (policy withdrawn)", ""))
    if not MIN_MAX_AGE <= policy.max_age <= MAX_MAX_AGE:
        out.append(
            Finding(
                a,
                "mtasts.max_age",
                WARN,
                f"max_age {policy.max_age}",
                "use at least 86400 (a week or more is usual), at most 31557600",
            )
        )
    for host in mx_hosts:
        if not patterns_allow(policy.mx, host):
            out.append(
                Finding(
                    a,
                    "mtasts.mx_uncovered",
                    ERROR,
                    f"MX {host} is not in the policy's mx: lines",
                    f"add mx: {host} to the policy",
                )
            )
    if not out:
        out.append(Finding(a, "mtasts.ok", OK, f"mode {policy.mode}, every MX covered"))
    return out
