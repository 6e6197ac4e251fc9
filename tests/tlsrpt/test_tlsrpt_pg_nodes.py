"""TLS-RPT on PostgreSQL with two nodes: two ledgers (each its own connection pool, like
two relays) count sessions of the same policy domains into one database; both nodes' daily
report jobs run at the same moment; exactly one report per policy domain and day is sent —
one POST to the real HTTPS collector, one DKIM-signed mail to the queue — carrying the
counts of both nodes."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
from collections.abc import AsyncIterator
from email import message_from_bytes

import pytest

from relay import pgschema
from relay.dns import DnspythonResolver
from relay.errors import StoreError
from relay.http import SafeHttpClient
from relay.model import TlsResultType
from relay.pgstore import PgStore
from relay.tlsrpt.ledger import DeliveryStatus, ReportState, TlsLedger, open_ledger
from relay.tlsrpt.report import parse_report, report_attachments
from relay.tlsrpt.sender import TlsRptSender
from tests.mtasts.sts_https_server import Answer
from tests.tlsrpt.test_tlsrpt_sender import DAY, NEXT_MORNING, T_DAY, Lab, lab, outcome

__all__ = ["lab"]


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[list[PgStore]]:
    out = []
    for _ in range(2):
        pg = await PgStore(pg_url, os.environ["RELAY_DB_PASSWORD"]).open()
        await pgschema.migrate_all(pg)
        out.append(pg)
    yield out
    for pg in out:
        await pg.close()


def node(lab: Lab, store: PgStore, name: str, seed: int) -> tuple[TlsLedger, TlsRptSender]:
    ledger = open_ledger(store, lab.clock, owner=name)
    resolver = DnspythonResolver([lab.dns.address], timeout=2)
    http = SafeHttpClient(resolver, ca_file=lab.ca_file, allow_private=True, timeout=10)
    sender = TlsRptSender(lab.config, ledger, resolver, http, lab.inject, lab.clock,
                          random.Random(seed))  # fmt: skip
    return ledger, sender


def record(ledger: TlsLedger, ok: int, failed: int, mail: int) -> None:
    for _ in range(ok):
        ledger.record(outcome("https.test"))
    for _ in range(failed):
        ledger.record(outcome("https.test", TlsResultType.CERTIFICATE_EXPIRED,
                              reason="certificate has expired"))  # fmt: skip
    for _ in range(mail):
        ledger.record(outcome("mail.test", sts=False))


async def test_two_nodes_send_one_report_per_domain_with_both_nodes_counts(
    lab: Lab, stores: list[PgStore]
) -> None:
    lab.collector.route("collector.lab.test", "/v1/tlsrpt", Answer(201, b"", None, delay=0.3))
    lab.publish("https.test", f"https://collector.lab.test:{lab.collector.port}/v1/tlsrpt")
    lab.publish("mail.test", "mailto:tls-reports@reports.lab.test")
    (la, sa), (lb, sb) = node(lab, stores[0], "node-a", 1), node(lab, stores[1], "node-b", 2)
    record(la, ok=5, failed=2, mail=2)
    record(lb, ok=3, failed=1, mail=3)
    await asyncio.gather(la.flush(), lb.flush())  # at once: the same rows, summed

    lab.clock.t = NEXT_MORNING
    await asyncio.gather(sa.daily("2026-11-23"), sb.daily("2026-11-23"))

    posts = [s for s in lab.collector.seen if s.method == "POST"]
    assert len(posts) == 1
    obj = json.loads(gzip.decompress(posts[0].body))
    [pol] = obj["policies"]
    assert pol["summary"] == {"total-successful-session-count": 8,
                              "total-failure-session-count": 3}  # fmt: skip
    assert pol["failure-details"][0]["failed-session-count"] == 3

    assert len(lab.inject.sent) == 1
    data = lab.inject.sent[0][2]
    assert message_from_bytes(data)["TLS-Report-Domain"] == "mail.test"
    [(_ctype, _name, attachment)] = report_attachments(data)
    mailed = parse_report(attachment)
    assert (mailed.policy_domain, mailed.total_successful, mailed.total_failed) == (
        "mail.test",
        5,
        0,
    )

    for ledger in (la, lb):  # both nodes read the same state: done, one try each
        recs = {r.policy_domain: r for r in await ledger.reports(DAY)}
        assert set(recs) == {"https.test", "mail.test"}
        for rec in recs.values():
            assert rec.state is ReportState.DONE
            [d] = rec.deliveries
            assert d.attempts == 1
            assert d.status in (DeliveryStatus.DELIVERED, DeliveryStatus.QUEUED)
    assert recs["https.test"].report_id == obj["report-id"]

    # another round of both jobs (a retry pass, the next start) sends nothing again
    await asyncio.gather(sa.daily("2026-11-23"), sb.daily("2026-11-23"))
    assert len([s for s in lab.collector.seen if s.method == "POST"]) == 1
    assert len(lab.inject.sent) == 1


async def test_a_claimed_delivery_is_skipped_by_the_other_node_until_the_claim_expires(
    lab: Lab, stores: list[PgStore]
) -> None:
    (la, _sa), (lb, _sb) = node(lab, stores[0], "node-a", 1), node(lab, stores[1], "node-b", 2)
    uris = ["https://collector.lab.test/r"]
    rec = await la.save_report(DAY, "https.test", "rid-a", b"{}", uris)
    again = await lb.save_report(DAY, "https.test", "rid-b", b"[]", uris)
    assert again.report_id == "rid-a"  # one report, whichever node built second
    [d] = rec.deliveries
    now = lab.clock.t
    assert await la.claim_delivery(d, now + 60) is not None
    assert await lb.claim_delivery(d, now + 60) is None  # node A is trying it
    assert [x.uri for x in await lb.due_deliveries(now)] == []
    lab.clock.t = now + 61  # node A died during its try: the claim lapses
    assert [x.uri for x in await lb.due_deliveries(lab.clock.t)] == uris
    assert await lb.claim_delivery(d, lab.clock.t + 60) is not None
    await lb.update_delivery(DAY, "https.test", d.uri, DeliveryStatus.DELIVERED, attempts=1,
                             first_attempt=lab.clock.t)  # fmt: skip
    assert await la.claim_delivery(d, lab.clock.t + 60) is None  # sent: nothing to claim
    # a node whose discovery failed cannot mark the built report "no-record"
    await la.set_report_state(DAY, "https.test", ReportState.NO_RECORD)
    got = await lb.report(DAY, "https.test")
    assert got is not None and got.state is ReportState.DONE and got.report_id == "rid-a"


async def test_a_days_reports_wait_for_a_node_that_could_not_flush_before_midnight(
    lab: Lab, stores: list[PgStore]
) -> None:
    """Node B counted sessions in the last seconds of the day but could not write them
    (the database unreachable from it over midnight): node A's daily job leaves the day
    until B has flushed past the midnight, then one report carries both nodes' counts. A
    node that never comes back holds the day at most an hour."""
    lab.collector.route("collector.lab.test", "/v1/tlsrpt", Answer(201, b"", None))
    lab.publish("https.test", f"https://collector.lab.test:{lab.collector.port}/v1/tlsrpt")
    (la, sa), (lb, _sb) = node(lab, stores[0], "node-a", 1), node(lab, stores[1], "node-b", 2)
    midnight = T_DAY + 86400
    lab.clock.t = midnight - 30
    record(la, ok=5, failed=0, mail=0)
    record(lb, ok=3, failed=0, mail=0)
    await asyncio.gather(la.flush(), lb.flush())
    lab.clock.t = midnight - 5
    record(lb, ok=4, failed=1, mail=0)  # B's last sessions of the day
    stores[1].fail_writes = lambda: True
    lab.clock.t = midnight + 15
    with pytest.raises(StoreError):
        await lb.flush()
    assert lb.pending == 5  # kept in memory

    assert await sa.daily("2026-11-23", wait_for_nodes=True) is None  # waits for B
    assert [s for s in lab.collector.seen if s.method == "POST"] == []
    assert await la.reports(DAY) == []

    stores[1].fail_writes = None  # B reaches the database again and flushes
    lab.clock.t = midnight + 40
    await lb.flush()
    assert await sa.daily("2026-11-23", wait_for_nodes=True) is not None
    posts = [s for s in lab.collector.seen if s.method == "POST"]
    assert len(posts) == 1
    [pol] = json.loads(gzip.decompress(posts[0].body))["policies"]
    assert pol["summary"] == {"total-successful-session-count": 12,
                              "total-failure-session-count": 1}  # fmt: skip

    # a node that was counting before the next midnight and never returns
    lab.clock.t = midnight + 86400 - 20
    record(lb, ok=1, failed=0, mail=0)
    await lb.flush()  # its watermark: 20 s before the midnight; then it dies
    lab.clock.t = midnight + 86400 + 60
    assert not await la.settled(midnight + 86400, lab.clock.t)
    assert await la.settled(midnight + 86400, midnight + 86400 + 3600)
