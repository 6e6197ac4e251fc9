"""Prometheus metrics (prometheus_client), summed across worker processes.

Multiprocess mode, not an aggregation through the leader: the workers are forked from
``relay serve``, any of them counts, and the one serving ``/metrics`` (the leader's HTTP
listener) reads every process's counters from the shared directory
(``<storage.path>.metrics/``, emptied at start) with ``MultiProcessCollector``. A worker
that dies keeps its counts in the sum (they are totals), and nothing has to travel between
processes on the hot path. Queue depth is not counted at all: it is read from the store
at each scrape (one query), so it is right whichever process asks.

Every function here is a no-op until ``init`` (``relay serve`` calls it), so tests and
commands pay nothing. Label values come from small fixed sets (outcome words, reply
codes, RFC 8460 result and policy types, recipient states): never an address or a domain.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_m: dict[str, Any] = {}
_dir: Path | None = None

# seconds; SMTP accept and store commits are fast, delivery attempts slow
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def directory_for(store: Path) -> Path:
    return store.with_name(store.name + ".metrics")


def init(directory: Path) -> None:
    """Turn metrics on for this process and the workers it forks: an empty directory for
    the per-process files, then the metrics themselves."""
    global _dir
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    from prometheus_client import Counter, Histogram, values

    # the value class is chosen when prometheus_client is imported: set it here, so the
    # files are written even if something imported it before the directory was known

    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _dir = directory
    _m.clear()
    _m["sessions"] = Counter(
        "relay_smtp_sessions_total", "SMTP connections accepted", registry=None
    )
    _m["messages"] = Counter(
        "relay_smtp_messages_total",
        "SMTP transactions ended at DATA, by outcome and reply code",
        ["outcome", "code"],
        registry=None,
    )
    _m["accept"] = Histogram(
        "relay_smtp_accept_seconds",
        "MAIL FROM to the reply after DATA",
        buckets=_FAST,
        registry=None,
    )
    _m["recipients"] = Counter(
        "relay_delivery_recipients_total",
        "recipient outcomes of delivery attempts",
        ["result"],
        registry=None,
    )
    _m["attempt"] = Histogram(
        "relay_delivery_attempt_seconds",
        "one delivery attempt (one destination domain of one message)",
        buckets=_SLOW,
        registry=None,
    )
    _m["commit"] = Histogram(
        "relay_store_commit_seconds",
        "one group commit (fsync included)",
        buckets=_FAST,
        registry=None,
    )
    _m["tls"] = Counter(
        "relay_tls_outcomes_total",
        "TLS outcome of each outbound session, by RFC 8460 result and policy type",
        ["result", "policy_type"],
        registry=None,
    )


def reset() -> None:
    """Metrics off again in this process (tests)."""
    global _dir
    _m.clear()
    _dir = None
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from prometheus_client import values

    values.ValueClass = values.MutexValue


def enabled() -> bool:
    return bool(_m)


def smtp_session() -> None:
    if _m:
        _m["sessions"].inc()


def smtp_message(reply: str, started: float | None) -> None:
    """One transaction ended with ``reply`` (after DATA); ``started``: monotonic MAIL."""
    if not _m:
        return
    code = reply[:3] if reply[:3].isdigit() else "000"
    outcome = {"2": "accepted", "4": "deferred"}.get(code[0], "rejected")
    _m["messages"].labels(outcome, code).inc()
    if started is not None:
        _m["accept"].observe(max(0.0, time.monotonic() - started))


def recipient(result: str) -> None:
    if _m:
        _m["recipients"].labels(result).inc()


def attempt(seconds: float) -> None:
    if _m:
        _m["attempt"].observe(seconds)


def commit(seconds: float) -> None:
    if _m:
        _m["commit"].observe(seconds)


def counting_tls(sink: Callable[[Any], None] | None) -> Callable[[Any], None] | None:
    """The courier's TLS outcome sink, counting each outcome before passing it on."""
    if not _m:
        return sink

    def record(outcome: Any) -> None:
        result = outcome.result_type.value if outcome.result_type is not None else "success"
        _m["tls"].labels(result, outcome.policy_type.value).inc()
        if sink is not None:
            sink(outcome)

    return record


class QueueCollector:
    """relay_queue_recipients{state} and relay_queue_oldest_seconds, read at scrape."""

    def __init__(self, store: Path) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "relay_queue_recipients", "recipients in the queue by state", labels=["state"]
        )
        oldest = GaugeMetricFamily(
            "relay_queue_oldest_seconds", "age of the oldest message with a pending recipient"
        )
        counts = {"queued": 0, "inflight": 0, "deferred": 0}
        first = None
        try:
            conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=5)
            try:
                for state, n, created in conn.execute(
                    "SELECT r.state, count(*), min(m.created) FROM queue_recipients r"
                    " JOIN queue_messages m ON m.id=r.qid"
                    " WHERE r.state IN ('queued','inflight','deferred') GROUP BY r.state"
                ):
                    counts[state] = n
                    first = created if first is None else min(first, created)
            finally:
                conn.close()
        except sqlite3.Error:
            pass
        for state, n in counts.items():
            depth.add_metric([state], n)
        oldest.add_metric([], max(0.0, time.time() - first) if first is not None else 0.0)
        yield depth
        yield oldest


def render(store: Path) -> tuple[bytes, str]:
    """The Prometheus text exposition of every process's metrics and the queue."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if _dir is not None:
        MultiProcessCollector(registry, path=str(_dir))  # type: ignore[no-untyped-call]
    registry.register(QueueCollector(store))
    return generate_latest(registry), CONTENT_TYPE_LATEST
