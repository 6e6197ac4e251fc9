"""The TLS-RPT ledger: non-blocking counting, batched flushes, exact counts per key and
UTC day, restarts, store failures, and the report delivery state; over both stores
(``store_backend``: SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest

from relay.errors import StoreError
from relay.model import PolicyType, TlsOutcome, TlsResultType
from relay.tlsrpt.ledger import DeliveryStatus, ReportState, open_ledger
from tests.pg.backends import StoreBackend

DAY1 = 1795305600.0 + 3600  # 2026-11-22T01:00:00Z
DAY2 = DAY1 + 86400  # 2026-11-23


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ok(domain: str = "dest.test", mx: str = "mx1.dest.test") -> TlsOutcome:
    return TlsOutcome(domain, PolicyType.STS, mx, "192.0.2.1",
                      policy_strings=("version: STSv1", "mode: enforce", "mx: mx1.dest.test",
                                      "max_age: 86400"),
                      mx_patterns=("mx1.dest.test",), sending_mta_ip="198.51.100.1")  # fmt: skip


def bad(result: TlsResultType, mx: str = "mx1.dest.test", ip: str = "192.0.2.1",
        domain: str = "dest.test", reason: str = "x") -> TlsOutcome:  # fmt: skip
    return TlsOutcome(domain, PolicyType.NO_POLICY_FOUND, mx, ip, result, reason,
                      sending_mta_ip="198.51.100.1")  # fmt: skip


async def test_record_is_buffered_then_flushed_exactly(store_backend: StoreBackend) -> None:
    clock = Clock(DAY1)
    async with store_backend.open() as store:
        ledger = open_ledger(store, clock)
        writes = store.writes
        for _ in range(500):
            ledger.record(ok())
        for _ in range(7):
            ledger.record(bad(TlsResultType.STARTTLS_NOT_SUPPORTED))
        ledger.record(bad(TlsResultType.STARTTLS_NOT_SUPPORTED, ip="192.0.2.2"))
        ledger.record(bad(TlsResultType.CERTIFICATE_EXPIRED, domain="other.test"))
        assert store.writes == writes  # record() never touched the store
        assert ledger.pending == 509
        assert await ledger.flush() == 509
        assert store.writes == writes + 1  # one batch
        assert ledger.pending == 0
        rows = await ledger.counts("2026-11-22", "dest.test")
        succ = [r for r in rows if not r.result_type]
        assert len(succ) == 1 and succ[0].count == 500
        assert succ[0].mx_host == "" and succ[0].receiving_ip == ""  # not kept for successes
        assert succ[0].policy_strings[1] == "mode: enforce"
        assert succ[0].mx_patterns == ("mx1.dest.test",)
        fails = {(r.receiving_ip, r.result_type): r.count for r in rows if r.result_type}
        assert fails == {("192.0.2.1", "starttls-not-supported"): 7,
                         ("192.0.2.2", "starttls-not-supported"): 1}  # fmt: skip
        assert await ledger.domains("2026-11-22") == ["dest.test", "other.test"]
        # a second flush adds to the same rows
        ledger.record(ok())
        await ledger.flush()
        rows = await ledger.counts("2026-11-22", "dest.test")
        assert [r.count for r in rows if not r.result_type] == [501]


async def test_days_are_utc_days_of_the_clock(store_backend: StoreBackend) -> None:
    clock = Clock(DAY1)
    async with store_backend.open() as store:
        ledger = open_ledger(store, clock)
        ledger.record(ok())
        clock.t = DAY1 + 86400 - 3600 - 0.001  # 23:59:59.999 the same day
        ledger.record(ok())
        clock.t = DAY2 - 3600  # midnight: the next day
        ledger.record(ok())
        await ledger.flush()
        assert await ledger.days() == ["2026-11-22", "2026-11-23"]
        assert await ledger.days(before="2026-11-23") == ["2026-11-22"]
        assert [r.count for r in await ledger.counts("2026-11-22")] == [2]
        assert [r.count for r in await ledger.counts("2026-11-23")] == [1]


async def test_background_flush_and_restart(store_backend: StoreBackend) -> None:
    clock = Clock(DAY1)
    async with store_backend.open() as store:
        ledger = open_ledger(store, clock, flush_interval=0.02)
        task = asyncio.create_task(ledger.run())
        for _ in range(3):
            ledger.record(ok())
        for _ in range(100):
            if ledger.pending == 0:
                break
            await asyncio.sleep(0.02)
        assert ledger.pending == 0
        ledger.record(bad(TlsResultType.VALIDATION_FAILURE))  # left for close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ledger.close()
    async with store_backend.open() as store:  # a restart
        ledger = open_ledger(store, clock)
        rows = await ledger.counts("2026-11-22")
        assert sorted((r.result_type, r.count) for r in rows) == [
            ("", 3), ("validation-failure", 1)]  # fmt: skip
        ledger.record(ok())
        await ledger.close()
        rows = await ledger.counts("2026-11-22")
        assert sorted((r.result_type, r.count) for r in rows) == [
            ("", 4), ("validation-failure", 1)]  # fmt: skip


async def test_store_failure_keeps_counts_for_the_next_flush(store_backend: StoreBackend) -> None:
    async with store_backend.open() as store:
        ledger = open_ledger(store, Clock(DAY1))
        for _ in range(5):
            ledger.record(ok())
        store.fail_writes = lambda: True
        with pytest.raises(StoreError):
            await ledger.flush()
        assert ledger.pending == 5
        ledger.record(ok())  # still counting while the store is down
        store.fail_writes = None
        assert await ledger.flush() == 6
        assert [r.count for r in await ledger.counts("2026-11-22")] == [6]


async def test_report_state_survives_restart(store_backend: StoreBackend) -> None:
    clock = Clock(DAY2)
    async with store_backend.open() as store:
        ledger = open_ledger(store, clock)
        uris = ["https://c.example/r", "mailto:r@d.example"]
        rec = await ledger.save_report("2026-11-22", "Dest.Test", "rid-1", b"{}", uris)
        assert rec.state is ReportState.SENDING and rec.report_id == "rid-1"
        assert [d.status for d in rec.deliveries] == [DeliveryStatus.PENDING] * 2
        again = await ledger.save_report("2026-11-22", "dest.test", "rid-2", b"[]", uris)
        assert again.report_id == "rid-1"  # built once, never rebuilt
        assert len(await ledger.due_deliveries(clock.t)) == 2
        st = await ledger.update_delivery("2026-11-22", "dest.test", uris[0],
                                          DeliveryStatus.PENDING, attempts=1,
                                          first_attempt=clock.t, next_attempt=clock.t + 300,
                                          error="HTTP 500")  # fmt: skip
        assert st is ReportState.SENDING
        assert [d.uri for d in await ledger.due_deliveries(clock.t)] == [uris[1]]
        nxt = await ledger.next_due()
        assert nxt is not None and nxt <= clock.t  # the untried one is due now
        st = await ledger.update_delivery("2026-11-22", "dest.test", uris[1],
                                          DeliveryStatus.QUEUED, attempts=1,
                                          first_attempt=clock.t, qid="Q1")  # fmt: skip
        assert st is ReportState.SENDING
        await ledger.set_report_state("2026-11-22", "nope.test", ReportState.NO_RECORD)
    async with store_backend.open() as store:
        ledger = open_ledger(store, clock)
        rec2 = await ledger.report("2026-11-22", "dest.test")
        assert rec2 is not None and rec2.report_json == b"{}"
        by_uri = {d.uri: d for d in rec2.deliveries}
        assert by_uri[uris[0]].next_attempt == clock.t + 300
        assert by_uri[uris[0]].last_error == "HTTP 500"
        assert by_uri[uris[1]].status is DeliveryStatus.QUEUED and by_uri[uris[1]].qid == "Q1"
        assert await ledger.due_deliveries(clock.t) == []
        assert await ledger.due_deliveries(clock.t + 301) != []
        st = await ledger.update_delivery("2026-11-22", "dest.test", uris[0],
                                          DeliveryStatus.DELIVERED, attempts=2,
                                          first_attempt=clock.t)  # fmt: skip
        assert st is ReportState.DONE
        states = {(r.policy_domain, r.state) for r in await ledger.reports("2026-11-22")}
        assert states == {("dest.test", ReportState.DONE), ("nope.test", ReportState.NO_RECORD)}
        assert await ledger.prune("2026-11-23") > 0
        assert await ledger.reports() == []
