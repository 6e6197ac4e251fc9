"""Deliver one DeliveryJob (one destination domain's recipients of one message) to the
domain's MX hosts, under the domain's TLS policy (RFC 5321, RFC 3207, RFC 8461, RFC 8460).

Owns: trying the candidates in order (MX preference, then address) and doing what the
TLS decision says at each step. The decision itself (mode, in-policy check, level,
fail-closed) is ``relay.delivery.tlspolicy.decide``, a pure function with the RFC
section beside each branch; what it amounts to (RFC 8461 section 5):
- ``enforce``: an MX host not matching the policy's ``mx`` patterns is not a candidate
  (recorded as ``validation-failure`` / ``mx-host-not-in-policy``: RFC 8460 has no
  result type of its own for it); STARTTLS is required and the certificate must verify
  for the MX name; a failure moves to the next candidate; when none succeeds every
  recipient is deferred with 4.7.5, never bounced at once and never sent in clear;
- ``testing``: a verification pass on each host (what enforce would have refused is
  recorded), then delivery as opportunistic (a new connection when the verified
  handshake failed);
- ``none`` or no policy: opportunistic STARTTLS whenever offered, clear text when the
  handshake fails (as every MTA does);
- a policy with ``fetch_error``: delivered as its mode says, and the fetch error is
  recorded once per attempt;
- mail with "TLS-Required: no" (RFC 8689, ``job.tls_required`` False): enforce is
  treated as testing;
- the policy lookup fails (the MTA-STS cache unreadable: ``CacheUnavailable``, or any
  other error): every recipient is deferred with 451 4.7.0 and the reason, before any
  connection -- an unknown policy is never read as "no policy" (fail closed).

Before anything else, the outbound command guard (``guard.py``, threats row 3) fails
the recipients whose address cannot go on the wire as written (553 5.1.3; a bad sender:
553 5.1.7 for all). MX addresses on loopback that are not ours are refused unless
``allow_loopback`` (route.py; the lab).

One TlsOutcome per connection (TLS session) to an MTA, handed to the outcome sink when
``job.record_tls``; a reused connection gives no new outcome (RFC 8460 counts sessions);
a TCP connect failure gives none (it is no TLS result).

Also: connection reuse (an idle connection per (ip, port, MX name, TLS level) kept for a
few seconds, RSET before reuse, one retry on a new connection when a reused one fails
before MAIL is accepted), ``deliver_many`` (a scheduler lane's messages for one domain,
one after another on one connection under one slot, each next one's commands written
with the content before it), the global and per-domain concurrency limits and the
dead-destination breaker (destinations.py), one structlog line per failed attempt
(a successful one is logged at debug: the scheduler logs each recipient's outcome).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay import logs
from relay.config import Config
from relay.dane import policy as danepolicy
from relay.dane.lookup import DaneHost, route_dane
from relay.dane.policy import DaneState
from relay.dane.tlsa import match_chain
from relay.delivery import guard, requiretls, tlspolicy
from relay.delivery.client import (
    ConnectionLost,
    NextTransaction,
    SessionError,
    SmtpSession,
    StartTlsMissing,
    TlsFailed,
    Transaction,
    enhanced_code,
)
from relay.delivery.destinations import Destinations
from relay.delivery.route import MxHost, Route, mx_matches, resolve_route
from relay.delivery.tls import TlsContexts
from relay.delivery.tlspolicy import Action, Mode, Offer, PolicyMode, TlsDecision, TlsInputs
from relay.dns import Resolver
from relay.model import (
    AttemptResult,
    DeliveryJob,
    PolicyType,
    RecipientResult,
    RecipientState,
    SmtpReply,
    TlsOutcome,
    TlsPolicy,
    TlsResultType,
)

PolicyLookup = Callable[[str], Awaitable[TlsPolicy]]
OutcomeSink = Callable[[TlsOutcome], None]

log = logs.get("relay.delivery")

POOL_IDLE_SECONDS = 5.0  # an idle connection is kept this long for the next job
POOL_MAX_IDLE = 32  # idle connections kept in all
MAX_TRANSACTIONS_PER_CONNECTION = 100
MAX_CONNECTION_AGE = 300.0
MAX_ADDRESSES_PER_HOST = 2
# seconds a domain's MTA-STS lookup result is reused for its next messages (a list's
# thousands of copies): never an unavailable cache (that defers each time, RFC 8461
# section 5), only what the lookup returned; as stale as a DNS answer a second old
POLICY_MEMO_SECONDS = 1.0
POLICY_MEMO_MAX = 4096  # domains remembered at once


class _Miss:
    """No fresh memo: look the policy up."""


_MISS = _Miss()


# ---------------------------------------------------------------------- connection pool


@dataclass(slots=True)
class _Idle:
    session: SmtpSession
    since: float
    timer: asyncio.TimerHandle | None = None


class ConnectionPool:
    """Idle SMTP connections, keyed by (ip, port, MX name, TLS level), kept briefly."""

    def __init__(
        self,
        idle_timeout: float = POOL_IDLE_SECONDS,
        max_idle: int = POOL_MAX_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.clock = clock
        self._idle: dict[tuple[str, int, str, str], list[_Idle]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, ip: str, port: int, mx_host: str, levels: Sequence[str]) -> SmtpSession | None:
        for level in levels:
            entries = self._idle.get((ip, port, mx_host, level))
            while entries:
                idle = entries.pop()
                if idle.timer is not None:
                    idle.timer.cancel()
                if idle.session.connected and self.clock() - idle.since < self.idle_timeout:
                    return idle.session
                self._quit(idle.session)
        return None

    def put(self, session: SmtpSession) -> bool:
        if session.ahead:  # another transaction's commands are on the wire
            session.close()
            return False
        if self.idle_timeout <= 0 or not _reusable(session) or len(self) >= self.max_idle:
            self._quit(session)
            return False
        key = (session.ip, session.port, session.mx_host, session.level)
        idle = _Idle(session, self.clock())
        loop = asyncio.get_running_loop()
        idle.timer = loop.call_later(self.idle_timeout, self._expire, key, idle)
        self._idle.setdefault(key, []).append(idle)
        return True

    def _expire(self, key: tuple[str, int, str, str], idle: _Idle) -> None:
        entries = self._idle.get(key)
        if entries and idle in entries:
            entries.remove(idle)
            if not entries:
                del self._idle[key]
            self._quit(idle.session)

    def _quit(self, session: SmtpSession) -> None:
        if not session.connected:
            session.close()
            return
        task = asyncio.get_running_loop().create_task(session.quit(timeout=2.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        entries = [idle for v in self._idle.values() for idle in v]
        self._idle.clear()
        for idle in entries:
            if idle.timer is not None:
                idle.timer.cancel()
            self._quit(idle.session)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


# ---------------------------------------------------------------------- courier


@dataclass(slots=True)
class _Attempt:
    """Bookkeeping of one deliver() call."""

    job: DeliveryJob
    policy: TlsPolicy | None
    plan: TlsDecision  # the job-level TLS decision (tlspolicy.decide)
    log: Any
    outcomes: list[TlsOutcome] = field(default_factory=list)
    tls_refusals: list[str] = field(default_factory=list)  # enforce: why a host was refused
    connect_errors: list[str] = field(default_factory=list)
    sessions: int = 0  # sessions that got past the SMTP handshake
    dane: dict[str, DaneHost] = field(default_factory=dict)  # per MX host (RFC 7672)
    dane_refusals: list[str] = field(default_factory=list)  # why a DANE host was refused
    requiretls_refusals: list[str] = field(default_factory=list)  # RFC 8689 4.2.1 refusals
    # deliver_many: the session of a finished transaction is handed back, not pooled
    keep: bool = False
    kept: tuple[MxHost, SmtpSession] | None = None

    @property
    def mode(self) -> Mode:
        return self.plan.mode

    def decide(
        self,
        *,
        mx_in_policy: bool,
        offer: Offer = Offer.UNKNOWN,
        verifying: bool = False,
        failure: TlsResultType | None = None,
        reason: str = "",
    ) -> TlsDecision:
        return tlspolicy.decide(
            TlsInputs(
                _sts_mode(self.policy, self.job),
                tls_required_no=not self.job.tls_required,
                mx_in_policy=mx_in_policy,
                offer=offer,
                verifying=verifying,
                failure=failure,
                reason=reason,
            )
        )


@dataclass(frozen=True, slots=True)
class _Unavailable:
    """The policy lookup could not say what the policy is."""

    reason: str


class _DaneRefused(SessionError):
    """DANE (RFC 7672) refused this host: no STARTTLS, no TLS, or no TLSA match."""


class _DeadlineInTransaction(Exception):
    def __init__(self, host: str, ip: str) -> None:
        self.host = host
        self.ip = ip
        super().__init__(f"{host}[{ip}]")


class Courier:
    """Delivers DeliveryJobs; never raises for delivery problems."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        *,
        policy_lookup: PolicyLookup | None = None,
        outcome_sink: OutcomeSink | None = None,
        local_addresses: Collection[tuple[str, int]] = (),
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        idle_timeout: float = POOL_IDLE_SECONDS,
        allow_loopback: bool | None = None,
    ) -> None:
        d = config.delivery
        self.config = config
        self.resolver = resolver
        self.policy_lookup = policy_lookup
        # domain -> (expiry, the lookup that answered, its answer)
        self._policy_memo: dict[str, tuple[float, PolicyLookup, TlsPolicy]] = {}
        self.outcome_sink = outcome_sink
        self.local_addresses = tuple(local_addresses)
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self.tls = TlsContexts(d.ca_file)
        self.destinations = Destinations(
            concurrency=d.concurrency,
            per_domain=d.concurrency_per_domain,
            dead_after=d.dead_after,
            dead_backoff=d.dead_backoff,
            clock=clock,
        )
        self.pool = ConnectionPool(idle_timeout=idle_timeout)  # real time, like its timers
        # MX addresses on loopback that are not ours (threats row 30): refused, unless
        # allowed. ``[delivery] allow_loopback_mx`` when the config has it; without it,
        # allowed only when delivery.port is not 25 (SMTP delivery is always port 25:
        # another port is the lab, which runs every receiving MTA on 127.0.0.x)
        if allow_loopback is None:
            configured = getattr(d, "allow_loopback_mx", None)
            allow_loopback = d.port != 25 if configured is None else bool(configured)
        self.allow_loopback = allow_loopback

    def is_dead(self, domain: str) -> bool:
        """The destination is in its dead-destination back-off (see destinations.py)."""
        return self.destinations.is_dead(domain)

    async def close(self) -> None:
        """Close pooled connections (QUIT)."""
        await self.pool.close()

    # ------------------------------------------------------------------ deliver

    async def deliver(self, job: DeliveryJob) -> AttemptResult:
        return await self._guarded(job, self._deliver)

    async def deliver_many(
        self,
        next_job: Callable[[], DeliveryJob | None],
        done: Callable[[DeliveryJob, AttemptResult], None],
    ) -> None:
        """One domain's jobs of several messages (a list's copies, a burst of mail), taken
        with ``next_job`` until it has none, one after another under one slot of the
        domain: the first goes the whole way (route, policy, DANE, the TLS decision, a
        connection taken or opened); each next one with the same TLS inputs is sent on
        the session the one before it ended with, as a pooled connection would be reused,
        without routing again. Any other job (the guard refuses an address, REQUIRETLS,
        other TLS inputs, a policy with a fetch error, the session gone) takes the whole
        way too. ``done(job, result)`` is called as each transaction ends, so its outcome
        can be written while the next one is sent."""
        job = next_job()
        if job is None:
            return
        if self.is_dead(job.domain):
            while job is not None:
                done(job, await self.deliver(job))
                job = next_job()
            return
        kept: _Kept | None = None
        try:
            async with self.destinations.slot(job.domain):
                while job is not None:
                    res: AttemptResult | None = None
                    upcoming = next_job()  # its commands may follow this one's content
                    if kept is not None and _same_inputs(kept.att, job) and not _guard(job):
                        hand, kept = kept, None  # in a transaction: never pooled as idle
                        then = upcoming if _can_follow(hand, upcoming) else None
                        res, kept = await self._next_on(hand, job, then)
                    if res is None:
                        if kept is not None:
                            self.pool.put(kept.session)
                            kept = None
                        res, kept = await self._whole_way(job)
                    done(job, res)
                    job = upcoming
        finally:
            if kept is not None:
                self.pool.put(kept.session)

    async def _whole_way(self, job: DeliveryJob) -> tuple[AttemptResult, _Kept | None]:
        """deliver() inside the slot deliver_many holds; with the session it ended on."""
        attempts: list[_Attempt] = []

        async def run(job: DeliveryJob, blog: Any) -> AttemptResult:
            res, att = await self._deliver_slotted(job, blog, keep=True)
            if att is not None:
                attempts.append(att)
            return res

        res = await self._guarded(job, run)
        att = attempts[-1] if attempts else None
        if att is None or att.kept is None:
            return res, None
        return res, _Kept(att, *att.kept)

    async def _next_on(
        self, hand: _Kept, job: DeliveryJob, then: DeliveryJob | None = None
    ) -> tuple[AttemptResult | None, _Kept | None]:
        """The job's transaction on the session the job before it ended with (same domain,
        same TLS inputs: the same decision, the same host; a reused connection gives no
        new TLS outcome, RFC 8460). None when the session was lost before MAIL was
        accepted: the job then takes the whole way. ``then``: the job to be sent next on
        this session (its commands go out with this one's content)."""
        blog = log.bind(qid=job.qid, message_id=job.message_id, domain=job.domain)
        prev, host, session = hand.att, hand.host, hand.session
        att = _Attempt(job, prev.policy, prev.plan, blog, dane=prev.dane, keep=True)
        try:
            async with asyncio.timeout(self.config.delivery.attempt_timeout):
                tx = await _send(session, job, then)
        except TimeoutError:
            session.close()
            blog.warning("attempt_deadline", mx=host.name, ip=session.ip, phase="transaction")
            text = (
                f"451 4.4.2 {host.name}[{session.ip}] attempt deadline exceeded during the "
                "transaction"
            )
            return _all(job, RecipientState.DEFERRED, text, (), host.name), None
        except ConnectionLost as exc:
            session.close()
            blog.info("reused_connection_lost", mx=host.name, ip=session.ip, error=exc.detail)
            return None, None
        except asyncio.CancelledError:
            session.close()  # in the middle of a transaction: never reused
            raise
        except Exception as exc:  # noqa: BLE001 - the courier's boundary: defer, never lose
            session.close()
            blog.error("delivery_internal_error", error=f"{type(exc).__name__}: {exc}")
            return _all(job, RecipientState.DEFERRED, "451 4.3.0 internal error in delivery"), None
        att.sessions += 1
        res = self._finish(att, host, session, tx, True)
        return res, (_Kept(att, *att.kept) if att.kept is not None else None)

    async def _guarded(
        self, job: DeliveryJob, run: Callable[[DeliveryJob, Any], Awaitable[AttemptResult]]
    ) -> AttemptResult:
        blog = log.bind(qid=job.qid, message_id=job.message_id, domain=job.domain)
        refused = _guard(job)
        if refused:
            # threats row 3: an address that cannot go on the wire as written is a
            # permanent failure for it; nothing about it is written anywhere
            blog.warning(
                "address_refused",
                recipients=[repr(a) for a in refused],
                reply=next(iter(refused.values())).reply,
                outcome="failed",
            )
            if len(refused) == len(set(job.recipients)):
                return AttemptResult(job.domain, tuple(refused[a] for a in job.recipients))
            sendable = tuple(a for a in job.recipients if a not in refused)
            res = await self._boundary(dataclasses.replace(job, recipients=sendable), blog, run)
            got = {r.address: r for r in res.recipients}
            merged = tuple(refused.get(a) or got[a] for a in job.recipients)
            return dataclasses.replace(res, recipients=merged)
        return await self._boundary(job, blog, run)

    async def _boundary(
        self,
        job: DeliveryJob,
        blog: Any,
        run: Callable[[DeliveryJob, Any], Awaitable[AttemptResult]],
    ) -> AttemptResult:
        try:
            return await run(job, blog)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the courier's boundary: defer, never lose
            blog.error("delivery_internal_error", error=f"{type(exc).__name__}: {exc}")
            return _all(job, RecipientState.DEFERRED, "451 4.3.0 internal error in delivery")

    def _dead_result(self, job: DeliveryJob, blog: Any) -> AttemptResult:
        until = self.destinations.dead_until(job.domain) or self.clock()
        last = self.destinations.last_error(job.domain)
        text = (
            f"451 4.4.1 destination {job.domain} marked dead for "
            f"{max(0, round(until - self.clock()))}s" + (f" (last error: {last})" if last else "")
        )
        blog.info("destination_dead", recipients=list(job.recipients), reply=text)
        return _all(job, RecipientState.DEFERRED, text)

    async def _deliver(self, job: DeliveryJob, blog: Any) -> AttemptResult:
        if self.destinations.is_dead(job.domain):
            return self._dead_result(job, blog)
        async with self.destinations.slot(job.domain):
            res, _ = await self._deliver_slotted(job, blog)
            return res

    async def _deliver_slotted(
        self, job: DeliveryJob, blog: Any, *, keep: bool = False
    ) -> tuple[AttemptResult, _Attempt | None]:
        """The job's delivery in a slot of its domain; with ``keep``, the session of a
        finished transaction is left on the attempt (``kept``) instead of pooled."""
        if self.destinations.is_dead(job.domain):
            return self._dead_result(job, blog), None
        # the policy lookup runs alongside the MX lookup (maddy's PrepareDomain); a
        # policy held in memory is taken without a task
        policy_now = self._policy_cached(job.domain)
        routing = resolve_route(
            self.resolver,
            job.domain,
            port=self.config.delivery.port,
            local_addresses=self.local_addresses,
            max_mx=self.config.delivery.max_mx,
            rng=self.rng,
            allow_loopback=self.allow_loopback,
        )
        policy: TlsPolicy | None | _Unavailable
        if isinstance(policy_now, _Miss):
            route, policy = await asyncio.gather(routing, self._policy(job.domain, blog))
        else:
            route, policy = await routing, policy_now
        if isinstance(policy, _Unavailable):
            return self._unavailable(job, policy, blog), None
        plan = tlspolicy.decide(
            TlsInputs(_sts_mode(policy, job), tls_required_no=not job.tls_required)
        )
        att = _Attempt(job, policy, plan, blog, keep=keep)
        if policy is not None and policy.fetch_error is not None:
            self._emit(
                att,
                TlsOutcome(
                    policy_domain=job.domain,
                    policy_type=PolicyType.STS,
                    mx_host="",
                    result_type=policy.fetch_error,
                    failure_reason=policy.fetch_error_reason,
                    policy_strings=policy.policy_strings,
                    mx_patterns=policy.mx_patterns,
                ),
            )
        return await self._deliver_route(att, route), att

    async def _policy(self, domain: str, blog: Any) -> TlsPolicy | None | _Unavailable:
        """The domain's policy; _Unavailable when the lookup could not say (the policy
        cache unreadable, or the lookup itself broke)."""
        if self.policy_lookup is None:
            return None
        lookup = self.policy_lookup
        try:
            policy = await lookup(domain)
            if len(self._policy_memo) >= POLICY_MEMO_MAX:
                self._policy_memo.clear()
            self._policy_memo[domain] = (time.monotonic() + POLICY_MEMO_SECONDS, lookup, policy)
            return policy
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken lookup must not downgrade
            blog.error("policy_lookup_failed", error=f"{type(exc).__name__}: {exc}")
            return _Unavailable(str(exc) or type(exc).__name__)

    def _policy_cached(self, domain: str) -> TlsPolicy | None | _Miss:
        """The domain's policy from a lookup under POLICY_MEMO_SECONDS ago, None without
        MTA-STS, else _MISS."""
        if self.policy_lookup is None:
            return None
        hit = self._policy_memo.get(domain)
        if hit is None or hit[0] <= time.monotonic() or hit[1] is not self.policy_lookup:
            return _MISS  # none, stale, or from a lookup since replaced (relay reload)
        return hit[2]

    def _unavailable(self, job: DeliveryJob, why: _Unavailable, blog: Any) -> AttemptResult:
        # RFC 8461 section 5 (fail closed, see tlspolicy.decide): an unknown policy is
        # never read as "no policy"; nothing is sent, every recipient is deferred
        d = tlspolicy.decide(TlsInputs(PolicyMode.UNAVAILABLE, reason=why.reason))
        assert d.action is Action.DEFER
        reason = " ".join(d.reason.split())  # one line, whatever the error said
        text = f"451 4.7.0 TLS policy of {job.domain} unavailable, not sent: {reason}"[:900]
        blog.warning(
            "tls_policy_unavailable",
            recipients=list(job.recipients),
            reply=text,
            outcome="deferred",
            rfc=d.rfc,
        )
        return _all(job, RecipientState.DEFERRED, text)

    async def _deliver_route(self, att: _Attempt, route: Route) -> AttemptResult:
        job = att.job
        if route.failure is not None:
            state = RecipientState.FAILED if route.failure.permanent else RecipientState.DEFERRED
            att.log.info(
                "route_failed",
                recipients=list(job.recipients),
                reply=route.failure.reply,
                skipped=list(route.skipped),
                outcome=state.value,
            )
            return _all(job, state, route.failure.reply, tuple(att.outcomes))
        if route.skipped:
            att.log.info("mx_skipped", skipped=list(route.skipped))
        # DANE (RFC 7672): the DNSSEC status of the MX RRset, of each host's addresses
        # and its TLSA RRset; a host with TLSA records is delivered to under DANE, which
        # takes precedence over MTA-STS for it (RFC 8461 section 2)
        att.dane = await route_dane(self.resolver, job.domain, route.hosts)

        last_host = ""
        for host in route.hosts:
            last_host = host.name
            dane = att.dane.get(host.name)
            if dane is not None and dane.state is DaneState.DEFER:
                self._dane_deferred(att, host, dane)
                continue
            in_policy = self._in_policy(att.policy, host.name)
            if job.requiretls:
                gate = requiretls.host_gate(
                    dane=dane is not None and dane.state is DaneState.DANE,
                    sts_mode=_sts_name(att.policy),
                    in_sts_policy=in_policy and att.policy is not None,
                )
                if not gate.allowed:
                    att.requiretls_refusals.append(f"{host.name}: {gate.reason}")
                    att.log.info(
                        "attempt", mx=host.name, outcome="requiretls-refused",
                        reason=gate.reason, rfc=gate.rfc,
                    )  # fmt: skip
                    continue
            if _dane_applies(dane):
                in_policy = True  # DANE replaces the MTA-STS "mx" check for this host
            plan = att.decide(mx_in_policy=in_policy)
            if plan.report and plan.result_type is not None:
                self._emit(
                    att,
                    self._outcome(
                        att, host.name, "", plan.result_type, plan.reason, enforced=plan.enforced
                    ),
                )
            if plan.action is Action.REFUSE_HOST:
                att.tls_refusals.append(f"{host.name}: {plan.reason}")
                att.log.info("attempt", mx=host.name, outcome="tls-refused", reason=plan.reason)
                continue
            for ip in host.addresses[:MAX_ADDRESSES_PER_HOST]:
                try:
                    result = await self._try_address(att, host, ip, plan, in_policy)
                except _DeadlineInTransaction as exc:
                    text = f"451 4.4.2 {exc} attempt deadline exceeded during the transaction"
                    return _all(job, RecipientState.DEFERRED, text, tuple(att.outcomes), host.name)
                if result is not None:
                    return result
        return self._nothing_worked(att, last_host)

    def _in_policy(self, policy: TlsPolicy | None, host: str) -> bool:
        if tlspolicy.policy_mode(policy) is PolicyMode.NONE or policy is None:
            return True
        return any(mx_matches(p, host) for p in policy.mx_patterns)

    def _nothing_worked(self, att: _Attempt, last_host: str) -> AttemptResult:
        job = att.job
        refusals = att.requiretls_refusals + att.dane_refusals + att.tls_refusals
        if job.requiretls and refusals and not att.connect_errors:
            # RFC 8689 section 5: no MX host gave a path REQUIRETLS accepts: 5.7.30
            text = requiretls.failure_reply(job.domain, refusals)
            att.log.info(
                "attempt_failed", recipients=list(job.recipients), reply=text,
                outcome="failed", policy=_policy_name(att, last_host),
            )  # fmt: skip
            res = _all(job, RecipientState.FAILED, text, tuple(att.outcomes), last_host)
            return dataclasses.replace(res, tls_policy=_policy_name(att, last_host))
        if att.dane_refusals:
            # RFC 7672 section 2.2: never clear text to a DANE host; deferred, 4.7.5
            text = (
                f"451 4.7.5 TLS required by DANE (TLSA) for {job.domain}: "
                + "; ".join(att.dane_refusals + att.tls_refusals)
            )[:900]
        elif att.tls_refusals:
            text = (
                f"451 4.7.5 TLS required by MTA-STS policy of {job.domain}: "
                + "; ".join(att.tls_refusals)
            )[:900]
        elif att.connect_errors:
            text = f"451 4.4.1 {att.connect_errors[-1]}"
        else:
            text = f"451 4.4.1 no MX host of {job.domain} could be reached"
        if att.connect_errors and att.sessions == 0 and not (att.tls_refusals or att.dane_refusals):
            if self.destinations.record_failure(job.domain, att.connect_errors[-1]):
                att.log.warning(
                    "destination_marked_dead",
                    backoff=self.config.delivery.dead_backoff,
                    error=att.connect_errors[-1],
                )
        att.log.info(
            "attempt_failed",
            recipients=list(job.recipients),
            reply=text,
            outcome="deferred",
            policy=_policy_name(att, last_host),
        )
        res = _all(job, RecipientState.DEFERRED, text, tuple(att.outcomes), last_host)
        return dataclasses.replace(res, tls_policy=_policy_name(att, last_host))

    # ------------------------------------------------------------------ one address

    async def _try_address(
        self, att: _Attempt, host: MxHost, ip: str, plan: TlsDecision, in_policy: bool
    ) -> AttemptResult | None:
        """One attempt to one MX address under the total deadline. Returns None when the
        next candidate should be tried."""
        job = att.job
        d = self.config.delivery
        in_tx = False
        session: SmtpSession | None = None
        try:
            async with asyncio.timeout(d.attempt_timeout):
                session = await self._take_pooled(att, host, ip)
                reused = session is not None
                if session is None:
                    session = await self._open(att, host, ip, plan, in_policy)
                if job.requiretls and not self._requiretls_session(att, host, session):
                    return None
                in_tx = True
                try:
                    tx = await _send(session, job)
                except ConnectionLost as exc:
                    if not reused:
                        raise
                    att.log.info("reused_connection_lost", mx=host.name, ip=ip, error=exc.detail)
                    in_tx = False
                    session = await self._open(att, host, ip, plan, in_policy)
                    if job.requiretls and not self._requiretls_session(att, host, session):
                        return None
                    in_tx = True
                    tx = await _send(session, job)
        except TimeoutError:
            if session is not None:
                session.close()
            if in_tx:
                att.log.warning("attempt_deadline", mx=host.name, ip=ip, phase="transaction")
                raise _DeadlineInTransaction(host.name, ip) from None
            att.connect_errors.append(f"{host.name}[{ip}]: attempt deadline exceeded")
            att.log.info("attempt", mx=host.name, ip=ip, outcome="timeout")
            return None
        except _DaneRefused as exc:
            # RFC 7672 section 2.2: the host is alive but fails DANE: the next one is tried
            att.dane_refusals.append(exc.detail)
            att.log.info(
                "attempt", mx=host.name, ip=ip, outcome="tls-refused", reason=exc.detail,
                policy="dane",
            )  # fmt: skip
            return None
        except (StartTlsMissing, TlsFailed) as exc:
            if plan.action is not Action.REQUIRE_TLS:  # e.g. 421 to STARTTLS: it gave up
                att.connect_errors.append(exc.detail)
                att.log.info(
                    "attempt", mx=host.name, ip=ip, outcome="connect-failed", reason=exc.detail
                )
                return None
            # a policy refusal under enforce: the host is alive, try the next one
            att.tls_refusals.append(f"{host.name}[{ip}]: {_tls_type(exc)}")
            att.log.info("attempt", mx=host.name, ip=ip, outcome="tls-refused", reason=exc.detail)
            return None
        except SessionError as exc:
            att.connect_errors.append(exc.detail)
            att.log.info(
                "attempt", mx=host.name, ip=ip, outcome="connect-failed", reason=exc.detail
            )
            return None
        att.sessions += 1
        return self._finish(att, host, session, tx, reused)

    async def _take_pooled(self, att: _Attempt, host: MxHost, ip: str) -> SmtpSession | None:
        """A pooled connection of an acceptable TLS level, with a RSET owed: send() sends
        it first (with PIPELINING in the same write as MAIL). A connection that died idle
        shows as ConnectionLost from send(), and the message goes on a new connection."""
        levels = att.plan.levels
        dane = att.dane.get(host.name)
        if att.job.requiretls:
            # RFC 8689 4.2.1: a pooled session made at a weaker level is never reused
            dane_host = dane is not None and dane.state is DaneState.DANE
            levels = ("dane",) if dane_host else ("verified",)
        elif _dane_applies(dane):
            # a pooled session made at a weaker level is never used for a DANE host
            levels = ("dane",) if dane and dane.state is DaneState.DANE else _ENCRYPTED
        session = self.pool.take(ip, self.config.delivery.port, host.name, levels)
        if session is not None:
            session.pending_rset = True
            att.log.debug("connection_reused", mx=host.name, ip=ip, tls=session.level)
        return session

    async def _open(
        self, att: _Attempt, host: MxHost, ip: str, plan: TlsDecision, in_policy: bool
    ) -> SmtpSession:
        """A new session as the host's TLS decision says; emits the TLS outcome."""
        d = self.config.delivery
        common: dict[str, Any] = {
            "mx_host": host.name,
            "ip": ip,
            "port": d.port,
            "helo": self.config.server.hostname,
            "connect_timeout": d.connect_timeout,
            "command_timeout": d.attempt_timeout,
            "source_ip": d.source_ip,
        }
        dane = att.dane.get(host.name)
        if dane is not None and _dane_applies(dane):
            return await self._open_dane(att, host, ip, dane, common)
        if plan.action is Action.REQUIRE_TLS:
            try:
                session = await SmtpSession.open(
                    tls_context=self.tls.verifying, require_tls=True, **common
                )
            except (StartTlsMissing, TlsFailed) as exc:
                offer = Offer.FAILED if isinstance(exc, TlsFailed) else Offer.NOT_OFFERED
                done = att.decide(
                    mx_in_policy=in_policy,
                    offer=offer,
                    verifying=True,
                    failure=_tls_type(exc),
                    reason=exc.detail,
                )
                self._report(att, host.name, ip, done, exc.local_ip)
                raise
            done = att.decide(mx_in_policy=in_policy, offer=_offer(session), verifying=True)
            if done.action is not Action.SEND:  # the client let through what enforce refuses
                self._report(att, host.name, ip, done, session.local_ip)
                session.close()
                raise TlsFailed(
                    done.result_type or TlsResultType.VALIDATION_FAILURE,
                    f"{host.name}[{ip}]: {done.reason}",
                )
            self._report(att, host.name, ip, done, session.local_ip)
            return session
        if plan.action is Action.VERIFY:
            # the verification pass: what enforce would have refused is recorded
            try:
                session = await SmtpSession.open(
                    tls_context=self.tls.verifying, require_tls=False, **common
                )
            except TlsFailed as exc:
                done = att.decide(
                    mx_in_policy=in_policy,
                    offer=Offer.FAILED,
                    verifying=True,
                    failure=exc.result_type,
                    reason=exc.detail,
                )
                self._report(att, host.name, ip, done, exc.local_ip)
                att.log.info(
                    "tls_verification_failed",
                    mx=host.name,
                    ip=ip,
                    reason=exc.detail,
                    mode="testing",
                )
                return await self._open_opportunistic(att, host, ip, common, in_policy)
            done = att.decide(
                mx_in_policy=in_policy,
                offer=_offer(session),
                verifying=True,
                reason=_offer_reason(session),
            )
            self._report(att, host.name, ip, done, session.local_ip)
            return session
        return await self._open_opportunistic(att, host, ip, common, in_policy)

    async def _open_opportunistic(
        self, att: _Attempt, host: MxHost, ip: str, common: dict[str, Any], in_policy: bool
    ) -> SmtpSession:
        try:
            session = await SmtpSession.open(
                tls_context=self.tls.opportunistic, require_tls=False, **common
            )
        except TlsFailed as exc:
            done = att.decide(
                mx_in_policy=in_policy,
                offer=Offer.FAILED,
                failure=exc.result_type,
                reason=exc.detail,
            )
            self._report(att, host.name, ip, done, exc.local_ip)
            att.log.info("tls_failed_clear_fallback", mx=host.name, ip=ip, reason=exc.detail)
            return await SmtpSession.open(tls_context=None, require_tls=False, **common)
        done = att.decide(
            mx_in_policy=in_policy, offer=_offer(session), reason=_offer_reason(session)
        )
        self._report(att, host.name, ip, done, session.local_ip)
        return session

    def _report(self, att: _Attempt, host: str, ip: str, done: TlsDecision, local_ip: str) -> None:
        """One TLS outcome for a session, when the decision says it is to be recorded."""
        if done.report:
            self._emit(
                att,
                self._outcome(
                    att, host, ip, done.result_type, done.reason, local_ip, done.enforced
                ),
            )

    # ------------------------------------------------------------------ results

    def _finish(
        self, att: _Attempt, host: MxHost, session: SmtpSession, tx: Transaction, reused: bool
    ) -> AttemptResult:
        job = att.job
        self.destinations.record_success(job.domain)
        results = []
        for address, reply in tx.replies:
            results.append(_recipient(address, reply, host.name, tx.dsn))
        states = {r.state for r in results}
        outcome = (
            "delivered"
            if states == {RecipientState.DELIVERED}
            else "failed"
            if states == {RecipientState.FAILED}
            else "deferred"
            if states == {RecipientState.DEFERRED}
            else "partial"
        )
        tls = session.tls
        policy = _policy_name(att, host.name)
        # the scheduler logs each recipient's outcome at info (with the reply and TLS)
        if logs.enabled(att.log, logging.DEBUG):
            att.log.debug(
                "attempt",
                mx=host.name,
                ip=session.ip,
                recipients=[r.address for r in results],
                replies=[f"{r.address}: {r.reply}" for r in results],
                tls=session.level,
                tls_version=tls.version if tls else None,
                tls_cipher=tls.cipher if tls else None,
                reused=reused,
                outcome=outcome,
                policy=policy,
            )
        if not tx.usable:
            session.close()
        elif att.keep and _reusable(session):
            att.kept = (host, session)
        else:
            self.pool.put(session)
        return AttemptResult(
            domain=job.domain,
            recipients=tuple(results),
            tls_outcomes=tuple(att.outcomes),
            mx_host=host.name,
            tls_version=tls.version if tls else None,
            tls_policy=policy,
        )

    # ------------------------------------------------------------------ REQUIRETLS

    def _requiretls_session(self, att: _Attempt, host: MxHost, session: SmtpSession) -> bool:
        """RFC 8689 4.2.1 items 3-4 on an open session; False: the host is refused (the
        session goes back to the pool for other mail)."""
        gate = requiretls.session_gate(
            verified=session.level in ("dane", "verified"),
            advertises=session.supports("requiretls"),
        )
        if gate.allowed:
            return True
        att.requiretls_refusals.append(f"{host.name}: {gate.reason}")
        att.log.info(
            "attempt", mx=host.name, ip=session.ip, outcome="requiretls-refused",
            reason=gate.reason, rfc=gate.rfc,
        )  # fmt: skip
        self.pool.put(session)
        return False

    # ------------------------------------------------------------------ DANE (RFC 7672)

    def _dane_deferred(self, att: _Attempt, host: MxHost, dane: DaneHost) -> None:
        """The host's TLSA lookup was bogus or failed: not used (RFC 7672 section 2.2)."""
        why = f"{host.name}: {dane.policy.reason}"
        att.dane_refusals.append(why)
        self._emit(
            att,
            self._dane_outcome(att, dane, "", dane.policy.result_type, dane.policy.reason, True),
        )
        att.log.info(
            "attempt", mx=host.name, outcome="tls-refused", reason=dane.policy.reason,
            policy="dane", rfc=dane.policy.rfc,
        )  # fmt: skip

    async def _open_dane(
        self, att: _Attempt, host: MxHost, ip: str, dane: DaneHost, common: dict[str, Any]
    ) -> SmtpSession:
        """A session to a DANE host: STARTTLS required (RFC 7672 section 2.2), the chain
        matched against the TLSA records (section 3); raises _DaneRefused otherwise."""
        pol = dane.policy
        where = f"{host.name}[{ip}]"
        try:
            session = await SmtpSession.open(tls_context=self.tls.dane, require_tls=True, **common)
        except StartTlsMissing as exc:
            out = danepolicy.after_handshake(pol, danepolicy.Offer.NOT_OFFERED, None, exc.detail)
            self._dane_refuse(att, dane, ip, out, exc.local_ip)
            raise _DaneRefused(f"{where}: {out.result_type}") from None
        except TlsFailed as exc:
            out = danepolicy.after_handshake(pol, danepolicy.Offer.FAILED, None, exc.detail)
            self._dane_refuse(att, dane, ip, out, exc.local_ip)
            raise _DaneRefused(f"{where}: {out.result_type}: {exc.detail}") from None
        match = None
        if pol.state is DaneState.DANE:
            chain = session.tls.peer_chain if session.tls is not None else ()
            match = match_chain(pol.records, chain, dane.names)
        out = danepolicy.after_handshake(pol, danepolicy.Offer.ENCRYPTED, match)
        if not out.send:
            session.close()
            self._dane_refuse(att, dane, ip, out, session.local_ip)
            raise _DaneRefused(f"{where}: {out.result_type}: {out.reason}")
        session.dane = pol.state is DaneState.DANE
        result_type = pol.result_type  # tlsa-invalid for unusable-only RRsets, else ""
        self._emit(
            att,
            self._dane_outcome(att, dane, ip, result_type, pol.reason, False, session.local_ip),
        )
        att.log.debug("dane_session", mx=host.name, ip=ip, state=pol.state.value, rfc=out.rfc)
        return session

    def _dane_refuse(
        self, att: _Attempt, dane: DaneHost, ip: str, out: danepolicy.DaneOutcome, local: str
    ) -> None:
        self._emit(att, self._dane_outcome(att, dane, ip, out.result_type, out.reason, True, local))

    def _dane_outcome(
        self,
        att: _Attempt,
        dane: DaneHost,
        ip: str,
        result_type: str,
        reason: str,
        enforced: bool,
        local_ip: str = "",
    ) -> TlsOutcome:
        """RFC 8460 section 4.4: policy-type tlsa, the TLSA records as policy-string."""
        return TlsOutcome(
            policy_domain=att.job.domain,
            policy_type=PolicyType.TLSA,
            mx_host=dane.host,
            receiving_ip=ip,
            result_type=TlsResultType(result_type) if result_type else None,
            failure_reason=reason if result_type else "",
            policy_strings=dane.policy_strings(),
            sending_mta_ip=local_ip or self.config.delivery.source_ip,
            enforced=enforced,
        )

    def _outcome(
        self,
        att: _Attempt,
        mx_host: str,
        ip: str,
        result_type: TlsResultType | None,
        reason: str,
        local_ip: str = "",
        enforced: bool = False,
    ) -> TlsOutcome:
        policy = att.policy
        has_policy = policy is not None and policy.mode is not None
        return TlsOutcome(
            policy_domain=att.job.domain,
            policy_type=PolicyType.STS if has_policy else PolicyType.NO_POLICY_FOUND,
            mx_host=mx_host,
            receiving_ip=ip,
            result_type=result_type,
            failure_reason=reason if result_type is not None else "",
            policy_strings=policy.policy_strings if policy is not None and has_policy else (),
            mx_patterns=policy.mx_patterns if policy is not None and has_policy else (),
            sending_mta_ip=local_ip or self.config.delivery.source_ip,
            enforced=enforced,
        )

    def _emit(self, att: _Attempt, outcome: TlsOutcome) -> None:
        att.outcomes.append(outcome)
        # a failure is worth an info line; a success shows in the delivery line's TLS
        failed = outcome.result_type is not None
        if failed or logs.enabled(att.log, logging.DEBUG):
            (att.log.info if failed else att.log.debug)(
                "tls_outcome",
                mx=outcome.mx_host,
                ip=outcome.receiving_ip,
                policy_type=outcome.policy_type.value,
                result=outcome.result_type.value if outcome.result_type else "success",
                reason=outcome.failure_reason,
                enforced=outcome.enforced,
            )
        if self.outcome_sink is None or not att.job.record_tls:
            return
        try:
            self.outcome_sink(outcome)
        except Exception as exc:  # noqa: BLE001 - a broken ledger must not stop delivery
            att.log.error("outcome_sink_failed", error=f"{type(exc).__name__}: {exc}")


_ENCRYPTED = ("dane", "verified", "encrypted")


@dataclass(frozen=True, slots=True)
class _Kept:
    """A session between two transactions of deliver_many, and the attempt it served."""

    att: _Attempt
    host: MxHost
    session: SmtpSession


def _same_inputs(att: _Attempt, job: DeliveryJob) -> bool:
    """The job would get the TLS decision the attempt got, on the same hosts: the same
    domain (so the same MX hosts, MTA-STS policy and DANE state), the same
    "TLS-Required: No" (RFC 8689 section 5), no REQUIRETLS (whose session checks,
    RFC 8689 section 4.2.1, run on the whole way), and no policy fetch error to record
    for the attempt (RFC 8460: one per attempt)."""
    prev = att.job
    return (
        job.domain == prev.domain
        and job.tls_required == prev.tls_required
        and not job.requiretls
        and not prev.requiretls
        and (att.policy is None or att.policy.fetch_error is None)
    )


def _reusable(session: SmtpSession, more: int = 1) -> bool:
    """The session may carry ``more`` transactions (the limits of a connection's use)."""
    return (
        session.connected
        and session.transactions + more <= MAX_TRANSACTIONS_PER_CONNECTION
        and time.monotonic() - session.created <= MAX_CONNECTION_AGE
    )


def _sts_mode(policy: TlsPolicy | None, job: DeliveryJob) -> PolicyMode:
    mode = tlspolicy.policy_mode(policy)
    if job.requiretls and mode is PolicyMode.TESTING:
        # RFC 8689 4.2.1 item 3: a REQUIRETLS message needs the verified session that a
        # testing policy only checks: testing is applied as enforce for it
        return PolicyMode.ENFORCE
    return mode


def _sts_name(policy: TlsPolicy | None) -> str | None:
    mode = tlspolicy.policy_mode(policy)
    return mode.value if mode in (PolicyMode.ENFORCE, PolicyMode.TESTING) else None


def _dane_applies(dane: DaneHost | None) -> bool:
    return dane is not None and dane.state in (DaneState.DANE, DaneState.ENCRYPT)


def _policy_name(att: _Attempt, host: str) -> str:
    """Which policy an attempt ran under: dane, sts or none (RFC 8460 policy types)."""
    dane = att.dane.get(host)
    if dane is not None and dane.state is not DaneState.NONE:
        return "dane"
    if att.policy is not None and att.policy.mode is not None:
        return "sts"
    return "none"


def _guard(job: DeliveryJob) -> dict[str, RecipientResult]:
    """The recipients the outbound command guard refuses (all of them for a bad sender)."""
    problem = guard.address_problem(job.mail_from)
    if problem is not None:
        reply = guard.sender_reply(problem)
        return {
            a: RecipientResult(a, RecipientState.FAILED, reply, "5.1.7") for a in job.recipients
        }
    out: dict[str, RecipientResult] = {}
    for a in job.recipients:
        problem = guard.address_problem(a)
        if problem is not None:
            reply = guard.recipient_reply(problem)
            out[a] = RecipientResult(a, RecipientState.FAILED, reply, "5.1.3")
    return out


async def _send(s: SmtpSession, job: DeliveryJob, then: DeliveryJob | None = None) -> Transaction:
    """The job's one transaction on session ``s`` (its DSN parameters and REQUIRETLS);
    ``then``: the job sent next on ``s`` (NextTransaction). Always under the attempt
    deadline (asyncio.timeout in the callers), so the replies need no timer each."""
    s.deadline_outside = True
    return await s.send(
        job.mail_from,
        job.recipients,
        job.data,
        job.dsn,
        job.rcpt_dsn_map(),
        requiretls=job.requiretls,
        then=_next_transaction(then) if then is not None else None,
    )


def _next_transaction(job: DeliveryJob) -> NextTransaction:
    return NextTransaction(job.mail_from, job.recipients, job.data, job.dsn, job.rcpt_dsn_map())


def _can_follow(hand: _Kept, job: DeliveryJob | None) -> bool:
    """``job`` would be sent on this session right after the transaction now starting on
    it: the same TLS inputs, nothing the guard refuses, and room for one more
    transaction after this one (the session is then kept, not pooled or closed; should
    it pass its age meanwhile, it is closed, which drops the commands written ahead)."""
    return (
        job is not None
        and _same_inputs(hand.att, job)
        and not _guard(job)
        and _reusable(hand.session, more=2)
    )


def _offer(s: SmtpSession) -> Offer:
    if s.tls is None:
        return Offer.NOT_OFFERED
    return Offer.VERIFIED if s.tls.verified else Offer.ENCRYPTED


def _offer_reason(s: SmtpSession) -> str:
    return "STARTTLS refused" if s.tls is None and s.starttls_offered else ""


def _tls_type(exc: SessionError) -> TlsResultType:
    if isinstance(exc, TlsFailed):
        return exc.result_type
    return TlsResultType.STARTTLS_NOT_SUPPORTED


def _recipient(address: str, reply: SmtpReply, remote: str, dsn: bool = False) -> RecipientResult:
    if 200 <= reply.code < 300:
        state = RecipientState.DELIVERED
    elif 400 <= reply.code < 500:
        state = RecipientState.DEFERRED
    else:
        state = RecipientState.FAILED
    return RecipientResult(address, state, str(reply), enhanced_code(reply), remote, dsn)


def _all(
    job: DeliveryJob,
    state: RecipientState,
    reply: str,
    outcomes: tuple[TlsOutcome, ...] = (),
    remote: str = "",
) -> AttemptResult:
    parts = reply.split(" ", 2)
    enhanced = parts[1] if len(parts) > 1 and parts[1][:1].isdigit() and "." in parts[1] else ""
    return AttemptResult(
        domain=job.domain,
        recipients=tuple(
            RecipientResult(a, state, reply, enhanced, remote) for a in job.recipients
        ),
        tls_outcomes=outcomes,
        mx_host=remote,
    )
