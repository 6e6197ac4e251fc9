"""The durable policy cache and PolicyManager's use of it: id changes, failures, back-off,
restart, single flight. Real lab DNS and a real HTTPS policy host."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from relay.model import StsMode, TlsResultType
from relay.mtasts.cache import open_cache
from relay.store import Store
from tests.mtasts.conftest import StsLab, execute
from tests.mtasts.sts_https_server import Answer


def policy(mode: str = "enforce", mx: str = "mx.example.com", max_age: int = 86400) -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: {max_age}\n"


async def test_unchanged_id_skips_fetch_and_new_id_refetches(lab: StsLab, sts_store: Any) -> None:
    lab.publish("example.com", policy("testing"), "v1")
    m = lab.manager(sts_store)
    assert (await m.get_policy("example.com")).mode is StsMode.TESTING
    for _ in range(3):
        assert (await m.get_policy("example.com")).mode is StsMode.TESTING
    assert lab.fetches("example.com") == 1
    assert m.counters.cache_hits == 3

    lab.publish("example.com", policy("enforce", "new.example.com"), "v2")
    pol = await m.get_policy("example.com")
    assert (pol.mode, pol.mx_patterns, pol.policy_id) == (
        StsMode.ENFORCE,
        ("new.example.com",),
        "v2",
    )
    assert lab.fetches("example.com") == 2
    cached = await m.cache.get("example.com")
    assert cached is not None and cached.policy_id == "v2"
    assert cached.expires_at == lab.clock.now + 86400


async def test_failed_fetch_keeps_cache_and_backs_off_per_id(lab: StsLab, sts_store: Any) -> None:
    lab.publish("example.com", policy(), "v1")
    m = lab.manager(sts_store, failed_fetch_backoff=300)
    assert (await m.get_policy("example.com")).enforce
    lab.publish("example.com", None, "v2", answer=Answer(500, b"oops"))
    for _ in range(3):  # the old policy still applies; only one fetch for id v2
        pol = await m.get_policy("example.com")
        assert (pol.enforce, pol.policy_id, pol.fetch_error) == (True, "v1", None)
    assert lab.fetches("example.com") == 2
    assert m.counters.backoff_skips == 2
    lab.clock.advance(301)
    await m.get_policy("example.com")
    assert lab.fetches("example.com") == 3
    lab.publish("example.com", policy("testing"), "v2")  # repaired; still backing off
    assert (await m.get_policy("example.com")).enforce
    lab.clock.advance(301)
    assert (await m.get_policy("example.com")).mode is StsMode.TESTING
    assert lab.fetches("example.com") == 4


async def test_no_cache_failure_reports_result_type_and_backs_off(
    lab: StsLab, sts_store: Any
) -> None:
    lab.publish("example.com", None, "v1", answer=Answer(404, b""))
    m = lab.manager(sts_store)
    first = await m.get_policy("example.com")
    second = await m.get_policy("example.com")
    for pol in (first, second):
        assert (pol.mode, pol.fetch_error, pol.policy_id) == (
            None,
            TlsResultType.STS_POLICY_FETCH_ERROR,
            "v1",
        )
        assert "404" in pol.fetch_error_reason
    assert lab.fetches("example.com") == 1


async def test_cache_survives_restart_without_dns_or_policy_host(
    lab: StsLab, tmp_path: Path
) -> None:
    """Threats row 17: cache a policy, make TXT SERVFAIL / vanish and the host fail, restart."""
    lab.publish("example.com", policy(), "v1")
    path = tmp_path / "relay.sqlite3"
    store = Store(path).open()
    m = lab.manager(store)
    assert (await m.get_policy("example.com")).enforce
    store.close()

    lab.https.route("mta-sts.example.com", "/.well-known/mta-sts.txt", Answer(500, b""))
    lab.zone.remove("mta-sts.example.com")
    for failure in ("SERVFAIL", "NXDOMAIN", None):
        if failure is None:
            lab.zone.remove("_mta-sts.example.com")
        lab.zone.fail("_mta-sts.example.com", failure)
        store = Store(path).open()  # a restarted relay: new store, new manager
        try:
            m2 = lab.manager(store)
            pol = await m2.get_policy("example.com")
            assert (pol.enforce, pol.mx_patterns, pol.policy_id) == (
                True,
                ("mx.example.com",),
                "v1",
            )
            assert m2.counters.stale_kept == 1
        finally:
            store.close()
    assert lab.fetches("example.com") == 1


async def test_expired_cache_no_longer_applies(lab: StsLab, sts_store: Any) -> None:
    lab.publish("example.com", policy(max_age=600), "v1")
    m = lab.manager(sts_store)
    assert (await m.get_policy("example.com")).enforce
    lab.zone.fail("_mta-sts.example.com", "SERVFAIL")
    lab.clock.advance(599)
    assert (await m.get_policy("example.com")).enforce
    lab.clock.advance(2)
    pol = await m.get_policy("example.com")
    assert pol.mode is None and pol.fetch_error is None


async def test_concurrent_lookups_share_one_fetch(lab: StsLab, sts_store: Any) -> None:
    lab.publish("example.com", None, "v1", answer=Answer(200, policy().encode(), delay=0.3))
    m = lab.manager(sts_store)
    results = await asyncio.gather(*(m.get_policy("example.com") for _ in range(10)))
    assert all(r.enforce for r in results)
    assert lab.fetches("example.com") == 1
    assert m.counters.lookups == 1


async def test_corrupt_cache_row_is_ignored(lab: StsLab, sts_store: Any) -> None:
    lab.publish("example.com", policy(), "v1")
    m = lab.manager(sts_store)
    await m.get_policy("example.com")
    await execute(sts_store, "UPDATE mtasts_policy SET policy_text='mode: evil'")
    assert await open_cache(sts_store).get("example.com") is None
    assert await open_cache(sts_store).all() == []


async def test_disabled_means_no_policy(lab: StsLab, sts_store: Any) -> None:
    lab.publish("example.com", policy(), "v1")
    pol = await lab.manager(sts_store, enabled=False).get_policy("example.com")
    assert pol.mode is None
    assert lab.https.seen == []
