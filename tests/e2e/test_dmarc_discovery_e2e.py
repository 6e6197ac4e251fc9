"""Issue 13 end to end: one relayed message whose DMARC verdict changes between
``[auth] dmarc_discovery = "psl"`` and ``"treewalk"``, as RFC 9989 says it should.

bank.test publishes ``psd=y`` (it is a public suffix domain: its customers register
under it). giant.bank.test publishes p=reject. A message From ceo@giant.bank.test comes
from a host that mega.bank.test (another customer) lists in its SPF, with MAIL FROM at
mega.bank.test. The Public Suffix List does not list bank.test, so RFC 7489 gives both
names the organizational domain bank.test and relaxed SPF alignment passes: the spoof
is relayed. RFC 9989 4.10.2 makes psd=y split them: giant.bank.test and mega.bank.test
are two organizational domains, SPF does not align, p=reject applies: 550 5.7.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import RelayApp
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.labutil import base_doc, message, send, write_config

SENDER_IP = "127.0.0.5"


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[tuple[LabDnsServer, LabMta]]:
    z = Zone()
    z.add("_dmarc.bank.test", "TXT", "v=DMARC1; p=reject; psd=y")
    z.add("_dmarc.giant.bank.test", "TXT", "v=DMARC1; p=reject")
    z.add("giant.bank.test", "A", "127.0.0.9")
    z.add("mega.bank.test", "TXT", f"v=spf1 ip4:{SENDER_IP} -all")
    z.add("dest.test", "MX", (10, "mx.dest.test"))
    z.add("mx.dest.test", "A", "127.0.0.2")
    dns = LabDnsServer(z).start()
    mx = await LabMta("127.0.0.2", 0).start()
    yield dns, mx
    await mx.stop()
    dns.stop()


async def _relay(tmp: Path, dns: LabDnsServer, mx: LabMta, discovery: str) -> RelayApp:
    work = tmp / discovery
    work.mkdir()
    doc = base_doc(work, dns.address, mx.port, aliases={"info@lists.lab.test": ["bob@dest.test"]})
    doc["auth"] = {"enabled": True, "crypto_workers": 0, "dmarc_discovery": discovery}
    app = RelayApp(write_config(work / "config.toml", doc), poll_interval=0.05)
    await app.start()
    return app


async def _spoof(app: RelayApp) -> None:
    host, port = app.bound[0]
    data = message(frm="ceo@giant.bank.test", to="info@lists.lab.test")
    rcpts = ["info@lists.lab.test"]
    await send(host, port, "bounce@mega.bank.test", rcpts, data, source=SENDER_IP)


async def test_psd_y_splits_org_domains_psl_relays_treewalk_refuses(
    tmp_path: Path, lab: tuple[LabDnsServer, LabMta]
) -> None:
    dns, mx = lab
    psl = await _relay(tmp_path, dns, mx, "psl")
    try:
        await _spoof(psl)  # RFC 7489 + PSL: relaxed SPF alignment via bank.test
        [got] = await mx.wait_for(1)
        assert b"dmarc=pass" in got.data and b"header.from=giant.bank.test" in got.data
    finally:
        await psl.stop(grace=2)
    walk = await _relay(tmp_path, dns, mx, "treewalk")
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await _spoof(walk)
        assert exc.value.code == 550 and "5.7.1" in exc.value.message
        assert len(mx.messages) == 1  # only the psl relay's copy
    finally:
        await walk.stop(grace=2)
