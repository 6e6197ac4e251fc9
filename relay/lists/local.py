"""Local delivery to the lists (Postfix's local transport, for list domains only): queued
mail whose destination is a list domain is handed to the list service instead of going
on the wire. That is how the relay's own DSNs for list copies (queued by the scheduler
to the copy's -bounces+TOKEN address, atomically with the failure they report) reach
bounce processing; the list domain's MX may well be this relay, which the courier
refuses to deliver to (a loop)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from relay import logs
from relay.errors import SmtpReplyError
from relay.lists.stage import ListsStage
from relay.model import AttemptResult, DeliveryJob, Envelope, RecipientResult, RecipientState

log = logs.get("relay.lists")


class Courier(Protocol):
    async def deliver(self, job: DeliveryJob) -> AttemptResult: ...


Done = Callable[[DeliveryJob, AttemptResult], None]
NextJob = Callable[[], DeliveryJob | None]


class ListsLocal:
    """A courier that delivers list-domain jobs to the lists and the rest through the
    real courier. ``deliver_many`` (one domain's jobs, one after another) is there when
    the real courier has it."""

    deliver_many: Callable[[NextJob, Done], Awaitable[None]] | None

    def __init__(self, courier: Courier, lists: ListsStage) -> None:
        self.courier = courier
        self.lists = lists
        self.domains = frozenset(c.domain for c in lists.service.lists.values())
        self._many: Callable[[NextJob, Done], Awaitable[None]] | None = getattr(
            courier, "deliver_many", None
        )
        self.deliver_many = self._deliver_many if self._many is not None else None

    async def _deliver_many(self, next_job: NextJob, done: Done) -> None:
        job = next_job()
        if job is None:
            return
        many = self._many
        if many is None or self._local(job):  # a lane is one domain
            while job is not None:
                done(job, await self.deliver(job))
                job = next_job()
            return
        first = [job]
        await many(lambda: first.pop() if first else next_job(), done)

    def _local(self, job: DeliveryJob) -> bool:
        return job.domain.lower().rstrip(".") in self.domains

    async def deliver(self, job: DeliveryJob) -> AttemptResult:
        if not self._local(job):
            return await self.courier.deliver(job)
        results = []
        for rcpt in job.recipients:
            results.append(await self._one(job, rcpt))
        return AttemptResult(job.domain, tuple(results), mx_host="local")

    async def _one(self, job: DeliveryJob, rcpt: str) -> RecipientResult:
        if self.lists.service.address(rcpt) is None:
            return RecipientResult(rcpt, RecipientState.FAILED, "550 5.1.1 no such list address")
        try:
            await self.lists.service.receive(
                Envelope(job.mail_from, (rcpt,)), rcpt, job.data, job.qid
            )
        except SmtpReplyError as exc:
            state = RecipientState.DEFERRED if exc.code < 500 else RecipientState.FAILED
            return RecipientResult(rcpt, state, exc.reply)
        log.info("list_local_delivery", qid=job.qid, rcpt=rcpt)
        return RecipientResult(rcpt, RecipientState.DELIVERED, "250 2.0.0 delivered to the list")
