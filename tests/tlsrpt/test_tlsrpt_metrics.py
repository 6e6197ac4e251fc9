"""relay_tlsrpt_reports_total counts each delivery try of a report where it happens: a
failed HTTPS post, the retry that succeeds, a mail report queued, and a mail report
skipped because there is no key to sign it (RFC 8460 section 3), read back from the
Prometheus text the relay serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from tests.mtasts.sts_https_server import Answer
from tests.tlsrpt.test_tlsrpt_sender import NEXT_MORNING, Lab, lab, outcome  # noqa: F401

__all__ = ["lab"]


@pytest.fixture
def counting(tmp_path: Path) -> Iterator[Path]:
    metrics.init(tmp_path / "metrics")
    try:
        yield tmp_path
    finally:
        metrics.reset()


def reports(store: Path) -> dict[tuple[str, str], float]:
    text = metrics.render(store)[0].decode()
    return {
        (s.labels["outcome"], s.labels["method"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "relay_tlsrpt_reports_total"
    }


async def test_failed_then_sent_over_https_and_sent_by_mail(counting: Path, lab: Lab) -> None:
    lab.collector.route("collector.lab.test", "/flaky", Answer(503, b"busy"))
    lab.publish("https.test", f"https://collector.lab.test:{lab.collector.port}/flaky")
    lab.publish("mail.test", "mailto:tls-reports@reports.lab.test")
    ledger, sender = lab.open()
    ledger.record(outcome("https.test"))
    ledger.record(outcome("mail.test", sts=False))
    await ledger.flush()
    lab.clock.t = NEXT_MORNING
    await sender.daily("2026-11-23")
    store = lab.config.storage.path
    zero = {(o, m): 0.0 for o in ("sent", "failed", "skipped") for m in ("https", "mailto")}
    assert reports(store) == zero | {("failed", "https"): 1, ("sent", "mailto"): 1}
    assert len(lab.inject.sent) == 1
    lab.collector.route("collector.lab.test", "/flaky", Answer(200, b"ok"))
    rec = await ledger.report("2026-11-22", "https.test")
    assert rec is not None
    lab.clock.t = rec.deliveries[0].next_attempt
    await sender.retry_due()
    assert reports(store) == zero | {
        ("failed", "https"): 1,
        ("sent", "https"): 1,
        ("sent", "mailto"): 1,
    }


async def test_mail_report_without_a_key_is_skipped(counting: Path, lab: Lab) -> None:
    lab.config = lab.write_config(drop=("dkim_private_key", "dkim_selector"))
    lab.publish("mail.test", "mailto:tls-reports@reports.lab.test")
    ledger, sender = lab.open()
    ledger.record(outcome("mail.test", sts=False))
    await ledger.flush()
    lab.clock.t = NEXT_MORNING
    await sender.daily("2026-11-23")
    assert lab.inject.sent == []
    got = reports(lab.config.storage.path)
    assert {k: v for k, v in got.items() if v} == {("skipped", "mailto"): 1}
