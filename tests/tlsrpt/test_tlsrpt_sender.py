"""The TLS-RPT sender over loopback: the real lab DNS server, a real HTTPS collector
(trustme certificate) reached through SafeHttpClient, the report mail (multipart/report,
DKIM-signed, verified by dkimpy against the lab zone), retries, restarts."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

import dkim
import pytest
import structlog
import structlog.testing
import trustme

from relay.auth.dkim import verify_dkim
from relay.commands.keygen import generate
from relay.config import Config
from relay.dns import DnspythonResolver, StaticResolver
from relay.http import SafeHttpClient
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.model import PolicyType, TlsOutcome, TlsResultType
from relay.store import Store
from relay.tlsrpt.ledger import DeliveryStatus, ReportState, TlsRptLedger
from relay.tlsrpt.report import parse_report, report_attachments, validate_report
from relay.tlsrpt.sender import RETRY_WINDOW, MailParts, TlsRptSender, build_report_mail
from tests.labutil import write_config
from tests.mtasts.sts_https_server import Answer, HttpsServer

DAY = "2026-11-22"
T_DAY = 1795305600.0  # 2026-11-22T00:00:00Z
NEXT_MORNING = T_DAY + 86400 + 1800  # 2026-11-23T00:30:00Z
STS = ("version: STSv1", "mode: enforce", "mx: mx.https.test", "max_age: 86400")
SUBMITTER = "example.net"
RFC_EXAMPLE = (
    Path(__file__).resolve().parents[1] / "vectors/tlsrpt/parsedmarc/rfc8460.json"
).read_bytes()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Inject:
    sent: list[tuple[str, tuple[str, ...], bytes]] = field(default_factory=list)
    fail: int = 0

    async def __call__(self, mail_from: str, rcpts: Sequence[str], data: bytes) -> str:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("queue unavailable")
        self.sent.append((mail_from, tuple(rcpts), data))
        return f"Q{len(self.sent)}"


def start_dns(zone: Zone) -> LabDnsServer:
    """The lab DNS server; its TCP bind can lose the ephemeral port race, so try again."""
    for attempt in range(5):
        try:
            return LabDnsServer(zone).start()
        except OSError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


class Lab:
    """Lab DNS + HTTPS collector + config + ledger; one per test."""

    def __init__(self, tmp: Path, algorithm: str = "rsa") -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.zone = Zone()
        self.dns = start_dns(self.zone)
        self.key = generate(algorithm)
        (tmp / "tlsrpt.pem").write_bytes(self.key.private_pem)
        # RFC 8460 section 3: the key record SHOULD carry s=tlsrpt
        self.zone.add(f"tlsrpt._domainkey.{SUBMITTER}", "TXT",
                      f"v=DKIM1; k={algorithm}; s=tlsrpt; p={self.key.public_b64}")  # fmt: skip
        self.collector = HttpsServer(self.ca, host="127.0.0.1")
        self.clock = Clock(T_DAY + 36000)
        self.inject = Inject()
        self.config = self.write_config()
        self.store: Store | None = None

    def write_config(
        self, drop: Sequence[str] = (), extra: dict[str, Any] | None = None, **tlsrpt: Any
    ) -> Config:
        doc: dict[str, Any] = {
            "server": {"hostname": "relay.lab.test"},
            "storage": {"path": str(self.tmp / "relay.sqlite3")},
            "dns": {"nameservers": [self.dns.address], "timeout": 2},
            "delivery": {"ca_file": str(self.ca_file)},
            "http": {"allow_private_addresses": True},
            "tlsrpt": {
                "organization": "Example Net",
                "contact": "mailto:tlsrpt@example.net",
                "submitter": SUBMITTER,
                "dkim_selector": "tlsrpt",
                "dkim_private_key": str(self.tmp / "tlsrpt.pem"),
                "max_failure_details": 10,
                "send_delay_max": 60,
                **tlsrpt,
            },
            **(extra or {}),
        }
        for key in drop:
            del doc["tlsrpt"][key]
        return write_config(self.tmp / "config.toml", doc)

    async def start(self) -> None:
        await self.collector.start()
        self.zone.add("collector.lab.test", "A", "127.0.0.1")

    def publish(self, domain: str, *rua: str) -> None:
        self.zone.set(f"_smtp._tls.{domain}", "TXT", [f"v=TLSRPTv1; rua={','.join(rua)}"])

    def collector_url(self, path: str) -> str:
        self.collector.route("collector.lab.test", path, Answer(201, b"", None))
        return f"https://collector.lab.test:{self.collector.port}{path}"

    def open(self) -> tuple[TlsRptLedger, TlsRptSender]:
        self.store = Store(self.config.storage.path).open()
        ledger = TlsRptLedger(self.store, self.clock)
        resolver = DnspythonResolver([self.dns.address], timeout=2)
        http = SafeHttpClient(resolver, ca_file=self.ca_file, allow_private=True, timeout=10)
        sender = TlsRptSender(self.config, ledger, resolver, http, self.inject, self.clock,
                              random.Random(7))  # fmt: skip
        return ledger, sender

    async def close_store(self) -> None:
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    async def close(self) -> None:
        await self.close_store()
        await self.collector.stop()
        self.dns.stop()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    await lab.start()
    yield lab
    await lab.close()


def outcome(domain: str, result: TlsResultType | None = None, *, mx: str = "",
            ip: str = "192.0.2.10", sts: bool = True, reason: str = "") -> TlsOutcome:  # fmt: skip
    return TlsOutcome(
        policy_domain=domain,
        policy_type=PolicyType.STS if sts else PolicyType.NO_POLICY_FOUND,
        mx_host=mx or f"mx.{domain}",
        receiving_ip=ip,
        result_type=result,
        failure_reason=reason,
        policy_strings=STS if sts else (),
        mx_patterns=(f"mx.{domain}",) if sts else (),
        sending_mta_ip="198.51.100.25",
    )


def record_day(ledger: TlsRptLedger) -> None:
    for _ in range(5):
        ledger.record(outcome("https.test"))
    for _ in range(2):
        ledger.record(outcome("https.test", TlsResultType.CERTIFICATE_EXPIRED,
                              reason="certificate has expired"))  # fmt: skip
    for _ in range(3):
        ledger.record(outcome("mail.test", sts=False))
    ledger.record(outcome("mail.test", TlsResultType.STARTTLS_NOT_SUPPORTED, sts=False))
    for _ in range(4):
        ledger.record(outcome("none.test"))  # publishes no _smtp._tls record


def dnsfunc(zone: Zone) -> Any:
    def get(name: bytes, timeout: int = 5) -> bytes | None:
        recs = zone.records.get(name.decode().rstrip(".").lower(), [])
        txt = [v for t, v in recs if t == "TXT"]
        if not txt:
            return None
        v = txt[0]
        return ("".join(v) if isinstance(v, list) else str(v)).encode()

    return get


def dkim_tags(message: bytes) -> dict[str, str]:
    m = re.search(rb"^DKIM-Signature:(.*?)\r\n(?![ \t])", message, re.S | re.M)
    assert m is not None
    value = re.sub(rb"\s+", b"", m.group(1)).decode()
    return dict(t.split("=", 1) for t in value.split(";") if t)


async def test_daily_reports_over_https_and_mail(lab: Lab) -> None:
    url = lab.collector_url("/v1/tlsrpt")
    lab.publish("https.test", url)
    lab.publish("mail.test", "mailto:tls-reports@reports.lab.test")
    ledger, sender = lab.open()
    record_day(ledger)
    await ledger.flush()
    lab.clock.t = NEXT_MORNING
    await sender.daily("2026-11-23")

    # https: one POST, gzip'd JSON as application/tlsrpt+gzip, counts equal the outcomes
    posts = [s for s in lab.collector.seen if s.method == "POST"]
    assert len(posts) == 1
    assert posts[0].headers["content-type"] == "application/tlsrpt+gzip"
    assert posts[0].sni == "collector.lab.test"
    assert posts[0].body[:2] == b"\x1f\x8b"
    obj = json.loads(gzip.decompress(posts[0].body))
    assert validate_report(obj, strict=True) == []
    assert obj["date-range"] == {"start-datetime": f"{DAY}T00:00:00Z",
                                 "end-datetime": f"{DAY}T23:59:59Z"}  # fmt: skip
    [pol] = obj["policies"]
    assert pol["policy"]["policy-domain"] == "https.test"
    assert pol["policy"]["policy-string"] == list(STS)
    assert pol["summary"] == {"total-successful-session-count": 5,
                              "total-failure-session-count": 2}  # fmt: skip
    assert pol["failure-details"] == [{
        "result-type": "certificate-expired", "sending-mta-ip": "198.51.100.25",
        "receiving-mx-hostname": "mx.https.test", "receiving-ip": "192.0.2.10",
        "failed-session-count": 2, "failure-reason-code": "certificate has expired"}]  # fmt: skip

    # mailto: one message to our queue, from the null reverse-path
    assert len(lab.inject.sent) == 1
    mail_from, rcpts, data = lab.inject.sent[0]
    assert mail_from == "" and rcpts == ("tls-reports@reports.lab.test",)
    msg = message_from_bytes(data)
    rec = await ledger.report(DAY, "mail.test")
    assert rec is not None and rec.state is ReportState.DONE
    assert msg["TLS-Report-Domain"] == "mail.test"
    assert msg["TLS-Report-Submitter"] == SUBMITTER
    assert msg["TLS-Required"] == "No"
    assert msg["From"] == f"noreply-smtp-tls-reporting@{SUBMITTER}"
    assert msg["Message-ID"] and msg["Date"]
    subject = " ".join(str(msg["Subject"]).split())
    assert (
        subject == f"Report Domain: mail.test Submitter: {SUBMITTER} Report-ID: <{rec.report_id}>"
    )
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    parts = [p.get_content_type() for p in msg.walk()]
    assert parts == ["multipart/report", "text/plain", "application/tlsrpt+gzip"]
    [(ctype, filename, payload)] = report_attachments(data)
    assert ctype == "application/tlsrpt+gzip"
    m = re.fullmatch(rf"{SUBMITTER}!mail\.test!(\d+)!(\d+)!([A-Za-z0-9]+)\.json\.gz", filename)
    assert m is not None and int(m.group(1)) == int(T_DAY) and int(m.group(2)) == T_DAY + 86399
    mobj = json.loads(payload)
    assert mobj == json.loads(rec.report_json)  # the attachment is the stored report
    assert validate_report(mobj, strict=True) == []
    assert mobj["policies"][0]["policy"]["policy-type"] == "no-policy-found"
    assert mobj["policies"][0]["summary"] == {"total-successful-session-count": 3,
                                              "total-failure-session-count": 1}  # fmt: skip

    # DKIM: signed by the submitter domain, no l=, key record s=tlsrpt; dkimpy verifies
    tags = dkim_tags(data)
    assert tags["d"] == SUBMITTER and tags["s"] == "tlsrpt" and "l" not in tags
    assert {"from", "subject", "tls-report-domain", "tls-report-submitter"} <= set(
        tags["h"].lower().split(":")
    )
    assert dkim.verify(data, dnsfunc=dnsfunc(lab.zone), tlsrpt="strict")
    tampered = data.replace(b"Report Domain: mail.test", b"Report Domain: evil.test")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc(lab.zone), tlsrpt="strict")

    # no record: nothing sent, state kept; https delivered
    none = await ledger.report(DAY, "none.test")
    assert none is not None and none.state is ReportState.NO_RECORD and not none.deliveries
    hrec = await ledger.report(DAY, "https.test")
    assert hrec is not None and hrec.state is ReportState.DONE
    assert [d.status for d in hrec.deliveries] == [DeliveryStatus.DELIVERED]

    # a restart, and the daily pass again: nothing is sent twice
    await lab.close_store()
    ledger, sender = lab.open()
    await sender.daily("2026-11-23")
    await sender.retry_due()
    assert len([s for s in lab.collector.seen if s.method == "POST"]) == 1
    assert len(lab.inject.sent) == 1


async def test_several_ruas_and_run_loop_waits_for_the_delay(lab: Lab) -> None:
    url = lab.collector_url("/a")
    lab.publish("both.test", url, "mailto:a@reports.lab.test", "mailto:b@reports.lab.test")
    ledger, sender = lab.open()
    ledger.record(outcome("both.test"))
    await ledger.flush()
    lab.clock.t = T_DAY + 86400 + 2  # 00:00:02, before the random delay (at least 10 s)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    await asyncio.sleep(0.3)
    assert lab.inject.sent == [] and lab.collector.seen == []
    lab.clock.t = T_DAY + 86400 + 3600  # past any delay up to send_delay_max
    sender.wake()
    for _ in range(100):
        if len(lab.inject.sent) == 2 and lab.collector.seen:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert sorted(r for _f, (r,), _d in lab.inject.sent) == ["a@reports.lab.test",
                                                            "b@reports.lab.test"]  # fmt: skip
    assert len(lab.collector.seen) == 1
    ids = {message_from_bytes(d)["Message-ID"] for _f, _r, d in lab.inject.sent}
    assert len(ids) == 2  # one Message-ID per recipient
    rec = await ledger.report(DAY, "both.test")
    assert rec is not None and rec.state is ReportState.DONE


async def test_https_retry_with_backoff_then_success(lab: Lab) -> None:
    lab.collector.route("collector.lab.test", "/flaky", Answer(503, b"busy"))
    url = f"https://collector.lab.test:{lab.collector.port}/flaky"
    lab.publish("https.test", url)
    ledger, sender = lab.open()
    ledger.record(outcome("https.test"))
    await ledger.flush()
    lab.clock.t = NEXT_MORNING
    await sender.daily("2026-11-23")
    rec = await ledger.report(DAY, "https.test")
    assert rec is not None and rec.state is ReportState.SENDING
    [d] = rec.deliveries
    assert d.status is DeliveryStatus.PENDING and d.attempts == 1 and "503" in d.last_error
    assert 250 < d.next_attempt - lab.clock.t < 350  # about 5 minutes
    assert await sender.deliver_due() == 0  # not due yet
    lab.collector.route("collector.lab.test", "/flaky", Answer(200, b"ok"))
    lab.clock.t = d.next_attempt
    # a restart in between: the retry state is in the store
    await lab.close_store()
    ledger, sender = lab.open()
    await sender.retry_due()
    rec = await ledger.report(DAY, "https.test")
    assert rec is not None and rec.state is ReportState.DONE
    assert rec.deliveries[0].status is DeliveryStatus.DELIVERED
    assert rec.deliveries[0].attempts == 2
    bodies = [s.body for s in lab.collector.seen if s.method == "POST"]
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the same report, resent


async def test_gives_up_after_24_hours_and_keeps_state(lab: Lab) -> None:
    lab.collector.route("collector.lab.test", "/down", Answer(500, b"down"))
    lab.publish("https.test", f"https://collector.lab.test:{lab.collector.port}/down")
    lab.publish("mail.test", "mailto:r@reports.lab.test")
    ledger, sender = lab.open()
    ledger.record(outcome("https.test"))
    ledger.record(outcome("mail.test"))
    await ledger.flush()
    lab.inject.fail = 1  # the queue refuses once, then takes it
    lab.clock.t = NEXT_MORNING
    start = lab.clock.t
    await sender.daily("2026-11-23")
    tries = 1
    while True:
        nxt = await ledger.next_due()
        if nxt is None:
            break
        lab.clock.t = max(nxt, lab.clock.t)
        await sender.retry_due()
        tries += 1
        assert tries < 60
    assert lab.clock.t - start <= RETRY_WINDOW
    rec = await ledger.report(DAY, "https.test")
    assert rec is not None and rec.state is ReportState.DONE
    [d] = rec.deliveries
    assert d.status is DeliveryStatus.FAILED and "500" in d.last_error
    assert 20 <= d.attempts <= 40  # back-off from 5 minutes to 1 hour within 24 hours
    mrec = await ledger.report(DAY, "mail.test")
    assert mrec is not None and mrec.deliveries[0].status is DeliveryStatus.QUEUED
    assert mrec.deliveries[0].attempts == 2 and len(lab.inject.sent) == 1


async def test_refused_address_is_permanent(lab: Lab) -> None:
    lab.collector_url("/r")
    lab.publish("https.test", f"https://collector.lab.test:{lab.collector.port}/r")
    ledger, _ = lab.open()
    ledger.record(outcome("https.test"))
    await ledger.flush()
    resolver = DnspythonResolver([lab.dns.address], timeout=2)
    strict_http = SafeHttpClient(resolver, ca_file=lab.ca_file, allow_private=False, timeout=5)
    sender = TlsRptSender(lab.config, ledger, resolver, strict_http, lab.inject, lab.clock)
    lab.clock.t = NEXT_MORNING
    await sender.daily("2026-11-23")
    rec = await ledger.report(DAY, "https.test")
    assert rec is not None
    assert rec.deliveries[0].status is DeliveryStatus.FAILED
    assert "refused" in rec.deliveries[0].last_error
    assert lab.collector.seen == []  # never connected to 127.0.0.1


async def test_discovery_tempfail_is_retried(lab: Lab) -> None:
    lab.zone.fail("_smtp._tls.https.test", "SERVFAIL")
    url = lab.collector_url("/v1")
    ledger, sender = lab.open()
    ledger.record(outcome("https.test"))
    await ledger.flush()
    lab.clock.t = NEXT_MORNING
    await sender.daily("2026-11-23")
    rec = await ledger.report(DAY, "https.test")
    assert rec is not None and rec.state is ReportState.DISCOVER
    lab.zone.fail("_smtp._tls.https.test", None)
    lab.publish("https.test", url)
    lab.clock.t = rec.next_attempt
    await sender.retry_due()
    rec = await ledger.report(DAY, "https.test")
    assert rec is not None and rec.state is ReportState.DONE
    assert len(lab.collector.seen) == 1


async def test_send_today_explicitly_and_preview(lab: Lab) -> None:
    url = lab.collector_url("/today")
    lab.publish("https.test", url)
    ledger, sender = lab.open()
    record_day(ledger)  # not flushed: send_day flushes first
    previews = await sender.preview(DAY)
    assert previews == [] or all(p.report_id.endswith("preview@example.net") for p in previews)
    recs = await sender.send_day(DAY)  # the clock is still on DAY: "today"
    assert {r.policy_domain: r.state for r in recs} == {
        "https.test": ReportState.DONE,
        "mail.test": ReportState.NO_RECORD,
        "none.test": ReportState.NO_RECORD,
    }
    [prev] = await sender.preview(DAY, domain="https.test")
    stored = await ledger.report(DAY, "https.test")
    assert stored is not None and prev.report_id == stored.report_id  # the one sent
    body = [s.body for s in lab.collector.seen if s.method == "POST"][0]
    assert parse_report(body) == prev


async def test_ed25519_signed_mail_verifies() -> None:
    key = generate("ed25519")
    from relay.auth.dkim import DkimSigner

    rep = parse_report(RFC_EXAMPLE)
    signer = DkimSigner(SUBMITTER, "ed", key.private_pem)
    parts = MailParts(rep, "2016-04-01", SUBMITTER, "r@company-y.example",
                      f"noreply-smtp-tls-reporting@{SUBMITTER}", "<x@example.net>",
                      "Fri, 01 Apr 2016 01:00:00 +0000")  # fmt: skip
    data = build_report_mail(parts, rep.to_gzip(), signer)
    assert "l" not in dkim_tags(data) and dkim_tags(data)["a"] == "ed25519-sha256"
    # relay's verifier is a general mail verifier: it refuses s=tlsrpt keys, so s=email
    res = StaticResolver({(f"ed._domainkey.{SUBMITTER}", "TXT"): [key.record() + "; s=email"]})
    [result] = await verify_dkim(res, data)
    assert result.result == "pass", result.reason
    assert len(max(data.split(b"\r\n"), key=len)) <= 998


async def test_mailto_report_without_a_key_is_never_sent_https_still_is(lab: Lab) -> None:
    """RFC 8460 section 3: a report sent by mail MUST be DKIM-signed. With no key for the
    submitter domain the mailto delivery fails at once (logged, nothing queued, no retry),
    while the https report goes out (before: the mail was queued unsigned)."""
    lab.config = lab.write_config(drop=("dkim_private_key", "dkim_selector"))
    url = lab.collector_url("/v1/tlsrpt")
    lab.publish("https.test", url)
    lab.publish("mail.test", "mailto:tls-reports@reports.lab.test")
    ledger, sender = lab.open()
    assert sender.signer is None
    record_day(ledger)
    await ledger.flush()
    lab.clock.t = NEXT_MORNING
    with structlog.testing.capture_logs() as logs:
        await sender.daily("2026-11-23")
    assert lab.inject.sent == []
    rec = await ledger.report(DAY, "mail.test")
    assert rec is not None
    [d] = rec.deliveries
    assert d.status is DeliveryStatus.FAILED and "RFC 8460 section 3" in d.last_error
    assert [e["to"] for e in logs if e["event"] == "tlsrpt_report_unsigned_not_sent"] == [
        "tls-reports@reports.lab.test"
    ]
    assert len([s for s in lab.collector.seen if s.method == "POST"]) == 1
    hrec = await ledger.report(DAY, "https.test")
    assert hrec is not None and [x.status for x in hrec.deliveries] == [DeliveryStatus.DELIVERED]
    lab.clock.t = NEXT_MORNING + RETRY_WINDOW
    await sender.retry_due()
    assert lab.inject.sent == []


async def test_report_signed_by_the_dkim_sign_key_of_the_parent_domain(lab: Lab) -> None:
    """No [tlsrpt] key: the [[dkim.sign]] entry for the From domain's parent signs the
    report (the one signing home, relay.auth.signer); dkimpy verifies it."""
    key = generate("rsa")
    (lab.tmp / "parent.pem").write_bytes(key.private_pem)
    lab.zone.add(f"s2026._domainkey.{SUBMITTER}", "TXT", key.record())
    sign = {"domain": SUBMITTER, "selector": "s2026", "private_key": str(lab.tmp / "parent.pem")}
    lab.config = lab.write_config(
        drop=("dkim_private_key", "dkim_selector"),
        extra={"dkim": {"sign": [sign]}},
        submitter=f"reports.{SUBMITTER}",
    )
    lab.publish("mail.test", "mailto:tls-reports@reports.lab.test")
    ledger, sender = lab.open()
    record_day(ledger)
    await ledger.flush()
    lab.clock.t = NEXT_MORNING
    await sender.daily("2026-11-23")
    [(_, _, data)] = lab.inject.sent
    assert message_from_bytes(data)["From"] == f"noreply-smtp-tls-reporting@reports.{SUBMITTER}"
    tags = dkim_tags(data)
    assert tags["d"] == SUBMITTER and tags["s"] == "s2026" and "l" not in tags
    assert "tls-report-domain" in tags["h"].lower().split(":")
    assert dkim.verify(data, dnsfunc=dnsfunc(lab.zone))
