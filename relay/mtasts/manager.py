"""MTA-STS policy for a recipient domain, as delivery needs it (RFC 8461 sections 3.3, 5, 10).

``PolicyManager.get_policy(domain) -> relay.model.TlsPolicy``:

1. Read the cached policy (the durable cache); only an unexpired one may apply.
2. Look up the TXT record. On a lookup failure or no record, keep using the unexpired
   cached policy (3.3, 10: a DNS attacker must not be able to switch it off); without
   one, there is no policy.
3. Same id as the cached policy: use the cache (no HTTPS). A new id, or no cache:
   fetch, unless a fetch for this id failed less than ``failed_fetch_backoff`` ago.
4. A failed fetch keeps the unexpired cached policy; without one the result is "no
   policy" with ``fetch_error`` set (sts-policy-fetch-error / sts-policy-invalid /
   sts-webpki-invalid) so delivery is opportunistic and TLS-RPT hears of it.
5. The cache cannot be read (a ``StoreError``: SQLITE_BUSY past the timeout, an I/O
   error): whether an unexpired policy is cached is unknown, so "no policy" would be a
   guess an attacker who hides the TXT record wins. Only a policy fetched now may apply;
   without one ``get_policy`` raises ``CacheUnavailable`` and delivery defers (4.7.0),
   never downgrades (RFC 8461 section 5, sections 3.3 and 10.2).

Concurrent calls for one domain share one lookup (single flight), and a refresh of a
domain never runs at the same time as a lookup of it. Across processes and nodes sharing
the cache (PostgreSQL: relay.mtasts.cache_pg) a fetch is leased per domain: one fetches,
the others wait for the lease to go and take the policy (or the failure) it stored, so a
policy is fetched once per change or refresh, whatever the number of nodes.
``run_refresher`` renews cached policies in the background (relay.mtasts.refresher).
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from relay import metrics
from relay.config import Config
from relay.dns import Resolver
from relay.errors import PolicyError, StoreError
from relay.http import SafeHttpClient
from relay.model import TlsPolicy, TlsResultType
from relay.mtasts.cache import CachedPolicy, CacheUnavailable, FetchFailure, open_cache
from relay.mtasts.fetch import (
    DiscoveryStatus,
    PolicyFetchError,
    discover,
    fetch_policy,
    policy_domain,
)
from relay.mtasts.policy import StsPolicy
from relay.mtasts.refresher import PolicyRefresher

log = structlog.get_logger("relay.mtasts")

LEASE_SLACK = 10.0  # a fetch lease outlives fetch_timeout by this much (a dead holder's)
WAIT_POLL = 0.05  # seconds between looks at another node's fetch lease


@dataclass
class StsCounters:
    lookups: int = 0  # get_policy calls that did the work (not joined to another)
    txt_failures: int = 0  # TXT lookups that failed temporarily
    cache_hits: int = 0  # a cached policy was used
    fetches: int = 0  # HTTPS fetches attempted
    fetch_failures: int = 0
    refusals: int = 0  # fetched but refused: invalid policy or certificate
    backoff_skips: int = 0  # a fetch not tried because the last one for the id failed
    stale_kept: int = 0  # a cached policy kept because DNS or the fetch failed
    cache_unavailable: int = 0  # lookups refused because the cache could not be read
    shared_fetches: int = 0  # a policy (or failure) another process or node fetched

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def to_tls_policy(cp: CachedPolicy) -> TlsPolicy:
    return policy_to_tls(cp.domain, cp.policy_id, cp.policy)


def policy_to_tls(domain: str, policy_id: str, policy: StsPolicy) -> TlsPolicy:
    return TlsPolicy(
        domain=domain,
        mode=policy.mode,
        mx_patterns=policy.mx,
        max_age=policy.max_age,
        policy_id=policy_id,
        policy_strings=policy.policy_strings,
    )


class PolicyManager:
    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        store: Any,
        http_client: SafeHttpClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``store``: the SQLite ``Store`` or a ``PgStore`` (relay.mtasts.cache.open_cache)."""
        self.config = config
        self.cfg = config.mta_sts
        self.resolver = resolver
        self.http = http_client
        self.clock = clock
        self.cache = open_cache(store)
        self.owner = f"{config.server.node_id}:{os.getpid()}:{secrets.token_hex(4)}"
        self.counters = StsCounters()
        self._inflight: dict[str, asyncio.Task[TlsPolicy]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.refresher = PolicyRefresher(
            self.cache,
            self.refresh_domain,
            interval=self.cfg.refresh_interval,
            concurrency=self.cfg.refresh_concurrency,
            clock=clock,
        )

    @classmethod
    def from_config(
        cls,
        config: Config,
        resolver: Resolver,
        store: Any,
        clock: Callable[[], float] = time.time,
    ) -> PolicyManager:
        """The manager with its verified-HTTPS client as ``[delivery] ca_file`` and
        ``[http] allow_private_addresses`` say (the relay and `relay policy-server`)."""
        http = SafeHttpClient(
            resolver,
            ca_file=config.delivery.ca_file,
            allow_private=config.http.allow_private_addresses,
            timeout=config.mta_sts.fetch_timeout,
        )
        return cls(config, resolver, store, http, clock=clock)

    # ------------------------------------------------------------------ public

    async def get_policy(self, domain: str) -> TlsPolicy:
        """The MTA-STS policy delivery must apply to domain. Never raises for DNS, HTTP or
        policy failures (they give "no policy" or the cached policy). Raises
        ``CacheUnavailable`` when the cache cannot be read and no policy could be fetched
        now: the caller must defer, not deliver as if there were no policy."""
        if not self.cfg.enabled:
            return TlsPolicy(domain=domain)
        try:
            d = policy_domain(domain)
        except PolicyError:
            return TlsPolicy(domain=domain)
        task = self._inflight.get(d)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._locked_lookup(d))
            self._inflight[d] = task
            task.add_done_callback(functools.partial(self._forget, d))
        return await asyncio.shield(task)

    async def run_refresher(self, stop: asyncio.Event) -> None:
        """Background renewal until stop is set (see relay.mtasts.refresher)."""
        await self.refresher.run(stop)

    async def refresh_once(self) -> dict[str, int]:
        return await self.refresher.run_once()

    async def refresh_domain(self, domain: str) -> str:
        """Renew one cached domain. Outcome: unchanged (TXT id same, no fetch: only
        checked_at moves, the expiry stays fetched_at + max_age, RFC 8461 section 3.2),
        refetched (same id, but the policy would expire before the next run: fetched
        again, the only way to renew it), updated (new id fetched), failed, backoff,
        kept (DNS gave nothing; the cache stays), removed (expired and no record any
        more), gone (not cached)."""
        async with self._lock(domain):
            return await self._refresh(domain)

    # ------------------------------------------------------------------ lookup

    def _forget(self, d: str, t: asyncio.Task[TlsPolicy]) -> None:
        if self._inflight.get(d) is t:
            del self._inflight[d]
        if not t.cancelled() and t.exception() is not None:
            if isinstance(t.exception(), CacheUnavailable):
                return  # logged where it happened; the courier defers
            log.error("mtasts_lookup_crashed", domain=d, error=repr(t.exception()))

    def _lock(self, d: str) -> asyncio.Lock:
        lock = self._locks.get(d)
        if lock is None:
            lock = self._locks[d] = asyncio.Lock()
        return lock

    async def _locked_lookup(self, d: str) -> TlsPolicy:
        async with self._lock(d):
            try:
                return await self._lookup(d)
            except CacheUnavailable:
                raise
            except Exception as exc:  # a bug or an unexpected resolver error
                log.error("mtasts_lookup_failed", domain=d, error=repr(exc))
                cached = await self._cached(d)
                if cached is not None and cached.fresh(self.clock()):
                    return self._hit(cached, "lookup-failed")
                return TlsPolicy(domain=d)

    async def _cached(self, d: str) -> CachedPolicy | None:
        """The cached row, None when there is none. A read that fails raises
        CacheUnavailable: "unknown" must never read as "not cached" (RFC 8461 section 5)."""
        try:
            return await self.cache.get(d)
        except StoreError as exc:
            self.counters.cache_unavailable += 1
            log.error("mtasts_cache_read_failed", domain=d, error=str(exc))
            raise CacheUnavailable(d, str(exc)) from exc

    def _hit(self, cp: CachedPolicy, why: str) -> TlsPolicy:
        self.counters.cache_hits += 1
        if why != "id-unchanged":
            self.counters.stale_kept += 1
        log.debug("mtasts_cache_hit", domain=cp.domain, id=cp.policy_id, why=why)
        return to_tls_policy(cp)

    async def _lookup(self, d: str) -> TlsPolicy:
        self.counters.lookups += 1
        now = self.clock()
        try:
            cached = await self._cached(d)
        except CacheUnavailable as exc:
            return await self._without_cache(d, exc)
        live = cached if cached is not None and cached.fresh(now) else None
        disc = await discover(self.resolver, d)
        if disc.status is DiscoveryStatus.ERROR:
            self.counters.txt_failures += 1
            log.warning("mtasts_txt_failed", domain=d, reason=disc.reason, cached=live is not None)
            return self._hit(live, "txt-failed") if live else TlsPolicy(domain=d)
        if disc.status is DiscoveryStatus.NONE or disc.record is None:
            if live:
                log.warning("mtasts_txt_missing_cache_kept", domain=d, reason=disc.reason)
                return self._hit(live, "txt-missing")
            return TlsPolicy(domain=d)
        rid = disc.record.id
        if live and live.policy_id == rid:
            return self._hit(live, "id-unchanged")
        outcome, _ = await self._fetch(d, rid)
        if isinstance(outcome, CachedPolicy):
            return to_tls_policy(outcome)
        if live:
            return self._hit(live, "fetch-failed")
        return TlsPolicy(
            domain=d,
            policy_id=rid,
            fetch_error=outcome.result_type,
            fetch_error_reason=outcome.reason,
        )

    async def _without_cache(self, d: str, unavailable: CacheUnavailable) -> TlsPolicy:
        """The cache cannot be read. RFC 8461 section 5 (and 3.3, 10.2): a cached
        unexpired policy MUST be applied even when discovery fails, so with the cache
        unknown, neither a missing TXT record nor a failed fetch may mean "no policy".
        Only a policy fetched over verified HTTPS now (3.3) may apply; else the lookup
        fails closed and delivery defers."""
        disc = await discover(self.resolver, d)
        if disc.status is DiscoveryStatus.FOUND and disc.record is not None:
            outcome, _ = await self._fetch(d, disc.record.id)
            if isinstance(outcome, CachedPolicy):
                log.warning("mtasts_cache_unreadable_fetched", domain=d, id=outcome.policy_id)
                return to_tls_policy(outcome)
            why = f"{unavailable.reason}; policy fetch failed: {outcome.reason}"
        else:
            why = f"{unavailable.reason}; TXT {disc.status.value}"
        log.error("mtasts_fail_closed", domain=d, reason=why)
        raise CacheUnavailable(d, why)

    async def _fetch(self, d: str, rid: str) -> tuple[CachedPolicy | FetchFailure, bool]:
        """Fetch and cache the policy for id rid, honouring the per-id back-off.
        The bool says whether a fetch was attempted."""
        now = self.clock()
        try:
            last = await self.cache.last_failure(d, rid)
        except StoreError as exc:
            log.error("mtasts_cache_read_failed", domain=d, error=str(exc))
            last = None
        if last is not None and now - last.failed_at < self.cfg.failed_fetch_backoff:
            self.counters.backoff_skips += 1
            log.info("mtasts_fetch_backoff", domain=d, id=rid, failed_at=last.failed_at)
            return last, False
        leased = await self._claim(d)
        if not leased:
            shared = await self._wait_for_other(d, rid)
            if shared is not None:
                return shared
        try:
            return await self._fetch_now(d, rid)
        finally:
            if leased:
                try:
                    await self.cache.release_fetch(d, self.owner)
                except StoreError as exc:  # it expires by itself
                    log.error("mtasts_cache_write_failed", domain=d, error=str(exc))

    async def _claim(self, d: str) -> bool:
        """The fetch lease on d. True also when the cache cannot be written (nobody else
        would learn of the fetch: fetch anyway, failing closed as the caller says)."""
        now = self.clock()
        until = now + self.cfg.fetch_timeout + LEASE_SLACK
        try:
            return await self.cache.claim_fetch(d, self.owner, now, until)
        except StoreError as exc:
            log.error("mtasts_cache_write_failed", domain=d, error=str(exc))
            return True

    async def _wait_for_other(
        self, d: str, rid: str
    ) -> tuple[CachedPolicy | FetchFailure, bool] | None:
        """Another process or node holds d's fetch lease: wait until it is gone, then take
        what the holder stored (a policy of id rid newer than before, or a failure for
        rid newer than before). None: nothing came (the holder died or fetched another
        id): fetch here."""
        try:
            before = await self.cache.get(d)
            failed = await self.cache.last_failure(d, rid)
            loop = asyncio.get_running_loop()
            give_up = loop.time() + self.cfg.fetch_timeout + LEASE_SLACK
            while loop.time() < give_up and await self.cache.fetch_claimed(d, self.clock()):
                await asyncio.sleep(WAIT_POLL)
            after = await self.cache.get(d)
            if after is not None and after.policy_id == rid and after != before:
                self.counters.shared_fetches += 1
                log.info("mtasts_fetch_shared", domain=d, id=rid)
                return after, True
            failure = await self.cache.last_failure(d, rid)
            if failure is not None and failure != failed:
                self.counters.shared_fetches += 1
                return failure, True
        except StoreError as exc:
            log.error("mtasts_cache_read_failed", domain=d, error=str(exc))
        return None

    async def _fetch_now(self, d: str, rid: str) -> tuple[CachedPolicy | FetchFailure, bool]:
        self.counters.fetches += 1
        try:
            policy = await fetch_policy(
                self.http, d, port=self.cfg.https_port, timeout=self.cfg.fetch_timeout
            )
        except PolicyFetchError as exc:
            self.counters.fetch_failures += 1
            metrics.mtasts_fetch(exc.result_type)
            if exc.result_type is not TlsResultType.STS_POLICY_FETCH_ERROR:
                self.counters.refusals += 1
            failure = FetchFailure(d, rid, self.clock(), exc.result_type, exc.reason)
            log.warning(
                "mtasts_fetch_failed", domain=d, id=rid, result_type=str(exc.result_type),
                reason=exc.reason,
            )  # fmt: skip
            try:
                await self.cache.record_failure(failure)
            except StoreError as serr:
                log.error("mtasts_cache_write_failed", domain=d, error=str(serr))
            return failure, True
        metrics.mtasts_fetch()
        at = self.clock()
        cp = CachedPolicy(
            d, rid, policy, fetched_at=at, checked_at=at, expires_at=at + policy.max_age
        )
        log.info(
            "mtasts_fetched", domain=d, id=rid, mode=str(policy.mode), mx=list(policy.mx),
            max_age=policy.max_age,
        )  # fmt: skip
        try:
            await self.cache.put(cp)
        except StoreError as exc:
            log.error("mtasts_cache_write_failed", domain=d, error=str(exc))
        return cp, True

    # ------------------------------------------------------------------ refresh

    async def _refresh(self, d: str) -> str:
        cached = await self.cache.get(d)
        if cached is None:
            return "gone"
        now = self.clock()
        disc = await discover(self.resolver, d)
        if disc.status is DiscoveryStatus.FOUND and disc.record is not None:
            rid = disc.record.id
            if rid == cached.policy_id and cached.expires_at - now > self.cfg.refresh_interval:
                # RFC 8461 section 3.2: max_age counts "from the last policy fetch time".
                # An unchanged id says the policy did not change; it is no fetch, so the
                # expiry stays where the fetch put it (only checked_at moves)
                await self.cache.mark_checked(d, now)
                return "unchanged"
            # a new id (section 3.3: fetch it), or the same id expiring before the next
            # run: refetch it, since only a fetch may renew max_age (3.2), and the
            # cached policy is refreshed proactively before it lapses (3.3, 10.2)
            outcome, attempted = await self._fetch(d, rid)
            if isinstance(outcome, CachedPolicy):
                return "updated" if rid != cached.policy_id else "refetched"
            await self.cache.mark_checked(d, now)
            return "failed" if attempted else "backoff"
        if disc.status is DiscoveryStatus.NONE and not cached.fresh(now):
            await self.cache.delete(d)
            log.info("mtasts_cache_removed", domain=d, reason=disc.reason)
            return "removed"
        await self.cache.mark_checked(d, now)
        return "kept"
