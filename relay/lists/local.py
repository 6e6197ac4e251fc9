"""Local delivery to the lists (Postfix's local transport, for list domains only): queued
mail whose destination is a list domain is handed to the list service instead of going
on the wire. That is how the relay's own DSNs for list copies (queued by the scheduler
to the copy's -bounces+TOKEN address, atomically with the failure they report) reach
bounce processing; the list domain's MX may well be this relay, which the courier
refuses to deliver to (a loop)."""

from __future__ import annotations

from typing import Protocol

from relay import logs
from relay.errors import SmtpReplyError
from relay.lists.stage import ListsStage
from relay.model import AttemptResult, DeliveryJob, Envelope, RecipientResult, RecipientState

log = logs.get("relay.lists")


class Courier(Protocol):
    async def deliver(self, job: DeliveryJob) -> AttemptResult: ...


class ListsLocal:
    """A courier that delivers list-domain jobs to the lists and the rest through the
    real courier."""

    def __init__(self, courier: Courier, lists: ListsStage) -> None:
        self.courier = courier
        self.lists = lists
        self.domains = frozenset(c.domain for c in lists.service.lists.values())

    async def deliver(self, job: DeliveryJob) -> AttemptResult:
        if job.domain.lower().rstrip(".") not in self.domains:
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
