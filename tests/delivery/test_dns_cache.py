"""CachingResolver over the real lab DNS server: TTL-bounded positive and negative
caching, temporary failures never kept, concurrent queries shared."""

from __future__ import annotations

import asyncio

import pytest

from relay.dns import (
    CachingResolver,
    DnspythonResolver,
    MxRecord,
    StaticResolver,
    addresses,
    peek_pair,
)
from relay.errors import DnsNoData, DnsNotFound, DnsTempFail
from relay.lab.dnsserver import LabDnsServer, Zone


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_answers_kept_for_their_ttl_at_most_the_cap() -> None:
    zone = Zone()
    zone.add("d.test", "MX", (10, "mx.d.test"))
    zone.add("mx.d.test", "A", "192.0.2.1")
    clock = Clock()
    with LabDnsServer(zone) as dns:
        inner = DnspythonResolver([dns.address], timeout=2.0)
        res = CachingResolver(inner, max_ttl=30, clock=clock)
        assert await res.mx("d.test") == [MxRecord(10, "mx.d.test")]
        assert await res.a("MX.d.test.") == ["192.0.2.1"]
        assert await res.a("mx.d.test") == ["192.0.2.1"]
        clock.now += 29
        assert await res.a("mx.d.test") == ["192.0.2.1"]
        assert (res.misses, res.hits) == (2, 2)
        clock.now += 2  # past the cap (the lab's TTL is 60)
        assert await res.a("mx.d.test") == ["192.0.2.1"]
        assert (res.misses, res.hits) == (3, 2)
        uncapped = CachingResolver(DnspythonResolver([dns.address], timeout=2.0), clock=clock)
        await uncapped.mx("d.test")
        clock.now += 59
        await uncapped.mx("d.test")
        assert uncapped.misses == 1
        clock.now += 2  # past the record's own TTL
        await uncapped.mx("d.test")
        assert uncapped.misses == 2


async def test_zone_changes_seen_after_expiry() -> None:
    inner = StaticResolver({("d.test", "A"): ["192.0.2.1"]})
    clock = Clock()
    res = CachingResolver(inner, max_ttl=10, clock=clock)
    assert await res.a("d.test") == ["192.0.2.1"]
    inner.records[("d.test", "A")] = ["192.0.2.2"]
    assert await res.a("d.test") == ["192.0.2.1"]
    clock.now += 11
    assert await res.a("d.test") == ["192.0.2.2"]


async def test_negative_answers_kept_briefly_failures_never() -> None:
    inner = StaticResolver({("d.test", "A"): ["192.0.2.1"], ("bad.test", "A"): "SERVFAIL"})
    clock = Clock()
    res = CachingResolver(inner, negative_ttl=5, clock=clock)
    with pytest.raises(DnsNoData):
        await res.aaaa("d.test")
    with pytest.raises(DnsNotFound):
        await res.a("none.test")
    inner.add("d.test", "AAAA", "2001:db8::1")
    inner.add("none.test", "A", "192.0.2.9")
    for _ in range(2):
        with pytest.raises(DnsNoData):
            await res.aaaa("d.test")
        with pytest.raises(DnsNotFound):
            await res.a("none.test")
    assert len(inner.queries) == 2
    clock.now += 6
    assert await res.aaaa("d.test") == ["2001:db8::1"]
    assert await res.a("none.test") == ["192.0.2.9"]

    with pytest.raises(DnsTempFail):
        await res.a("bad.test")
    inner.records[("bad.test", "A")] = ["192.0.2.3"]
    assert await res.a("bad.test") == ["192.0.2.3"]  # the failure was not kept


async def test_negative_answer_from_the_lab_server() -> None:
    zone = Zone()
    zone.add("d.test", "A", "192.0.2.1")
    with LabDnsServer(zone) as dns:
        res = CachingResolver(DnspythonResolver([dns.address], timeout=2.0))
        for _ in range(3):
            with pytest.raises(DnsNoData):
                await res.aaaa("d.test")
            with pytest.raises(DnsNotFound):
                await res.mx("none.test")
        assert res.misses == 2
        zone.fail("bad.test", "SERVFAIL")
        for _ in range(2):
            with pytest.raises(DnsTempFail):
                await res.a("bad.test")
        assert res.misses == 4


async def test_concurrent_queries_share_one_lookup_and_callers_own_their_lists() -> None:
    inner = StaticResolver({("d.test", "A"): ["192.0.2.1", "192.0.2.2"]})
    res = CachingResolver(inner)
    answers = await asyncio.gather(*(res.a("d.test") for _ in range(10)))
    assert inner.queries == [("d.test", "A")]
    assert all(a == ["192.0.2.1", "192.0.2.2"] for a in answers)
    answers[0].clear()
    assert await res.a("d.test") == ["192.0.2.1", "192.0.2.2"]
    assert inner.queries == [("d.test", "A")]


async def test_addresses_from_a_fresh_cache_pair_match_a_lookup_and_expire() -> None:
    """``addresses`` takes both families from the cache when both are fresh (no lookup
    tasks), with the same answers and errors as the lookups give; one family expired
    sends both to the resolver again."""
    inner = StaticResolver({("v4.test", "A"): ["192.0.2.1"]})
    clock = Clock()
    res = CachingResolver(inner, max_ttl=10, negative_ttl=5, clock=clock)
    assert peek_pair(res, "v4.test") is None
    assert await addresses(res, "v4.test") == ["192.0.2.1"]  # AAAA: no data, kept 5 s
    pair = peek_pair(res, "V4.test.")
    assert pair is not None and isinstance(pair[1], DnsNoData)
    misses = res.misses
    inner.records[("v4.test", "A")] = ["192.0.2.9"]
    assert await addresses(res, "v4.test") == ["192.0.2.1"]
    assert res.misses == misses
    with pytest.raises(DnsNotFound):
        await addresses(res, "gone.test")
    with pytest.raises(DnsNotFound):  # the cached NXDOMAIN pair, raised the same way
        await addresses(res, "gone.test")
    clock.now += 6  # the AAAA denial expired, the A answer not yet
    assert peek_pair(res, "v4.test") is None
    assert await addresses(res, "v4.test") == ["192.0.2.1"]
    clock.now += 5
    assert await addresses(res, "v4.test") == ["192.0.2.9"]
    assert peek_pair(StaticResolver({}), "v4.test") is None  # a resolver without a cache
