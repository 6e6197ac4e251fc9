"""relay.metrics at the event sites, one process: the resolver counts each query by type
and outcome against the real lab DNS server (answers, NXDOMAIN, no data, SERVFAIL, a
dropped query timing out), the seal stage counts ARC seals and their CPU time when the
seal runs in the crypto process pool, and nothing is counted (or costs) before init."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.auth.arc import SealerSpec, seal_async
from relay.auth.offload import make_crypto_pool
from relay.auth.types import ArcCv, ArcResult
from relay.commands.keygen import generate
from relay.dns import DnspythonResolver
from relay.errors import DnsError
from relay.lab.dnsserver import LabDnsServer, Zone
from tests.labutil import message


@pytest.fixture
def counting(tmp_path: Path) -> Iterator[Path]:
    metrics.init(tmp_path / "metrics")
    try:
        yield tmp_path / "relay.sqlite3"
    finally:
        metrics.reset()


def samples(store: Path, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = metrics.render(store)[0].decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and s.value
    }


async def test_dns_queries_by_type_and_outcome(counting: Path) -> None:
    zone = Zone()
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "192.0.2.1")
    zone.fail("broken.test", "SERVFAIL")
    zone.fail("silent.test", "DROP")
    with LabDnsServer(zone) as dns:
        resolver = DnspythonResolver([dns.address], timeout=1.0, tries=1)
        await resolver.mx("dest.test")
        await resolver.mx("dest.test")  # no cache here: asked twice
        await resolver.a("mx.dest.test")
        for name, rdtype in (
            ("mx.dest.test", "AAAA"),
            ("nowhere.test", "TXT"),
            ("broken.test", "TLSA"),
            ("silent.test", "A"),
        ):
            with pytest.raises(DnsError):
                await resolver.answer(name, rdtype)
    assert samples(counting, "relay_dns_queries_total") == {
        (("outcome", "ok"), ("type", "MX")): 2,
        (("outcome", "ok"), ("type", "A")): 1,
        (("outcome", "nodata"), ("type", "AAAA")): 1,
        (("outcome", "nxdomain"), ("type", "TXT")): 1,
        (("outcome", "servfail"), ("type", "TLSA")): 1,
        (("outcome", "timeout"), ("type", "A")): 1,
    }


async def test_arc_seals_in_the_process_pool_are_counted_with_cpu_time(counting: Path) -> None:
    key = generate("rsa", 2048)
    spec = SealerSpec("relay.lab.test", "arc", key.private_pem, "relay.lab.test")
    pool = make_crypto_pool(1)
    try:
        for _ in range(3):
            sealed = await seal_async(
                spec, message(), "relay.lab.test; spf=pass", ArcResult(ArcCv.NONE), executor=pool
            )
            assert sealed.raw.startswith(b"ARC-Seal: i=1;")
    finally:
        pool.shutdown()
    assert samples(counting, "relay_arc_seals_total") == {(): 3}
    assert samples(counting, "relay_arc_seal_cpu_seconds_count") == {(): 3}
    cpu = samples(counting, "relay_arc_seal_cpu_seconds_sum")[()]
    assert 0 < cpu < 1  # an RSA-2048 signature and two hashes, in the pool's process


def test_nothing_is_counted_before_init(tmp_path: Path) -> None:
    assert not metrics.enabled()
    metrics.dns_query("MX", None)
    metrics.arc_seal(0.1)
    metrics.list_post("distributed", "dev@lists.lab.test")
    metrics.tlsrpt_report("sent", "https://x.test/")
    metrics.mtasts_fetch()
    metrics.init(tmp_path / "metrics")
    try:
        assert samples(tmp_path / "none.sqlite3", "relay_dns_queries_total") == {}
        metrics.dns_query("SRV", None)  # a type outside the set is "other"
        assert samples(tmp_path / "none.sqlite3", "relay_dns_queries_total") == {
            (("outcome", "ok"), ("type", "other")): 1
        }
    finally:
        metrics.reset()
