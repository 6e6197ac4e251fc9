"""The queue manager: picks due messages into a bounded active window, hands each
destination domain's recipients to the courier, records per-recipient outcomes with
exponential back-off and jitter, expires messages after the queue lifetime, and has
DSNs (failures, optional delay warnings) generated and injected through intake.

Only this module decides when a recipient is tried again; the courier only attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from relay import logs
from relay.config import Config
from relay.dsn import DsnRecipient, build_dsn
from relay.errors import RelayError
from relay.model import AttemptResult, DeliveryJob, QueueId, RecipientResult, RecipientState
from relay.queue.spool import (
    FLAG_NO_DSN,
    FLAG_NO_TLS_REQUIRED,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    RecipientUpdate,
    Spool,
)

log = logs.get("relay.queue")

LOADED_SHARE = 0.75  # share of the active window that mail loaded from the store may use


class CourierLike(Protocol):
    async def deliver(self, job: DeliveryJob) -> AttemptResult: ...


InjectFn = Callable[[str, tuple[str, ...], bytes, int], Awaitable[QueueId]]


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


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class Scheduler:
    """qmgr: active window, per-recipient retry, expiry, DSNs."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        courier: CourierLike,
        inject: InjectFn,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        poll_interval: float = 1.0,
        loader: bool = True,
        bounce_to: Callable[[str], str] | None = None,
    ) -> None:
        """``bounce_to`` maps a reverse-path to the address a DSN goes to (SRS: our own
        rewritten sender is reversed to the original one)."""
        d = config.delivery
        self.config = config
        self.spool = spool
        self.courier = courier
        self.inject = inject
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
        self.loader = loader
        self.bounce_to = bounce_to or (lambda address: address)
        # the store may hold due messages beyond the active window: a finished message
        # then wakes the loader (else its next poll or an explicit wake() is enough)
        self._backlog = True
        self.bounce_from = d.bounce_sender or f"MAILER-DAEMON@{config.server.hostname}"

    # ------------------------------------------------------------ entry points

    def wake(self) -> None:
        self._backlog = True
        self._wake.set()

    def reserve(self) -> bool:
        """Claim a place in the active window for a message about to be queued."""
        if self._stopping or len(self._active) + self._reserved >= self.window:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """Give back a reservation whose message was not queued."""
        self._reserved = max(0, self._reserved - 1)

    def submit_new(self, qid: QueueId, msg: NewMessage, created: float, claimed: bool) -> None:
        """From intake once the message is durable. A claimed message (its recipients were
        written in flight) starts at once without being read back; others wait for the loader."""
        if claimed:
            self.release()
        if claimed and qid not in self._active:
            recips = tuple(
                QueuedRecipient(a, RecipientState.QUEUED, 0, 0.0, "", o)
                for a, o in msg.recipient_pairs()
            )
            qm = QueuedMessage(
                id=qid,
                mail_from=msg.mail_from,
                size=len(msg.data),
                message_id=msg.msgid(),
                created=created,
                flags=msg.flags,
                recipients=recips,
            )
            self._start(qid, (qm, msg.data))
        else:
            self._backlog = True
            self._wake.set()

    async def run(self) -> None:
        """Load due messages until stopped (only in the process that owns the loader)."""
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

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking messages; let attempts in flight finish for ``grace`` seconds, then
        cancel the rest (their recipients are requeued at the next start)."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._active.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    @property
    def active(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------ internals

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
                self._start(qid, None)

    def _start(self, qid: QueueId, preloaded: tuple[QueuedMessage, bytes] | None) -> None:
        task = asyncio.get_running_loop().create_task(self._run_one(qid, preloaded))
        self._active[qid] = task

    async def _run_one(self, qid: QueueId, preloaded: tuple[QueuedMessage, bytes] | None) -> None:
        try:
            await self._process(qid, preloaded)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the queue
            log.error("message_processing_failed", qid=qid, error=str(exc), exc_info=True)
            if isinstance(exc, ValueError):
                with contextlib.suppress(RelayError):
                    await self.spool.mark_corrupt(qid)
        finally:
            self._active.pop(qid, None)
            self._loaded.discard(qid)
            if self._backlog and self.loader:
                self._wake.set()

    async def _process(self, qid: QueueId, preloaded: tuple[QueuedMessage, bytes] | None) -> None:
        if preloaded is None:
            loaded = await self.spool.load(qid)
            if loaded is None:
                return
            msg, data = loaded
        else:
            msg, data = preloaded
        now = self.clock()
        pending = [r for r in msg.pending() if r.next_attempt <= now or preloaded is not None]
        if not pending:
            removed, failed = await self.spool.record(qid, ())
            await self._dsn_and_finish(msg, data, removed, failed)
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
            await self._dsn_and_finish(msg, data, removed, failed)
            return

        by_domain: dict[str, list[QueuedRecipient]] = {}
        for r in pending:
            by_domain.setdefault(domain_of(r.address), []).append(r)
        if preloaded is None:
            await self.spool.mark_inflight(qid, [r.address for r in pending])
        no_tls = bool(msg.flags & FLAG_NO_TLS_REQUIRED)
        jobs = [
            DeliveryJob(
                qid=qid,
                domain=dom,
                mail_from=msg.mail_from,
                recipients=tuple(r.address for r in rs),
                data=data,
                message_id=msg.message_id,
                tls_required=not no_tls,
                record_tls=not no_tls,
            )
            for dom, rs in by_domain.items()
        ]
        if len(jobs) == 1:  # the usual case: no task and gathering future for one domain
            results = [await self._deliver(jobs[0])]
        else:
            results = await asyncio.gather(*(self._deliver(j) for j in jobs))
        attempts = {r.address: r.attempts for r in pending}
        now = self.clock()
        updates: list[RecipientUpdate] = []
        for res in results:
            for rr in res.recipients:
                if rr.state is RecipientState.DEFERRED:
                    nxt = now + self.retry.delay(attempts.get(rr.address, 0) + 1, self.rng)
                    nxt = min(nxt, msg.created + self.retry.lifetime)
                    updates.append(RecipientUpdate(rr.address, rr.state, rr.reply, nxt))
                else:
                    updates.append(RecipientUpdate(rr.address, rr.state, rr.reply))
                log.info(
                    {RecipientState.DELIVERED: "delivered", RecipientState.FAILED: "bounced"}.get(
                        rr.state, "deferred"
                    ),
                    qid=qid,
                    message_id=msg.message_id,
                    recipient=rr.address,
                    reply=rr.reply,
                    remote=rr.remote_host,
                    domain=res.domain,
                    tls=res.tls_version,
                )
        removed, failed = await self.spool.record(qid, updates)
        await self._maybe_delay_warning(msg, data, updates, now)
        await self._dsn_and_finish(msg, data, removed, failed)

    async def _deliver(self, job: DeliveryJob) -> AttemptResult:
        try:
            return await self.courier.deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a courier bug defers, never loses
            log.error(
                "courier_failed", qid=job.qid, domain=job.domain, error=str(exc), exc_info=True
            )
            return AttemptResult(
                domain=job.domain,
                recipients=tuple(
                    RecipientResult(a, RecipientState.DEFERRED, "451 4.3.0 internal error")
                    for a in job.recipients
                ),
            )

    async def _send_dsn(
        self, msg: QueuedMessage, data: bytes, recipients: list[DsnRecipient], action: str
    ) -> str:
        """Build one DSN about ``recipients`` and queue it with a null reverse-path to the
        sender (the original one for forwarded mail)."""
        to = self.bounce_to(msg.mail_from)
        dsn = build_dsn(
            reporting_mta=self.config.server.hostname,
            sender=to,
            from_addr=self.bounce_from,
            recipients=recipients,
            original=data,
            arrival=msg.created,
            now=self.clock(),
            action=action,
        )
        dsn_qid = await self.inject("", (to,), dsn, FLAG_NO_DSN)
        log.info(
            "dsn_queued" if action == "failed" else "delay_warning_queued",
            qid=msg.id,
            dsn_qid=dsn_qid,
            to=to,
            recipients=[r.address for r in recipients],
        )
        return dsn_qid

    async def _dsn_and_finish(
        self, msg: QueuedMessage, data: bytes, removed: bool, failed: tuple[QueuedRecipient, ...]
    ) -> None:
        """Send one DSN for every failed recipient not yet reported, then drop the message
        when nothing is pending."""
        if removed:
            log.debug("removed", qid=msg.id)
            return
        if not failed:
            return
        if msg.mail_from and not (msg.flags & FLAG_NO_DSN):
            dsn_recipients = [DsnRecipient(r.address, r.orig, r.last_reply) for r in failed]
            await self._send_dsn(msg, data, dsn_recipients, "failed")
        else:
            log.info(
                "dsn_suppressed",
                qid=msg.id,
                reason="null sender or no-DSN message",
                recipients=[r.address for r in failed],
            )
        if await self.spool.finish(msg.id, [r.address for r in failed]):
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
        deferred = [
            DsnRecipient(u.address, "", u.reply)
            for u in updates
            if u.state is RecipientState.DEFERRED
        ]
        if deferred:
            await self._send_dsn(msg, data, deferred, "delayed")
            await self.spool.set_delay_warned(msg.id)
