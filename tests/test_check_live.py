"""`relay check` against live lab parts: lab DNS, a real HTTPS policy host
(tests/mtasts/sts_https_server.py, trustme CA) fetched by relay.mtasts's own fetch, and
lab MTAs with and without STARTTLS, probed on ``[delivery] port``. One domain per
finding id, and sts.test that gives no error at all."""

from __future__ import annotations

import datetime
import json
import ssl
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.check.fetch import run_checks
from relay.commands.check import check
from relay.config import load_config
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.mtasts.sts_https_server import Answer, HttpsServer

POLICY = "version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: {age}\n"


class Live:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.zone = Zone()
        self.dns = LabDnsServer(self.zone).start()
        self.https = HttpsServer(self.ca, host="127.0.0.1")
        self.mtas: list[LabMta] = []
        self.port = 0
        self.config = tmp / "config.toml"

    async def start(self) -> None:
        await self.https.start()
        # 127.0.0.2: STARTTLS with a certificate for mx.sts.test (every *.test MX that
        # resolves there shares it); 127.0.0.3: no STARTTLS; 127.0.0.4: a wrong name
        await self.mta("127.0.0.2", "mx.sts.test")
        await self.mta("127.0.0.3", None)
        await self.mta("127.0.0.4", "someone-else.test")
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
        await self.mta("127.0.0.5", "mx.expiring.test", not_after=soon)
        # 127.0.0.6: STARTTLS that negotiates TLS 1.1 and nothing newer
        await self.mta("127.0.0.6", "mx.oldtls.test", only=ssl.TLSVersion.TLSv1_1)
        self.config.write_text(
            f'[dns]\nnameservers = ["{self.dns.address}"]\ntimeout = 1\ndnssec = "off"\n'
            f'[delivery]\nport = {self.port}\nca_file = "{self.ca_file}"\n'
            f"[mta_sts]\nhttps_port = {self.https.port}\nfetch_timeout = 3\n"
            "[http]\nallow_private_addresses = true\n"
        )

    async def mta(
        self,
        ip: str,
        cert_name: str | None,
        not_after: datetime.datetime | None = None,
        only: ssl.TLSVersion | None = None,
    ) -> None:
        ctx = None
        if cert_name is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert(cert_name, not_after=not_after).configure_cert(ctx)
        if ctx is not None and only is not None:
            with warnings.catch_warnings():  # TLSVersion.TLSv1_1 is deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ctx.maximum_version = only
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 needs it for TLS < 1.2
        m = await LabMta(ip, self.port, tls_context=ctx, hostname=cert_name or "plain.test").start()
        self.port = m.port
        self.mtas.append(m)

    def domain(self, d: str, mx_ip: str = "127.0.0.2", mx: str | None = None) -> None:
        host = mx or f"mx.{d}"
        z = self.zone
        z.add(d, "MX", (10, host))
        z.add(host, "A", mx_ip)
        z.add(d, "TXT", "v=spf1 mx -all")
        z.add(f"_dmarc.{d}", "TXT", f"v=DMARC1; p=reject; rua=mailto:d@{d}")
        z.add(f"_smtp._tls.{d}", "TXT", f"v=TLSRPTv1; rua=mailto:tls@{d}")

    def sts(self, d: str, policy: str | None, *, cert_name: str | None = None) -> None:
        self.zone.add(f"_mta-sts.{d}", "TXT", "v=STSv1; id=20261202")
        self.zone.add(f"mta-sts.{d}", "A", "127.0.0.1")
        host = f"mta-sts.{d}"
        if cert_name is not None:
            self.https.cert_for(host, None, cert_name)
        if policy is not None:
            self.https.route(host, "/.well-known/mta-sts.txt", Answer(200, policy.encode()))
        elif cert_name is None:
            self.https.cert_for(host)

    async def close(self) -> None:
        for m in self.mtas:
            await m.stop()
        await self.https.stop()
        self.dns.stop()


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    lab = Live(tmp_path)
    await lab.start()
    ok = POLICY.format(mode="enforce", mx="mx.sts.test", age=604800)
    lab.domain("sts.test")
    lab.sts("sts.test", ok)
    lab.domain("ststest.test", mx="mx.sts.test")
    lab.sts("ststest.test", POLICY.format(mode="testing", mx="mx.sts.test", age=604800))
    lab.domain("uncovered.test", mx="mx.sts.test")
    lab.sts("uncovered.test", POLICY.format(mode="enforce", mx="mx.other.test", age=604800))
    lab.domain("shortage.test", mx="mx.sts.test")
    lab.sts("shortage.test", POLICY.format(mode="enforce", mx="mx.sts.test", age=60))
    lab.domain("stsnone.test", mx="mx.sts.test")
    lab.sts("stsnone.test", POLICY.format(mode="none", mx="mx.sts.test", age=604800))
    lab.domain("nopolicy.test", mx="mx.sts.test")
    lab.sts("nopolicy.test", None)  # the host answers 404
    lab.domain("stscert.test", mx="mx.sts.test")
    lab.sts("stscert.test", ok, cert_name="wrong.test")
    lab.domain("plain.test", mx_ip="127.0.0.3")
    lab.domain("wrongname.test", mx_ip="127.0.0.4")
    lab.domain("down.test", mx_ip="127.0.0.9")  # nothing listens there
    lab.domain("expiring.test", mx_ip="127.0.0.5")
    lab.domain("oldtls.test", mx_ip="127.0.0.6")
    tiny = b'<svg xmlns="http://www.w3.org/2000/svg" version="1.2" baseProfile="tiny-ps">'
    logos = {
        "bimiok": tiny + b"<title>ok</title></svg>",
        "bimiscript": tiny + b"<script>alert(1)</script></svg>",
        "bimiplain": b'<svg xmlns="http://www.w3.org/2000/svg"><title>x</title></svg>',
        "bimibig": tiny + b"<desc>" + b"x" * 40000 + b"</desc></svg>",
    }
    for name in [*logos, "bimifetch"]:
        d = f"{name}.test"
        lab.domain(d, mx="mx.sts.test")
        url = f"https://logo.{d}:{lab.https.port}/logo.svg"
        vmc = "" if name == "bimiplain" else f"; a=https://logo.{d}/vmc.pem"
        lab.zone.add(f"default._bimi.{d}", "TXT", f"v=BIMI1; l={url}{vmc}")
        lab.zone.add(f"logo.{d}", "A", "127.0.0.1")
        if name in logos:
            lab.https.route(f"logo.{d}", "/logo.svg", Answer(200, logos[name], "image/svg+xml"))
        else:
            lab.https.cert_for(f"logo.{d}")
    yield lab
    await lab.close()


async def _run(live: Live, domain: str, probe: bool = True) -> list[Any]:
    findings = await check(load_config(live.config), domain, [], probe)
    return [(f.severity, f.id) for f in findings]


async def test_the_good_domain_passes_live(live: Live) -> None:
    got = await _run(live, "sts.test")
    assert [x for x in got if x[0] == "error"] == []
    assert ("ok", "mtasts.ok") in got and ("ok", "probe.ok") in got
    assert ("warn", "probe.no_requiretls") in got  # aiosmtpd does not offer REQUIRETLS


@pytest.mark.parametrize(
    ("domain", "severity", "check_id"),
    [
        ("ststest.test", "warn", "mtasts.testing"),
        ("uncovered.test", "error", "mtasts.mx_uncovered"),
        ("shortage.test", "warn", "mtasts.max_age"),
        ("stsnone.test", "warn", "mtasts.mode_none"),
        ("nopolicy.test", "error", "mtasts.fetch"),
        ("stscert.test", "error", "mtasts.certificate"),
        ("plain.test", "error", "probe.no_starttls"),
        ("wrongname.test", "error", "probe.certificate"),
        ("down.test", "error", "probe.connect"),
        ("expiring.test", "warn", "probe.cert_expiring"),
        ("oldtls.test", "error", "probe.old_tls"),
        ("bimiok.test", "ok", "bimi.ok"),
        ("bimiok.test", "ok", "bimi.svg_ok"),
        ("bimiscript.test", "error", "bimi.svg_script"),
        ("bimiplain.test", "error", "bimi.svg_not_tiny_ps"),
        ("bimiplain.test", "warn", "bimi.no_authority"),
        ("bimibig.test", "warn", "bimi.svg_too_large"),
        ("bimifetch.test", "error", "bimi.svg_fetch"),
    ],
)
async def test_live_findings(live: Live, domain: str, severity: str, check_id: str) -> None:
    assert (severity, check_id) in await _run(live, domain)


async def test_no_probe_connects_to_nothing(live: Live) -> None:
    before = sum(m.connections for m in live.mtas)
    got = await _run(live, "plain.test", probe=False)
    assert not any(i.startswith("probe.") for _s, i in got)
    assert sum(m.connections for m in live.mtas) == before


async def test_json_shape_from_run_checks(live: Live) -> None:
    from relay.commands.check import to_json
    from relay.dns import DnspythonResolver

    res = DnspythonResolver([live.dns.address], timeout=1)
    out = to_json("plain.test", await run_checks(res, "plain.test", probe=False))
    assert json.loads(json.dumps(out))["summary"]["error"] == 0
