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
codes, RFC 8460 result and policy types, recipient states, DNS types, authentication
results), or the operator's own list addresses: never an address or a domain from the
internet. The children of the fixed sets are bound once at ``init`` (their series exist
from the start, at 0), so counting is one dict lookup and ``inc``.
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
_bound: dict[str, dict[Any, Any]] = {}  # metric -> label values -> bound child
_dir: Path | None = None

# seconds; SMTP accept and store commits are fast, delivery attempts slow
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_CPU = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)  # one ARC seal

# the bounded label values (docs/contract.md, "Metrics")
DNS_TYPES = ("MX", "A", "AAAA", "TXT", "TLSA", "PTR")
DNS_OUTCOMES = ("ok", "nxdomain", "nodata", "servfail", "timeout", "error")
AUTH_RESULTS = {  # RFC 8601 section 2.7 result words of each method
    "spf": ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"),
    "dkim": ("pass", "fail", "neutral", "policy", "none", "temperror", "permerror"),
    "dmarc": ("pass", "fail", "none", "temperror", "permerror"),
    "arc": ("pass", "fail", "none"),
}
STS_OUTCOMES = ("ok", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")
TLSRPT_OUTCOMES = ("sent", "failed", "skipped")
TLSRPT_METHODS = ("https", "mailto")
LIST_OUTCOMES = ("distributed", "held", "rejected", "dropped")
RECIPIENT_RESULTS = ("delivered", "deferred", "failed")
# the destination domain as delivery found it: the transport policy the attempt ran
# under (RFC 7672 DANE, RFC 8461 MTA-STS, opportunistic), the lists (local), or no host
# to try (routing failed: NXDOMAIN, null MX, a DNS error)
DOMAIN_CLASSES = ("dane", "mta-sts", "opportunistic", "local", "unrouted")
_POLICY_CLASS = {"dane": "dane", "sts": "mta-sts", "none": "opportunistic"}


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
        "recipient outcomes of delivery attempts, by result and destination domain class",
        ["result", "domain_class"],
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
    _m["mtasts"] = Counter(
        "relay_mtasts_fetches_total",
        "MTA-STS policy fetches over HTTPS, by outcome (an RFC 8460 result type on failure)",
        ["outcome"],
        registry=None,
    )
    _m["dns"] = Counter(
        "relay_dns_queries_total",
        "DNS queries the relay's resolver sent (cache hits not counted), by type and outcome",
        ["type", "outcome"],
        registry=None,
    )
    _m["auth"] = Counter(
        "relay_auth_verdicts_total",
        "authentication results of the verdict stage, by method and result",
        ["method", "result"],
        registry=None,
    )
    _m["arc_seals"] = Counter(
        "relay_arc_seals_total", "ARC sets the seal stage added", registry=None
    )
    _m["arc_cpu"] = Histogram(
        "relay_arc_seal_cpu_seconds",
        "CPU time of one ARC seal (thread time of the job)",
        buckets=_CPU,
        registry=None,
    )
    _m["tlsrpt"] = Counter(
        "relay_tlsrpt_reports_total",
        "TLS-RPT report deliveries tried, by outcome and method",
        ["outcome", "method"],
        registry=None,
    )
    _m["list_posts"] = Counter(
        "relay_list_posts_total",
        "posts to a list's address, by outcome and list",
        ["outcome", "list"],
        registry=None,
    )
    _m["list_copies"] = Counter(
        "relay_list_copies_total", "member copies queued, by list", ["list"], registry=None
    )
    _bound.clear()
    _bound["recipients"] = {
        (r, c): _m["recipients"].labels(r, c) for r in RECIPIENT_RESULTS for c in DOMAIN_CLASSES
    }
    _bound["mtasts"] = {o: _m["mtasts"].labels(o) for o in STS_OUTCOMES}
    _bound["dns"] = {
        (t, o): _m["dns"].labels(t, o) for t in (*DNS_TYPES, "other") for o in DNS_OUTCOMES
    }
    _bound["auth"] = {
        (m, r): _m["auth"].labels(m, r) for m, results in AUTH_RESULTS.items() for r in results
    }
    _bound["tlsrpt"] = {
        (o, m): _m["tlsrpt"].labels(o, m) for o in TLSRPT_OUTCOMES for m in TLSRPT_METHODS
    }
    _bound["list_posts"] = {}
    _bound["list_copies"] = {}


def reset() -> None:
    """Metrics off again in this process (tests)."""
    global _dir
    _m.clear()
    _bound.clear()
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


def recipient(result: str, tls_policy: str, mx_host: str) -> None:
    """One recipient's outcome of an attempt (relay.model.AttemptResult's tls_policy and
    mx_host give the destination domain class)."""
    if not _m:
        return
    dclass = "local" if mx_host == "local" else _POLICY_CLASS.get(tls_policy, "unrouted")
    child = _bound["recipients"].get((result, dclass))
    if child is None:
        child = _bound["recipients"][result, dclass] = _m["recipients"].labels(result, dclass)
    child.inc()


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


def mtasts_fetch(result_type: Any = None) -> None:
    """One policy fetch: ``None`` when it gave a policy, else its RFC 8460 result type."""
    if _m:
        outcome = "ok" if result_type is None else str(result_type)
        child = _bound["mtasts"].get(outcome)
        (child or _bound["mtasts"]["sts-policy-fetch-error"]).inc()


def dns_query(rdtype: str, error: BaseException | None) -> None:
    """One query of the resolver: ``error`` is the DnsError it raised (None: an answer)."""
    if not _m:
        return
    kind = rdtype if rdtype in DNS_TYPES else "other"
    _bound["dns"][kind, "ok" if error is None else _dns_outcome(error)].inc()


def _dns_outcome(error: BaseException) -> str:
    from relay.errors import DnsBogus, DnsNoData, DnsNotFound, DnsTempFail

    if isinstance(error, DnsNotFound):
        return "nxdomain"
    if isinstance(error, DnsNoData):
        return "nodata"
    if isinstance(error, DnsBogus):
        return "servfail"  # the validating resolver's SERVFAIL
    if isinstance(error, DnsTempFail):
        detail = error.detail
        if detail == "timeout":
            return "timeout"
        if detail == "SERVFAIL":
            return "servfail"
    return "error"


def auth_verdict(results: Any) -> None:
    """One message's relay.auth.types.AuthResults: SPF, DMARC and ARC once each (when
    checked), DKIM once per signature ("none" for an unsigned message)."""
    if not _m:
        return
    bound = _bound["auth"]
    if results.spf is not None:
        bound["spf", str(results.spf.result)].inc()
    for d in results.dkim or ():
        child = bound.get(("dkim", d.result))
        (child or bound["dkim", "permerror"]).inc()
    if not results.dkim:
        bound["dkim", "none"].inc()
    if results.dmarc is not None:
        bound["dmarc", str(results.dmarc.result)].inc()
    if results.arc is not None:
        bound["arc", str(results.arc.cv)].inc()


def arc_verdict(cv: Any) -> None:
    """The ARC chain's cv when only ARC is validated (``[auth]`` off)."""
    if _m:
        _bound["auth"]["arc", str(cv)].inc()


def arc_seal(cpu_seconds: float) -> None:
    if _m:
        _m["arc_seals"].inc()
        _m["arc_cpu"].observe(cpu_seconds)


def tlsrpt_report(outcome: str, uri: str) -> None:
    """One delivery try of a report to one rua URI: sent, failed or skipped."""
    if _m:
        method = "mailto" if uri[:7].lower() == "mailto:" else "https"
        _bound["tlsrpt"][outcome, method].inc()


def list_post(outcome: str, address: str) -> None:
    """A post to the list ``address`` (the configured one): distributed, held,
    rejected (refused at SMTP) or dropped (automatic mail, never distributed)."""
    if not _m:
        return
    posts = _bound["list_posts"]
    child = posts.get((outcome, address))
    if child is None:
        child = posts[outcome, address] = _m["list_posts"].labels(outcome, address)
    child.inc()


def list_copies(address: str, n: int) -> None:
    if not _m or n <= 0:
        return
    copies = _bound["list_copies"]
    child = copies.get(address)
    if child is None:
        child = copies[address] = _m["list_copies"].labels(address)
    child.inc(n)


class QueueCollector:
    """relay_queue_recipients{state}, relay_queue_oldest_seconds and
    relay_mtasts_cached_policies, read from the store at each scrape."""

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
        policies = GaugeMetricFamily(
            "relay_mtasts_cached_policies", "MTA-STS policies in the durable cache"
        )
        cached = 0
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
                cached = _cached_policies(conn)
            finally:
                conn.close()
        except sqlite3.Error:
            pass
        for state, n in counts.items():
            depth.add_metric([state], n)
        oldest.add_metric([], max(0.0, time.time() - first) if first is not None else 0.0)
        policies.add_metric([], cached)
        yield depth
        yield oldest
        yield policies


def _cached_policies(conn: sqlite3.Connection) -> int:
    """Rows of the MTA-STS cache; 0 when it was never created (MTA-STS off)."""
    try:
        return int(conn.execute("SELECT count(*) FROM mtasts_policy").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def render(store: Path) -> tuple[bytes, str]:
    """The Prometheus text exposition of every process's metrics and the queue."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if _dir is not None:
        MultiProcessCollector(registry, path=str(_dir))  # type: ignore[no-untyped-call]
    registry.register(QueueCollector(store))
    return generate_latest(registry), CONTENT_TYPE_LATEST
