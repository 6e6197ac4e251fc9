"""`relay check` end to end: real lab DNS, lab MTAs, relay.cli.main.

good.test publishes everything right; each bad*.test domain is built to fail one check
id. The probe runs against a lab MTA without STARTTLS (the lab MTA offers none)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.cli import main
from relay.commands.keygen import generate
from relay.lab.dnsserver import LabDnsServer, Zone

REJECT = "v=DMARC1; p=reject; rua=mailto:d@{d}"


def _domain(z: Zone, d: str, *, spf: str = "v=spf1 mx -all", dmarc: str | None = None) -> None:
    z.add(d, "MX", (10, f"mx.{d}"))
    z.add(f"mx.{d}", "A", "127.0.0.2")
    z.add(d, "TXT", spf)
    z.add(f"_dmarc.{d}", "TXT", (dmarc or REJECT).format(d=d))
    z.add(f"_smtp._tls.{d}", "TXT", f"v=TLSRPTv1; rua=mailto:tls@{d}")


@pytest.fixture(scope="module")
def lab() -> Iterator[LabDnsServer]:
    z = Zone()
    _domain(z, "good.test")
    z.add("s1._domainkey.good.test", "TXT", generate("rsa", 2048).record())
    _domain(z, "plusall.test", spf="v=spf1 +all")
    _domain(z, "many.test", spf="v=spf1 " + " ".join(f"include:i{n}.many.test" for n in range(6)))
    for n in range(6):
        z.add(f"i{n}.many.test", "TXT", "v=spf1 a mx -all")
    _domain(z, "void.test", spf="v=spf1 include:gone1.void.test a:gone2.void.test "
            "mx:gone3.void.test -all")  # fmt: skip  # RFC 7208 4.6.4: 3 void lookups
    _domain(z, "pct.test", dmarc="v=DMARC1; p=reject; pct=50; rua=mailto:d@pct.test")
    _domain(z, "ext.test", dmarc="v=DMARC1; p=reject; rua=mailto:d@reports.example")
    _domain(z, "extok.test", dmarc="v=DMARC1; p=reject; rua=mailto:d@reports2.example")
    z.add("extok.test._report._dmarc.reports2.example", "TXT", "v=DMARC1")
    _domain(z, "none.test", dmarc="v=DMARC1; p=none")
    z.add("nodmarc.test", "MX", (10, "mx.nodmarc.test"))
    z.add("mx.nodmarc.test", "A", "127.0.0.2")
    z.add("nodmarc.test", "TXT", "v=spf1 -all")
    _domain(z, "ipmx.test")
    z.set("ipmx.test", "MX", [(10, "192.0.2.1")])
    _domain(z, "weak.test")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    der = weak.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    z.add("s1._domainkey.weak.test", "TXT", "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())
    z.add("old._domainkey.weak.test", "TXT", "v=DKIM1; p=")
    _domain(z, "bimi.test", dmarc="v=DMARC1; p=none; rua=mailto:d@bimi.test")
    z.add("default._bimi.bimi.test", "TXT", "v=BIMI1; l=http://bimi.test/logo.svg")
    z.add("nomx.test", "A", "127.0.0.2")
    z.add("nullmx.test", "MX", (0, ""))
    z.add("nullmixed.test", "MX", (0, ""))
    z.add("nullmixed.test", "MX", (10, "mx.good.test"))
    _domain(z, "noaddr.test")
    z.remove("mx.noaddr.test")
    _domain(z, "manymx.test")
    for n in range(11):
        z.add("manymx.test", "MX", (20 + n, "mx.good.test"))
    _domain(z, "cnamemx.test")
    z.remove("mx.cnamemx.test")
    z.add("mx.cnamemx.test", "CNAME", "mx.good.test")
    _domain(z, "nospf.test")
    z.remove("nospf.test", "TXT")
    _domain(z, "twospf.test")
    z.add("twospf.test", "TXT", "v=spf1 -all")
    _domain(
        z, "longspf.test", spf="v=spf1 " + " ".join(f"ip4:192.0.2.{n}" for n in range(40)) + " -all"
    )
    _domain(z, "neutral.test", spf="v=spf1 mx ?all")
    _domain(z, "ptr.test", spf="v=spf1 ptr -all")
    _domain(z, "nop.test", dmarc="v=DMARC1; rua=mailto:d@nop.test")
    _domain(z, "testing.test", dmarc="v=DMARC1; p=reject; t=y; rua=mailto:d@testing.test")
    _domain(z, "spnone.test", dmarc="v=DMARC1; p=reject; sp=none; rua=mailto:d@spnone.test")
    _domain(z, "keys.test")
    z.add("two._domainkey.keys.test", "TXT", "v=DKIM1; p=AAAA")
    z.add("two._domainkey.keys.test", "TXT", "v=DKIM1; p=BBBB")
    z.add("bad._domainkey.keys.test", "TXT", "v=DKIM1; k=rsa; p=!!!")
    tiny = rsa.RSAPublicNumbers(65537, (1 << 511) | 12345).public_key()
    der = tiny.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    z.add("tiny._domainkey.keys.test", "TXT", "v=DKIM1; p=" + base64.b64encode(der).decode())
    z.add("test._domainkey.keys.test", "TXT", generate("rsa", 2048).record() + "; t=y")
    _domain(z, "notlsrpt.test")
    z.remove("_smtp._tls.notlsrpt.test")
    _domain(z, "twotlsrpt.test")
    z.add("_smtp._tls.twotlsrpt.test", "TXT", "v=TLSRPTv1; rua=mailto:b@twotlsrpt.test")
    _domain(z, "badtlsrpt.test")
    z.set("_smtp._tls.badtlsrpt.test", "TXT", ["v=TLSRPTv1; rua=ftp://x.test/r"])
    _domain(z, "ststxt.test")
    z.failures["_mta-sts.ststxt.test"] = "SERVFAIL"
    z.add("broken.test", "MX", (10, "mx.broken.test"))
    z.failures["_dmarc.broken.test"] = "SERVFAIL"
    with LabDnsServer(z) as server:
        yield server


@pytest.fixture
def cfg(tmp_path: Path, lab: LabDnsServer) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[dns]\nnameservers = ["{lab.address}"]\ntimeout = 1\ndnssec = "off"\n'
        "[delivery]\nport = 1\n[mta_sts]\nhttps_port = 1\nfetch_timeout = 1\n"
        "[http]\nallow_private_addresses = true\n"
    )
    return path


def _run(capsys: pytest.CaptureFixture[str], cfg: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["check", *argv, "--config", str(cfg), "--json", "--no-probe"])
    return code, json.loads(capsys.readouterr().out)


def _ids(out: dict[str, Any], severity: str) -> set[str]:
    return {c["id"] for c in out["checks"] if c["severity"] == severity}


def test_good_domain_has_no_errors(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    code, out = _run(capsys, cfg, "good.test", "--selector", "s1")
    assert code == 0, out
    assert _ids(out, "error") == set()
    assert {"mx.ok", "spf.ok", "dmarc.found", "dkim.ok", "tlsrpt.ok"} <= _ids(out, "ok")
    assert set(out) == {"domain", "checks", "summary"} and out["summary"]["error"] == 0
    assert all(set(c) == {"area", "id", "severity", "message", "advice"} for c in out["checks"])


@pytest.mark.parametrize(
    ("domain", "severity", "check_id", "selectors"),
    [
        ("plusall.test", "error", "spf.plus_all", ()),
        ("many.test", "error", "spf.lookup_limit", ()),
        ("void.test", "error", "spf.void_limit", ()),
        ("pct.test", "warn", "dmarc.removed_tags", ()),
        ("ext.test", "error", "dmarc.external_unauthorised", ()),
        ("none.test", "warn", "dmarc.none_no_reports", ()),
        ("nodmarc.test", "error", "dmarc.missing", ()),
        ("ipmx.test", "error", "mx.ip_literal", ()),
        ("weak.test", "warn", "dkim.rsa_weak", ("s1",)),
        ("weak.test", "warn", "dkim.revoked", ("old",)),
        ("weak.test", "error", "dkim.missing", ("nope",)),
        ("bimi.test", "error", "bimi.dmarc_not_enforced", ()),
        ("bimi.test", "error", "bimi.logo_not_https", ()),
        ("good.test", "warn", "mtasts.missing", ()),
        ("good.test", "ok", "bimi.missing", ()),
        ("good.test", "ok", "dmarc.np_advice", ()),
        ("nomx.test", "warn", "mx.none", ()),
        ("nullmx.test", "ok", "mx.null", ()),
        ("nullmixed.test", "error", "mx.null_mixed", ()),
        ("noaddr.test", "error", "mx.no_address", ()),
        ("manymx.test", "warn", "mx.many", ()),
        ("cnamemx.test", "warn", "mx.cname", ()),
        ("nospf.test", "error", "spf.missing", ()),
        ("twospf.test", "error", "spf.multiple", ()),
        ("longspf.test", "warn", "spf.too_long", ()),
        ("neutral.test", "warn", "spf.neutral_all", ()),
        ("ptr.test", "warn", "spf.ptr", ()),
        ("nop.test", "warn", "dmarc.no_p", ()),
        ("testing.test", "warn", "dmarc.testing", ()),
        ("spnone.test", "warn", "dmarc.sp_none", ()),
        ("keys.test", "error", "dkim.multiple", ("two",)),
        ("keys.test", "error", "dkim.syntax", ("bad",)),
        ("keys.test", "error", "dkim.rsa_broken", ("tiny",)),
        ("keys.test", "warn", "dkim.testing", ("test",)),
        ("notlsrpt.test", "warn", "tlsrpt.missing", ()),
        ("twotlsrpt.test", "error", "tlsrpt.multiple", ()),
        ("badtlsrpt.test", "error", "tlsrpt.syntax", ()),
        ("ststxt.test", "error", "mtasts.txt_error", ()),
        ("good.test", "warn", "dane.no_dnssec", ()),  # AD not trusted: dnssec = "off"
    ],
)
def test_each_bad_domain_fails_its_check(
    capsys: pytest.CaptureFixture[str],
    cfg: Path,
    domain: str,
    severity: str,
    check_id: str,
    selectors: tuple[str, ...],
) -> None:
    argv = [domain] + [x for s in selectors for x in ("--selector", s)]
    code, out = _run(capsys, cfg, *argv)
    assert check_id in _ids(out, severity), out
    assert code == (1 if _ids(out, "error") else 0)


def test_external_reports_authorised_pass(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    _code, out = _run(capsys, cfg, "extok.test")
    assert "dmarc.external_unauthorised" not in _ids(out, "error")


def test_many_lookups_names_the_path(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    _code, out = _run(capsys, cfg, "many.test")
    [c] = [c for c in out["checks"] if c["id"] == "spf.lookup_limit"]
    assert "18 DNS lookups" in c["message"] and "many.test -> i" in c["message"]


def test_bad_input_and_dns_down_exit_2(capsys: pytest.CaptureFixture[str], cfg: Path) -> None:
    for bad in ("192.0.2.1", "not a domain", "localhost"):
        assert main(["check", bad, "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "relay check:" in err
    assert main(["check", "broken.test", "--config", str(cfg), "--no-probe"]) == 2
    assert "could not check" in capsys.readouterr().err


def test_probe_finds_no_starttls(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, lab: LabDnsServer
) -> None:
    import asyncio

    from relay.lab.mta import LabMta

    async def go() -> tuple[int, str]:
        mta = await LabMta("127.0.0.2", 0).start()
        path = tmp_path / "p.toml"
        path.write_text(
            f'[dns]\nnameservers = ["{lab.address}"]\ntimeout = 1\n'
            f"[delivery]\nport = {mta.port}\n[mta_sts]\nhttps_port = 1\nfetch_timeout = 1\n"
        )
        try:
            code = await asyncio.to_thread(main, ["check", "good.test", "--config", str(path)])
        finally:
            await mta.stop()
        return code, capsys.readouterr().out

    code, text = asyncio.run(go())
    assert code == 1
    assert "[probe.no_starttls]" in text and "✘" in text and "\033[" not in text
