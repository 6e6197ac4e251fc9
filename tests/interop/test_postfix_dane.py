"""Postfix does DANE the way the relay does: Debian's Postfix (``smtp_tls_security_level
= dane``, ``smtp_dns_support_level = dnssec``) pointed at the same validating unbound
(on 127.0.0.53:53, through a private /etc/resolv.conf with ``options trust-ad`` in a
mount namespace) delivers or defers in each DANE lab cell as the relay does.

    aiosmtplib --> Postfix (127.0.0.64) --MX, TLSA via unbound--> lab MTAs (127.0.0.3x)

The comparison table is printed (pytest -s) and asserted cell by cell.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiosmtplib
import pytest

from relay.lab import dane
from relay.lab.postfix import PostfixSpec, available, free_port
from relay.lab.unbound import ValidatingResolver, missing
from tests.interop.postfix_lab import shared_tempdir, start_postfix, stop_postfix

pytestmark = [pytest.mark.postfix, pytest.mark.slow, pytest.mark.timeout(120)]

PF_IP = "127.0.0.64"
RESOLVER_IP = "127.0.0.53"
# REQUIRETLS is not in Postfix 3.7 (Debian 12): the DANE cells only
CELLS = [s for s in dane.DANE_SCENARIOS if not s.requiretls]


def _prerequisites() -> str:
    if not available():
        return "postfix"
    return missing()


async def _postfix_outcome(
    pf_log: Path, mtas: dict[str, object], name: str, domain: str, before: int, timeout: float
) -> str:
    """delivered | deferred, from the MTA's inbox and Postfix's log."""
    rcpt = f"x@{domain}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mta = mtas[name]
        if len(mta.messages) > before:  # type: ignore[attr-defined]
            return "delivered"
        log = pf_log.read_text(errors="replace")
        if re.search(rf"to=<{re.escape(rcpt)}>.*status=(deferred|bounced)", log):
            return "deferred"
        await asyncio.sleep(0.1)
    return "timeout"


async def test_postfix_dane_matches_the_relay_cell_by_cell() -> None:
    need = _prerequisites()
    assert not need, f"install {need} (.ci/run does)"
    tmp = shared_tempdir("dane-pf-")
    lab = await dane.build_lab(CELLS, tmp)
    resolv = tmp / "resolv.conf"
    resolv.write_text(f"nameserver {RESOLVER_IP}\noptions trust-ad\n")
    resolv.chmod(0o644)
    domains = [f"{s.name}.{dane.ZONE if s.zone == 'signed' else dane.INSECURE_ZONE}" for s in CELLS]
    port = free_port(PF_IP)
    pf = None
    rows: list[tuple[str, str, str, str]] = []
    try:
        with ValidatingResolver([lab.signed, lab.insecure], host=RESOLVER_IP, port=53) as unbound:
            # the relay's own verdict for each cell: the full relay, through the same unbound
            relay_cells = {c.scenario.name: c for c in await dane.play(CELLS, lab, unbound, tmp)}
            transports = ", ".join(f"{d}=smtp:{d}:{lab.port}" for d in domains)
            pf = await start_postfix(
                PostfixSpec(
                    listen=(PF_IP, port),
                    nexthop=("127.0.0.30", lab.port),  # replaced below: MX lookups
                    relay_domains=tuple(domains),
                    mynetworks=("127.0.0.0/8",),
                    smtp_tls_security_level="dane",
                    resolv_conf=resolv,
                    extra={
                        "smtp_dns_support_level": "dnssec",
                        "smtp_host_lookup": "dns",
                        "relayhost": "",
                        "transport_maps": f"inline:{{{transports}}}",
                        "smtp_tls_loglevel": "1",
                        "smtp_connect_timeout": "5s",
                        "maximal_queue_lifetime": "1h",
                    },
                ),
                name="danepf",
            )
            for s, domain in zip(CELLS, domains, strict=True):
                before = len(lab.mtas[s.name].messages)
                async with aiosmtplib.SMTP(hostname=PF_IP, port=port) as client:
                    head = f"From: lab@sender.lab.test\r\nTo: x@{domain}\r\n"
                    data = head + f"Subject: {s.name}\r\n\r\nx\r\n"
                    await client.sendmail("lab@sender.lab.test", [f"x@{domain}"], data)
                got = await _postfix_outcome(
                    pf.maillog,
                    lab.mtas,
                    s.name,
                    domain,
                    before,
                    timeout=20,  # type: ignore[arg-type]
                )
                relay = "delivered" if relay_cells[s.name].delivered else "deferred"
                rows.append((s.name, relay, got, s.rfc))
    finally:
        if pf is not None:
            log = pf.log_text()
            await stop_postfix(pf)
        else:
            log = ""
        await lab.stop()
    w = max(len(r[0]) for r in rows) + 2
    print(f"\n{'cell':<{w}} {'relay':<10} {'postfix':<10} RFC")
    for name, relay, got, rfc in rows:
        print(f"{name:<{w}} {relay:<10} {got:<10} {rfc}")
    assert all(r[1] == r[2] for r in rows), (rows, log[-4000:])
    # Postfix really authenticated by DANE (not merely delivered)
    assert "Verified TLS connection established to mx.dane-ee-match" in log, log[-4000:]
    assert "Verified TLS connection established to mx.dane-ta-match" in log, log[-4000:]
