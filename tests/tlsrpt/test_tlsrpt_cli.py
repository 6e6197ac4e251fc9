"""End to end over loopback: a running relay delivers to lab domains (one MX with
STARTTLS, one without), its ledger counts the TLS sessions, then ``relay tlsrpt send``
(a separate process, as an operator runs it) POSTs the reports to a lab HTTPS collector
and queues the mailto report, which the running relay delivers to a lab MX with a DKIM
signature that verifies against the lab DNS. Also ``relay tlsrpt preview`` and bad days.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim
import pytest
import trustme

from relay.app import RelayApp
from relay.commands.keygen import generate
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from relay.store import Store
from relay.tlsrpt.report import report_attachments, validate_report
from tests.labutil import base_doc, message, send, write_config
from tests.mtasts.sts_https_server import Answer, HttpsServer

ROOT = Path(__file__).resolve().parents[2]
SUBMITTER = "relay.lab.test"


def start_dns(zone: Zone) -> LabDnsServer:
    for attempt in range(5):
        try:
            return LabDnsServer(zone).start()
        except OSError:  # the TCP bind lost the ephemeral port race
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.zone = Zone()
        self.dns = start_dns(self.zone)
        self.mtas: list[LabMta] = []
        self.port = 0
        self.app: RelayApp | None = None
        self.collector = HttpsServer(self.ca, host="127.0.0.1")
        key = generate("rsa")
        (tmp / "tlsrpt.pem").write_bytes(key.private_pem)
        self.zone.add(f"tlsrpt._domainkey.{SUBMITTER}", "TXT",
                      f"v=DKIM1; k=rsa; s=tlsrpt; p={key.public_b64}")  # fmt: skip
        self.config_path = tmp / "config.toml"

    async def mta(self, ip: str, name: str, *, tls: bool) -> LabMta:
        ctx = None
        if tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert(name).configure_cert(ctx)
        mta = LabMta(ip, self.port, tls_context=ctx, hostname=name)
        await mta.start()
        self.port = mta.port
        self.mtas.append(mta)
        return mta

    def domain(self, domain: str, mx: str, ip: str) -> None:
        self.zone.add(domain, "MX", (10, mx))
        self.zone.add(mx, "A", ip)

    async def start_relay(self) -> RelayApp:
        doc = base_doc(self.tmp, self.dns.address, self.port)
        doc["delivery"]["ca_file"] = str(self.ca_file)
        doc["http"] = {"allow_private_addresses": True}
        doc["tlsrpt"] = {
            "enabled": True,
            "organization": "Relay Lab",
            "contact": f"mailto:tlsrpt@{SUBMITTER}",
            "submitter": SUBMITTER,
            "dkim_selector": "tlsrpt",
            "dkim_private_key": str(self.tmp / "tlsrpt.pem"),
        }
        config = write_config(self.config_path, doc)
        self.app = RelayApp(config, poll_interval=0.05)
        await self.app.start()
        return self.app

    async def close(self) -> None:
        if self.app is not None:
            await self.app.stop(grace=2)
        for m in self.mtas:
            await m.stop()
        await self.collector.stop()
        self.dns.stop()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    await lab.close()


async def relay_cli(*args: str) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def dnsfunc(zone: Zone) -> Any:
    def get(name: bytes, timeout: int = 5) -> bytes | None:
        recs = zone.records.get(name.decode().rstrip(".").lower(), [])
        txt = [v for t, v in recs if t == "TXT"]
        return str(txt[0]).encode() if txt else None

    return get


async def test_deliveries_then_tlsrpt_send_end_to_end(lab: Lab) -> None:
    good = await lab.mta("127.0.0.2", "mx.good.test", tls=True)
    plain = await lab.mta("127.0.0.3", "mx.plain.test", tls=False)
    reports = await lab.mta("127.0.0.4", "mx.reports.lab.test", tls=True)
    lab.domain("good.test", "mx.good.test", "127.0.0.2")
    lab.domain("plain.test", "mx.plain.test", "127.0.0.3")
    lab.domain("reports.lab.test", "mx.reports.lab.test", "127.0.0.4")
    await lab.collector.start()
    lab.zone.add("collector.lab.test", "A", "127.0.0.1")
    for path in ("/good", "/plain"):
        lab.collector.route("collector.lab.test", path, Answer(200, b"thanks"))
    base = f"https://collector.lab.test:{lab.collector.port}"
    lab.zone.add("_smtp._tls.good.test", "TXT",
                 f"v=TLSRPTv1; rua={base}/good,mailto:tls@reports.lab.test")  # fmt: skip
    lab.zone.add("_smtp._tls.plain.test", "TXT", f"v=TLSRPTv1; rua={base}/plain")

    app = await lab.start_relay()
    host, port = app.bound[0]
    for i in range(2):
        await send(host, port, "a@sender.test", ["bob@good.test"], message(msgid=f"<g{i}@s>"))
        await good.wait_for(i + 1)
    await send(host, port, "a@sender.test", ["carol@plain.test"], message(msgid="<p@s>"))
    [p] = await plain.wait_for(1)
    assert p.tls_version is None
    assert app.ledger is not None
    await app.ledger.flush()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    sessions = {r.policy_domain: r for r in await app.ledger.counts(today)}
    assert set(sessions) == {"good.test", "plain.test"}

    code, out, err = await relay_cli("tlsrpt", "send", "--config", str(lab.config_path),
                                     "--day", today)  # fmt: skip
    assert code == 0, (out, err)
    lines = sorted(out.splitlines())
    assert lines == sorted([
        f"{today} good.test {base}/good delivered",
        f"{today} plain.test {base}/plain delivered",
    ] + [line for line in lines if "mailto:tls@reports.lab.test queued qid=" in line])  # fmt: skip
    assert len(lines) == 3

    # the collector: gzip'd JSON, content type, counts equal what happened
    posts = {s.path: s for s in lab.collector.seen if s.method == "POST"}
    assert set(posts) == {"/good", "/plain"}
    objs = {}
    for path, seen in posts.items():
        assert seen.headers["content-type"] == "application/tlsrpt+gzip"
        assert seen.body[:2] == b"\x1f\x8b"
        objs[path] = json.loads(gzip.decompress(seen.body))
        assert validate_report(objs[path], strict=True) == []
    [g] = objs["/good"]["policies"]
    assert g["policy"]["policy-type"] == "no-policy-found"
    # one session per connection: the second message may have reused the first one's
    assert g["summary"] == {"total-successful-session-count": good.connections,
                            "total-failure-session-count": 0}  # fmt: skip
    assert 1 <= good.connections <= 2
    [pl] = objs["/plain"]["policies"]
    assert pl["summary"] == {"total-successful-session-count": 0,
                             "total-failure-session-count": 1}  # fmt: skip
    [d] = pl["failure-details"]
    assert d["result-type"] == "starttls-not-supported"
    assert d["receiving-mx-hostname"] == "mx.plain.test" and d["receiving-ip"] == "127.0.0.3"
    assert d["failed-session-count"] == 1

    # the mailto report: queued by the command, delivered by the running relay
    [got] = await reports.wait_for(1)
    assert got.mail_from == "" and got.rcpt_tos == ("tls@reports.lab.test",)
    [(_ctype, _name, payload)] = report_attachments(got.data)
    assert json.loads(payload) == objs["/good"]  # the same report by both routes
    assert b"\r\nTLS-Required: No\r\n" in got.data
    # verify the signed part (our Received header sits above the signature)
    signed = got.data[got.data.index(b"DKIM-Signature:") :]
    assert dkim.verify(signed, dnsfunc=dnsfunc(lab.zone), tlsrpt="strict")
    # the report's own delivery is not counted in the ledger
    await asyncio.sleep(0.1)
    await app.ledger.flush()
    assert "reports.lab.test" not in await app.ledger.domains(today)

    # sending again sends nothing new; preview prints the report that was sent
    code, out, err = await relay_cli("tlsrpt", "send", "--config", str(lab.config_path),
                                     "--day", today, "--domain", "plain.test")  # fmt: skip
    assert code == 0 and out.strip() == f"{today} plain.test {base}/plain delivered"
    assert len([s for s in lab.collector.seen if s.method == "POST"]) == 2
    code, out, err = await relay_cli("tlsrpt", "preview", "--config", str(lab.config_path),
                                     "--day", today, "--domain", "good.test")  # fmt: skip
    assert code == 0 and json.loads(out) == objs["/good"]
    assert "no DKIM key" not in err  # the [tlsrpt] key signs: nothing to say


async def test_preview_without_sessions_and_bad_days(tmp_path: Path) -> None:
    doc = {"storage": {"path": str(tmp_path / "r.sqlite3")},
           "tlsrpt": {"submitter": "example.net"}}  # fmt: skip
    write_config(tmp_path / "c.toml", doc)
    # a store that does not exist is refused, not created (a wrong --config)
    code, out, err = await relay_cli("tlsrpt", "preview", "--config", str(tmp_path / "c.toml"))
    assert code == 2 and "does not exist" in err and "r.sqlite3" in err
    assert not (tmp_path / "r.sqlite3").exists()
    Store(tmp_path / "r.sqlite3").open().close()
    code, out, err = await relay_cli("tlsrpt", "preview", "--config", str(tmp_path / "c.toml"))
    assert code == 0 and out == "" and "no sessions recorded" in err
    # no DKIM key for the submitter: one line says why mailto reports will not be sent
    # (RFC 8460 section 3)
    why = [line for line in err.splitlines() if "no DKIM key for example.net" in line]
    assert len(why) == 1 and "mailto reports are not sent" in why[0], err
    assert "RFC 8460 section 3" in why[0]
    tomorrow = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=2)).isoformat()
    code, out, err = await relay_cli("tlsrpt", "send", "--config", str(tmp_path / "c.toml"),
                                     "--day", tomorrow)  # fmt: skip
    assert code != 0 and "future day" in err
    code, out, err = await relay_cli("tlsrpt", "send", "--config", str(tmp_path / "c.toml"),
                                     "--day", "22/11/2026")  # fmt: skip
    assert code != 0 and "YYYY-MM-DD" in err
    code, out, err = await relay_cli("tlsrpt", "preview", "--config", str(tmp_path / "no.toml"))
    assert code == 2 and "config error" in err
