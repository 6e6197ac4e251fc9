"""The queue manager: picks due messages into a bounded active window, claims their due
recipients under this process's lease, hands each destination domain's recipients to the
courier, records each domain's outcome as soon as it is known, with exponential back-off
and jitter, expires messages after the queue lifetime, and queues DSNs (failures, optional
delay warnings) in the same transaction that marks them sent.

A maintenance task beside the loader renews the leases of the attempts running here and
sweeps the store: recipients whose lease expired (a crashed or stuck owner, a lost outcome
write) are queued again, and failed recipients whose DSN is still owed get it. Every one of
those writes is conditional on the rows' state and lease, so several schedulers (worker
processes, later several nodes) may sweep one store. docs/queue.md has the state machine.

Only this module decides when a recipient is tried again; the courier only attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay import logs, metrics
from relay.config import Config
from relay.dsn import DsnRecipient, build_dsn
from relay.dsnparams import wants
from relay.errors import RelayError
from relay.model import (
    AttemptResult,
    DeliveryJob,
    MailDsn,
    QueueId,
    RcptDsn,
    RecipientResult,
    RecipientState,
)
from relay.queue.base import QueueSpool
from relay.queue.faults import AFTER_FAIL_COMMIT, crash_point
from relay.queue.spool import (
    DEFAULT_LEASE,
    FLAG_NO_DSN,
    FLAG_NO_TLS_REQUIRED,
    FLAG_REQUIRETLS,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    RecipientUpdate,
    new_qid,
)

log = logs.get("relay.queue")

PRUNE_INTERVAL = 3600.0  # seconds between two prunings of the message history
LOADED_SHARE = 0.75  # share of the active window that mail loaded from the store may use


class CourierLike(Protocol):
    async def deliver(self, job: DeliveryJob) -> AttemptResult: ...


Done = Callable[[DeliveryJob, AttemptResult], None]
NextJob = Callable[[], DeliveryJob | None]
DeliverMany = Callable[[NextJob, Done], Awaitable[None]]


@dataclass(slots=True)
class _Lane:
    """New messages for one domain waiting for a runner: at most the domain's concurrency
    of runners, each sending one message after another on its connection (qmgr's
    per-destination queue, and Postfix's connection reuse)."""

    waiting: deque[tuple[QueuedMessage, bytes]] = field(default_factory=deque)
    runners: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first: float = 300.0
    maximum: float = 14400.0
    jitter: float = 0.2
    lifetime: float = 5 * 86400.0

    def delay(self, attempts: int, rng: Callable[[], float] = random.random) -> float:
        """Delay before the next try after ``attempts`` failed tries (1 = first failure)."""
        base = min(self.maximum, self.first * float(2 ** min(max(attempts - 1, 0), 40)))
        return max(0.0, base * (1 + self.jitter * (2 * rng() - 1)))


def outbound_dsn(r: QueuedRecipient) -> RcptDsn:
    """NOTIFY and ORCPT for the next hop: the sender's ORCPT, else (RFC 3461 5.2.1: added by
    a relaying MTA) the address of the RCPT we received when aliases or SRS changed it."""
    orcpt = r.orcpt
    if not orcpt and r.orig and r.orig.lower() != r.address.lower():
        orcpt = f"rfc822;{r.orig}"
    return RcptDsn(r.notify, orcpt)


def attempt_tls(res: AttemptResult) -> str:
    """The attempt's TLS outcome in a few words, for the message history: the version
    used, else the RFC 8460 result type of the last failure, else "none"."""
    if res.tls_version:
        return res.tls_version
    failures = [o for o in res.tls_outcomes if o.result_type is not None]
    if failures:
        return str(failures[-1].result_type)
    return "none" if res.mx_host else ""


def _internal_error(job: DeliveryJob) -> AttemptResult:
    """What a courier bug gives every recipient of the job: deferred, never lost."""
    return AttemptResult(
        domain=job.domain,
        recipients=tuple(
            RecipientResult(a, RecipientState.DEFERRED, "451 4.3.0 internal error")
            for a in job.recipients
        ),
    )


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class Scheduler:
    """qmgr: active window, leases, per-recipient retry, expiry, DSNs, the sweeper."""

    def __init__(
        self,
        config: Config,
        spool: QueueSpool,
        courier: CourierLike,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        poll_interval: float = 1.0,
        loader: bool = True,
        bounce_to: Callable[[str], str] | None = None,
        lease: float = DEFAULT_LEASE,
        sweep_interval: float | None = None,
        sign: Callable[[bytes, str], bytes] | None = None,
    ) -> None:
        """``bounce_to`` maps a reverse-path to the address a DSN goes to (SRS: our own
        rewritten sender is reversed to the original one). ``sign(message, from_domain)``
        DKIM-signs the DSNs we write (relay.auth.signer.OutboundSigner.sign: by the key of
        the bounce sender's domain or a parent of it; unchanged when there is none).
        ``lease``: seconds a claimed recipient stays ours without renewal (also used by
        intake's claimed writes through the shared spool); ``sweep_interval``: how often
        leases are renewed and the store swept (default lease / 3). DSNs are written by the
        spool together with the marks that say they were sent."""
        d = config.delivery
        self.config = config
        self.spool = spool
        self.courier = courier
        self.clock = clock
        self.rng = rng
        self.poll_interval = poll_interval
        self.retry = RetryPolicy(d.retry_first, d.retry_max, d.retry_jitter, d.queue_lifetime)
        self.window = d.active_window
        self._active: dict[QueueId, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._reserved = 0
        self._loaded: set[QueueId] = set()
        self._lanes: dict[str, _Lane] = {}  # by domain, while it has runners
        self._per_domain = max(1, config.delivery.concurrency_per_domain)
        # lanes when the courier sends several messages on one connection
        self._many: DeliverMany | None = getattr(courier, "deliver_many", None)
        self.loader = loader
        self.bounce_to = bounce_to or (lambda address: address)
        # the store may hold due messages beyond the active window: a finished message
        # then wakes the loader (else its next poll or an explicit wake() is enough)
        self._backlog = True
        self.bounce_from = d.bounce_sender or f"MAILER-DAEMON@{config.server.hostname}"
        self.sign = sign
        self._sweep_interval = sweep_interval
        self.lease = lease
        self._next_prune = 0.0

    @property
    def lease(self) -> float:
        return self.spool.lease

    @lease.setter
    def lease(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("lease must be positive")
        self.spool.lease = seconds
        self.sweep_interval = self._sweep_interval or seconds / 3
        self._next_sweep = 0.0  # scheduler clock: the next round runs at once

    # ------------------------------------------------------------ entry points

    def wake(self) -> None:
        self._backlog = True
        self._wake.set()

    def reserve(self, share: float = 1.0) -> bool:
        """Claim a place in the active window for a message about to be queued; with
        ``share`` < 1 only while the window is fuller than that share of it (a list
        fan-out takes LOADED_SHARE, like mail loaded from the store, so new mail still
        finds room at once)."""
        limit = max(1, int(self.window * share))
        if self._stopping or len(self._active) + self._reserved >= limit:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """Give back a reservation whose message was not queued."""
        self._reserved = max(0, self._reserved - 1)

    def submit_new(self, qid: QueueId, msg: NewMessage, created: float, claimed: bool) -> None:
        """From intake once the message is durable. A claimed message (its recipients were
        written in flight under our lease) starts at once without being read back; others
        wait for the loader."""
        if claimed:
            self.release()
        if claimed and qid not in self._active:
            recips = tuple(
                QueuedRecipient(
                    a,
                    RecipientState.QUEUED,
                    0,
                    0.0,
                    "",
                    o,
                    notify=tuple(w for w in notify.split(",") if w),
                    orcpt=orcpt,
                )
                for a, o, notify, orcpt in msg.recipient_rows()
            )
            qm = QueuedMessage(
                id=qid,
                mail_from=msg.mail_from,
                size=len(msg.data),
                message_id=msg.msgid(),
                created=created,
                flags=msg.flags,
                recipients=recips,
                ret=msg.ret,
                envid=msg.envid,
            )
            self._start_new(qm, msg.data)
        else:
            self._backlog = True
            self._wake.set()

    async def run(self) -> None:
        """Load due messages (only in the process that owns the loader) until stopped; the
        lease maintenance task runs beside it in every process."""
        maintenance = asyncio.get_running_loop().create_task(self._maintenance())
        try:
            while not self._stopping:
                try:
                    if self.loader:
                        await self._fill()
                except Exception as exc:  # noqa: BLE001 - the loop must survive store hiccups
                    log.error("scheduler_fill_failed", error=str(exc))
                timeout = self.poll_interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                self._wake.clear()
        finally:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking messages; let attempts in flight finish for ``grace`` seconds, then
        cancel the rest and give their leases back (their recipients are queued again; if
        that write fails too, the leases expire). A lane's outcomes are written by tasks
        of their own, started as its transactions end: waited for too."""
        self._stopping = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        pending: set[asyncio.Task[None]] = set()
        while True:
            tasks = {t for t in self._active.values() if not t.done()}
            remaining = deadline - loop.time()
            if not tasks or remaining <= 0:
                pending = tasks
                break
            await asyncio.wait(tasks, timeout=remaining)
        if pending:
            cancelled = [q for q, t in self._active.items() if t in pending]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            try:
                await self.spool.release(cancelled)
            except RelayError as exc:
                log.error("lease_release_failed", error=str(exc), qids=cancelled)

    @property
    def active(self) -> int:
        return len(self._active)

    async def maintain(self) -> None:
        """One maintenance round: renew the leases of the attempts running here, return
        expired leases (of any owner) to the queue, and start the messages whose DSN is
        owed. Safe with several owners on one store: each step is a conditional write."""
        running = set(self._active)
        await self.spool.heartbeat()  # "this owner is alive" (relay nodes, shared store)
        if running:
            await self.spool.renew(running)
        expired = await self.spool.expire_leases(keep=running)
        if expired:
            log.warning("leases_expired", recipients=expired)
            self.wake()
        await self._prune_history()
        if self._stopping:
            return
        room = max(0, self.window - len(self._active) - self._reserved)
        if room:
            for qid in await self.spool.unreported(room, set(self._active)):
                if qid not in self._active and not self._stopping:
                    log.info("dsn_owed", qid=qid)
                    self._start(qid, None)

    async def _prune_history(self) -> None:
        """At most once an hour (by the loader): forget the history of messages that left
        the queue more than storage.log_retention seconds ago."""
        now = self.clock()
        if not self.loader or now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL
        n = await self.spool.prune_log(now - self.config.storage.log_retention)
        if n:
            log.info("history_pruned", lines=n)

    # ------------------------------------------------------------ internals

    async def _maintenance(self) -> None:
        """Every sweep_interval of the scheduler's clock (checked each poll interval)."""
        while not self._stopping:
            now = self.clock()
            if now >= self._next_sweep:
                self._next_sweep = now + self.sweep_interval
                try:
                    await self.maintain()
                except Exception as exc:  # noqa: BLE001 - retried at the next round
                    log.error("lease_maintenance_failed", error=str(exc))
            await asyncio.sleep(min(self.poll_interval, self.sweep_interval))

    async def _fill(self) -> None:
        # Mail loaded from the store (retries, recovery, a backlog) may fill at most
        # LOADED_SHARE of the window, so new mail always finds room at once (Postfix keeps
        # the incoming and deferred queues apart for the same reason).
        room = min(
            self.window - len(self._active) - self._reserved,
            max(1, int(self.window * LOADED_SHARE)) - len(self._loaded),
        )
        if room <= 0:
            self._backlog = True
            return
        now = self.clock()
        due = await self.spool.due(now, room, set(self._active))
        self._backlog = len(due) >= room
        for qid in due:
            if self._stopping:
                return
            if qid not in self._active:
                log.debug("loaded", qid=qid)
                self._loaded.add(qid)
                self._start(qid, None, due=True)

    def _start(
        self, qid: QueueId, preloaded: tuple[QueuedMessage, bytes] | None, *, due: bool = False
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._run_one(qid, preloaded, due))
        self._active[qid] = task

    def _start_new(self, msg: QueuedMessage, data: bytes) -> None:
        """A message handed over in memory: alone (several domains, or a courier that sends
        one message a connection), or in its domain's lane: a new runner while the domain
        has fewer than its concurrency, else the next free runner takes it."""
        domains = {domain_of(r.address) for r in msg.recipients}
        if len(domains) != 1 or self._many is None:
            self._start(msg.id, (msg, data))
            return
        domain = domains.pop()
        lane = self._lanes.get(domain)
        if lane is None:
            lane = self._lanes[domain] = _Lane()
        lane.waiting.append((msg, data))
        if len(lane.runners) < self._per_domain:
            runner = asyncio.get_running_loop().create_task(self._run_lane(domain, lane))
            lane.runners.append(runner)
        self._active[msg.id] = lane.runners[-1]  # a live runner; the one that takes it next

    async def _run_lane(self, domain: str, lane: _Lane) -> None:
        """One runner of a domain's lane: the courier sends the lane's messages one after
        another on one connection while there are any; each outcome is written by a task
        of its own as soon as its transaction ends (so a crash later never sends it
        again). A message with nothing pending, or past the queue lifetime, goes the
        single way."""
        me = asyncio.current_task()
        assert me is not None and self._many is not None
        many = self._many
        # taken from the lane, outcome not yet handed on: message, data, attempts, job
        taken: dict[QueueId, tuple[QueuedMessage, bytes, dict[str, int], DeliveryJob]] = {}
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def next_job() -> DeliveryJob | None:
            nonlocal started
            while lane.waiting:
                msg, data = lane.waiting.popleft()
                pending = list(msg.pending())
                if not pending or self.clock() - msg.created >= self.retry.lifetime:
                    self._start(msg.id, (msg, data))
                    continue
                self._active[msg.id] = me
                job = self._job(msg, data, domain, pending)
                taken[msg.id] = (msg, data, {r.address: r.attempts for r in pending}, job)
                started = time.monotonic()
                return job
            return None

        def done(job: DeliveryJob, res: AttemptResult) -> None:
            metrics.attempt(time.monotonic() - started)
            item = taken.pop(job.qid, None)
            if item is not None:
                msg, data, attempts, _ = item
                work = self._conclude(msg, data, res, attempts)
                self._active[job.qid] = loop.create_task(self._guarded(job.qid, work))

        try:
            while lane.waiting:
                try:
                    await many(next_job, done)
                except Exception as exc:  # noqa: BLE001 - a courier bug defers, never loses
                    log.error("courier_failed", domain=domain, error=str(exc), exc_info=True)
                    for *_, job in list(taken.values()):
                        done(job, _internal_error(job))
        finally:
            lane.runners.remove(me)
            if lane.waiting and lane.runners:
                for msg, _ in lane.waiting:  # what this runner would have taken
                    if self._active.get(msg.id) is me:
                        self._active[msg.id] = lane.runners[-1]
            elif not lane.runners and self._lanes.get(domain) is lane:
                del self._lanes[domain]
                for msg, _ in lane.waiting:  # cancelled: stop() gives their leases back
                    if self._active.get(msg.id) is me:
                        del self._active[msg.id]
            for qid in taken:  # in flight when cancelled
                if self._active.get(qid) is me:
                    del self._active[qid]
                self._loaded.discard(qid)

    async def _run_one(
        self, qid: QueueId, preloaded: tuple[QueuedMessage, bytes] | None, due: bool = False
    ) -> None:
        await self._guarded(qid, self._process(qid, preloaded, due))

    async def _guarded(self, qid: QueueId, work: Awaitable[None]) -> None:
        """One message's work; its failure is logged and never stops the queue."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the queue
            # a store error leaves our leases on the rows: they expire and are swept
            log.error("message_processing_failed", qid=qid, error=str(exc), exc_info=True)
            if isinstance(exc, ValueError):
                with contextlib.suppress(RelayError):
                    await self.spool.mark_corrupt(qid)
        finally:
            self._active.pop(qid, None)
            self._loaded.discard(qid)
            if self._backlog and self.loader:
                self._wake.set()

    async def _process(
        self, qid: QueueId, preloaded: tuple[QueuedMessage, bytes] | None, due: bool = False
    ) -> None:
        """One message: ``preloaded`` (written in flight under our lease: intake, a list's
        fan-out), else its due recipients claimed before it is read. Picked by the loader
        (``due``), none claimed means another owner has them, or they are done: that
        owner settles it; found by the sweeper (a DSN owed), it is read and settled."""
        if preloaded is None:
            got = set(await self.spool.claim_due(qid))
            if due and not got:
                return
            loaded = await self.spool.load(qid)
            if loaded is None:
                return  # deleted meanwhile (relay queue delete): nothing to deliver
            msg, data = loaded
            pending = [r for r in msg.recipients if r.address in got]
        else:
            msg, data = preloaded
            pending = list(msg.pending())  # written in flight under our lease by intake
        now = self.clock()
        if not pending:
            removed, failed = await self.spool.settle(qid)
            await self._report(msg, data, removed, failed)
            return
        if now - msg.created >= self.retry.lifetime:
            reply = "4.4.7 Message delivery time expired; giving up"
            expired = [
                RecipientUpdate(
                    r.address,
                    RecipientState.FAILED,
                    f"{r.last_reply} ({reply})" if r.last_reply else reply,
                )
                for r in pending
            ]
            removed, failed = await self.spool.record(qid, expired)
            log.info("expired", qid=qid, recipients=[r.address for r in pending])
            self._failures_committed(msg, expired, failed)
            await self._report(msg, data, removed, failed)
            return

        by_domain: dict[str, list[QueuedRecipient]] = {}
        for r in pending:
            by_domain.setdefault(domain_of(r.address), []).append(r)
        jobs = [self._job(msg, data, dom, rs) for dom, rs in by_domain.items()]
        attempts = {r.address: r.attempts for r in pending}
        if len(jobs) == 1:  # the usual case: one domain, one write for outcome and settle
            await self._conclude(msg, data, await self._deliver(jobs[0]), attempts)
            return
        # each domain's outcome is written as soon as it is known, so a crash while
        # another domain's server stalls never sends the finished ones again
        outcomes = await asyncio.gather(
            *(self._attempt(msg, j, attempts) for j in jobs), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise errors[0]
        updates = [u for o in outcomes if not isinstance(o, BaseException) for u in o]
        removed, failed = await self.spool.settle(qid)
        self._failures_committed(msg, updates, failed)
        await self._maybe_delay_warning(msg, data, updates, self.clock())
        await self._report(msg, data, removed, failed)

    @staticmethod
    def _job(
        msg: QueuedMessage, data: bytes, domain: str, rs: Sequence[QueuedRecipient]
    ) -> DeliveryJob:
        """One destination domain's pending recipients of the message, for the courier."""
        no_tls = bool(msg.flags & FLAG_NO_TLS_REQUIRED)
        return DeliveryJob(
            qid=msg.id,
            domain=domain,
            mail_from=msg.mail_from,
            recipients=tuple(r.address for r in rs),
            data=data,
            message_id=msg.message_id,
            tls_required=not no_tls,
            record_tls=not no_tls,
            requiretls=bool(msg.flags & FLAG_REQUIRETLS),
            dsn=MailDsn(msg.ret, msg.envid),
            rcpt_dsn=tuple(outbound_dsn(r) for r in rs),
        )

    async def _conclude(
        self, msg: QueuedMessage, data: bytes, res: AttemptResult, attempts: dict[str, int]
    ) -> None:
        """A one-domain attempt's outcome and the message settled, in one write; then the
        DSNs and delay warnings it owes."""
        updates = self._updates(msg, res, attempts)
        removed, failed = await self.spool.record(msg.id, updates)
        self._failures_committed(msg, updates, failed)
        await self._maybe_delay_warning(msg, data, updates, self.clock())
        await self._report(msg, data, removed, failed)

    async def _attempt(
        self, msg: QueuedMessage, job: DeliveryJob, attempts: dict[str, int]
    ) -> list[RecipientUpdate]:
        """One domain of a message with several: deliver, then write its outcome alone."""
        updates = self._updates(msg, await self._deliver(job), attempts)
        await self.spool.record(msg.id, updates, settle=False)
        return updates

    def _updates(
        self, msg: QueuedMessage, res: AttemptResult, attempts: dict[str, int]
    ) -> list[RecipientUpdate]:
        now = self.clock()
        updates: list[RecipientUpdate] = []
        tls = attempt_tls(res)
        notify = {r.address: r.notify for r in msg.recipients}
        for rr in res.recipients:
            # RFC 3461 6.2.1: SUCCESS asked and the next hop took it without DSN: we say
            # "relayed" (one that offers DSN got NOTIFY and reports delivery itself)
            relayed = (
                rr.state is RecipientState.DELIVERED
                and wants(notify.get(rr.address, ()), "SUCCESS", False)
                and not rr.next_hop_dsn
            )
            seen = (rr.remote_host or res.mx_host, tls, relayed)
            metrics.recipient(rr.state.value, res.tls_policy, res.mx_host)
            if rr.state is RecipientState.DEFERRED:
                nxt = now + self.retry.delay(attempts.get(rr.address, 0) + 1, self.rng)
                nxt = min(nxt, msg.created + self.retry.lifetime)
                updates.append(RecipientUpdate(rr.address, rr.state, rr.reply, nxt, *seen))
            else:
                updates.append(RecipientUpdate(rr.address, rr.state, rr.reply, 0.0, *seen))
            log.info(
                {RecipientState.DELIVERED: "delivered", RecipientState.FAILED: "bounced"}.get(
                    rr.state, "deferred"
                ),
                qid=msg.id,
                message_id=msg.message_id,
                recipient=rr.address,
                reply=rr.reply,
                remote=rr.remote_host,
                domain=res.domain,
                tls=res.tls_version,
            )
        return updates

    def _failures_committed(
        self,
        msg: QueuedMessage,
        updates: list[RecipientUpdate],
        failed: tuple[QueuedRecipient, ...],
    ) -> None:
        """Failures are durable, their DSN not yet: the window the kill -9 test aims at."""
        if failed:
            crash_point(AFTER_FAIL_COMMIT, qid=msg.id)
        elif not msg.mail_from or msg.flags & FLAG_NO_DSN:
            bounced = [u.address for u in updates if u.state is RecipientState.FAILED]
            if bounced:
                log.info(
                    "dsn_suppressed",
                    qid=msg.id,
                    reason="null sender or no-DSN message",
                    recipients=bounced,
                )

    async def _deliver(self, job: DeliveryJob) -> AttemptResult:
        started = time.monotonic()
        try:
            return await self.courier.deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a courier bug defers, never loses
            log.error(
                "courier_failed", qid=job.qid, domain=job.domain, error=str(exc), exc_info=True
            )
            return _internal_error(job)
        finally:
            metrics.attempt(time.monotonic() - started)

    async def _queue_dsn(
        self,
        msg: QueuedMessage,
        data: bytes,
        recipients: list[DsnRecipient],
        action: str,
    ) -> bool | None:
        """Build one DSN about ``recipients`` and queue it with a null reverse-path to the
        sender (the original one for forwarded mail), in the transaction that marks the
        failed recipients reported (or the message delay-warned). Returns what
        ``Spool.enqueue_report`` returns: None when another owner had already done it."""
        to = self.bounce_to(msg.mail_from)
        now = self.clock()
        dsn = build_dsn(
            reporting_mta=self.config.server.hostname,
            sender=to,
            from_addr=self.bounce_from,
            recipients=recipients,
            original=data,
            arrival=msg.created,
            now=now,
            action=action,
            envid=msg.envid,
            ret=msg.ret,
        )
        if self.sign is not None:
            dsn = self.sign(dsn, self.bounce_from.rpartition("@")[2].lower().rstrip("."))
        # RFC 8689 section 5: the DSN of a REQUIRETLS message is itself sent with
        # REQUIRETLS (it carries the original's headers only, unless RET=FULL was asked)
        flags = FLAG_NO_DSN | (msg.flags & FLAG_REQUIRETLS)
        new = NewMessage("", (to,), dsn, (), flags)
        dsn_qid = new_qid(now)
        claimed = self.reserve()
        try:
            result = await self.spool.enqueue_report(
                new,
                dsn_qid,
                about=msg.id,
                failed=[r.address for r in recipients] if action == "failed" else (),
                delay_warning=action != "failed",
                claimed=claimed,
            )
        except BaseException:
            if claimed:
                self.release()
            raise
        if result is None:
            if claimed:
                self.release()
            log.info("dsn_already_queued", qid=msg.id, action=action)
            return None
        log.info(
            "dsn_queued" if action == "failed" else "delay_warning_queued",
            qid=msg.id,
            dsn_qid=dsn_qid,
            to=to,
            recipients=[r.address for r in recipients],
        )
        self.submit_new(dsn_qid, new, now, claimed)
        return result

    async def _report(
        self, msg: QueuedMessage, data: bytes, removed: bool, failed: tuple[QueuedRecipient, ...]
    ) -> None:
        """Queue one DSN for the failed recipients whose DSN we now owe (the spool has
        already marked the failures of <> and NO_DSN mail reported and dropped the message
        when nothing is left). If this fails, our lease on those rows expires and the
        sweeper queues the DSN then, once."""
        if removed:
            log.debug("removed", qid=msg.id)
            return
        if not failed:
            return
        if not msg.mail_from or msg.flags & FLAG_NO_DSN:  # a row read before the spool did
            return
        dsn_recipients = [
            DsnRecipient(
                r.address,
                r.orig,
                r.last_reply,
                orcpt=r.orcpt,
                action="relayed" if r.state is RecipientState.DELIVERED else "failed",
            )
            for r in failed
        ]
        if await self._queue_dsn(msg, data, dsn_recipients, "failed"):
            log.debug("removed", qid=msg.id)

    async def _maybe_delay_warning(
        self, msg: QueuedMessage, data: bytes, updates: list[RecipientUpdate], now: float
    ) -> None:
        limit = self.config.delivery.delay_warning
        if (
            limit <= 0
            or msg.delay_warned
            or not msg.mail_from
            or msg.flags & FLAG_NO_DSN
            or now - msg.created < limit
        ):
            return
        rcpts = {r.address: r for r in msg.recipients}
        deferred = [
            DsnRecipient(u.address, rcpts[u.address].orig, u.reply, orcpt=rcpts[u.address].orcpt)
            for u in updates
            if u.state is RecipientState.DEFERRED
            and u.address in rcpts
            and wants(rcpts[u.address].notify, "DELAY", True)  # RFC 3461 4.1
        ]
        if deferred:
            await self._queue_dsn(msg, data, deferred, "delayed")
