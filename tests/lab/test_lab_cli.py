"""``relay lab`` from the shell: list, run (text, --json, --out), and the attacker pieces
run alone (``strip``, ``policy-host``) as real subprocesses stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import signal
import ssl
import sys
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relay.dns import StaticResolver
from relay.http import SafeHttpClient
from relay.lab.mta import LabMta
from relay.lab.scenarios import SCENARIOS
from relay.model import StsMode
from relay.mtasts.fetch import PolicyFetchError, fetch_policy
from relay.tlsrpt.report import parse_report, validate_report

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


async def relay_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Running:
    """A long-running ``relay lab ...`` subprocess; ``where`` is its first stdout line."""

    def __init__(self, proc: asyncio.subprocess.Process, where: str) -> None:
        self.proc = proc
        self.where = where

    @classmethod
    async def start(cls, *args: str) -> Running:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", *args, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if not line:
            err = await proc.stderr.read() if proc.stderr else b""
            await proc.wait()
            pytest.fail(f"relay {' '.join(args)} exited: {err.decode()}")
        return cls(proc, line.decode().strip())

    def port(self) -> int:
        m = re.search(r"127\.0\.0\.\d+:(\d+)", self.where)
        assert m, self.where
        return int(m.group(1))

    async def terminate(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(self.proc.communicate(), 10)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode()


async def test_list_describes_every_scenario_in_a_sentence() -> None:
    rc, out, _ = await relay_cli("lab", "list")
    assert rc == 0
    lines = out.strip().splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == [s.name for s in SCENARIOS]
    for ln in lines:
        assert "RFC 8461:" in ln and "Without MTA-STS:" in ln
    rc, out, _ = await relay_cli("lab", "list", "--json")
    data = json.loads(out)
    strip = next(d for d in data if d["name"] == "strip-starttls")
    assert strip["expected"]["enforce"]["delivered"] is False
    assert strip["expected"]["no-policy"]["transport"] == "clear"


async def test_run_one_scenario_json_and_reports_written(tmp_path: Path) -> None:
    out_dir = tmp_path / "reports"
    rc, out, err = await relay_cli(
        "lab", "run", "--scenario", "strip-starttls", "--json", "--out", str(out_dir)
    )
    assert rc == 0, err
    data = json.loads(out)
    assert data["ok"] is True and data["mismatches"] == 0
    cells = {c["mode"]: c for c in data["cells"]}
    assert set(cells) == {"no-policy", "none", "testing", "enforce"}
    assert cells["enforce"]["delivered"] is False
    assert cells["enforce"]["tlsrpt_results"] == ["starttls-not-supported"]
    assert cells["none"]["transport"] == "clear" and cells["none"]["matches_rfc"] is True
    assert len(data["tlsrpt_reports"]) == 4
    gz = sorted(out_dir.glob("*.json.gz"))
    assert len(gz) == 4
    for f in gz:
        submitter, domain, begin, end, _rest = f.name.split("!")
        assert submitter == "relay.lab.test" and domain.startswith("strip-starttls.")
        report = json.loads(gzip.decompress(f.read_bytes()))
        assert validate_report(report, strict=True) == []
        assert parse_report(report).policy_domain == domain
        assert json.loads(f.with_name(f.name.removesuffix(".gz")).read_text()) == report


async def test_run_text_matrix_and_unknown_scenario() -> None:
    rc, out, err = await relay_cli("lab", "run", "--scenario", "good-tls")
    assert rc == 0, err
    assert re.search(r"^good-tls\s+TLS ok\s+TLS ok\s+TLS ok\s+TLS ok$", out, re.M), out
    assert "4/4 cells match RFC 8461/8460" in out
    assert "TLS-RPT reports the relay would send (4):" in out
    assert "phase 2: 4 cells" in err
    rc, _, err = await relay_cli("lab", "run", "--scenario", "no-such-attack")
    assert rc == 2 and "unknown scenario: no-such-attack" in err


async def test_strip_alone_between_a_client_and_an_mta() -> None:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.strip.test").configure_cert(ctx)
    async with LabMta("127.0.0.42", 0, tls_context=ctx, hostname="mx.strip.test") as mta:
        # the MTA itself offers STARTTLS
        direct = aiosmtplib.SMTP(hostname="127.0.0.42", port=mta.port, start_tls=False)
        async with direct:
            await direct.ehlo()
            assert direct.supports_extension("starttls")
        proc = await Running.start(
            "lab", "strip", "--listen", "127.0.0.43:0", "--upstream", f"127.0.0.42:{mta.port}"
        )
        try:
            assert "STARTTLS -> XXXXXXXA" in proc.where
            client = aiosmtplib.SMTP(hostname="127.0.0.43", port=proc.port(), start_tls=False)
            async with client:
                await client.ehlo()
                assert not client.supports_extension("starttls")
                assert client.supports_extension("xxxxxxxa")
                await client.sendmail("a@s.test", ["b@strip.test"], b"Subject: x\r\n\r\nbody\r\n")
        finally:
            rc, out = await proc.terminate()
        assert rc == 0 and "1 connections, 1 rewritten" in out
        [got] = mta.messages
        assert got.tls_version is None and got.rcpt_tos == ("b@strip.test",)


async def test_policy_host_alone(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("mta-sts.ph.test")
    cert, key, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    policy = tmp_path / "policy.txt"
    policy.write_text("version: STSv1\nmode: testing\nmx: *.ph.test\nmax_age: 600\n")
    resolver = StaticResolver({("mta-sts.ph.test", "A"): "127.0.0.44"})
    http = SafeHttpClient(resolver, ca_file=ca_file, allow_private=True, timeout=5)
    for mode, ok in (("normal", True), ("wrong-content-type", False)):
        proc = await Running.start(
            "lab", "policy-host", "--listen", "127.0.0.44:0", "--policy", str(policy),
            "--cert", str(cert), "--key", str(key), "--name", "mta-sts.ph.test", "--mode", mode,
        )  # fmt: skip
        try:
            assert "for mta-sts.ph.test" in proc.where
            if ok:
                got = await fetch_policy(http, "ph.test", port=proc.port(), timeout=5)
                assert got.mode is StsMode.TESTING and got.mx == ("*.ph.test",)
            else:
                with pytest.raises(PolicyFetchError, match="text/html"):
                    await fetch_policy(http, "ph.test", port=proc.port(), timeout=5)
        finally:
            rc, out = await proc.terminate()
        assert rc == 0 and "1 requests" in out
    rc, _, err = await relay_cli(
        "lab", "policy-host", "--listen", "127.0.0.44:0", "--policy", str(tmp_path / "nope"),
        "--cert", str(cert), "--key", str(key),
    )  # fmt: skip
    assert rc == 2 and "nope" in err
