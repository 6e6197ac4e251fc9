"""The lists as intake sees them: the recipients of a transaction that are list
addresses are handed to the list service (durably, before the 250), the others go on
through the ordinary route; locally generated mail to a list address (a DSN for a list
copy, sent to its -bounces+TOKEN address) is handed over the same way."""

from __future__ import annotations

from dataclasses import replace

from relay.lists.service import ListService
from relay.model import Envelope, QueueId
from relay.stages import Verdict


class ListsStage:
    def __init__(self, service: ListService) -> None:
        self.service = service

    def split(self, recipients: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(list addresses, the others), order kept."""
        ours = tuple(r for r in recipients if self.service.address(r) is not None)
        rest = tuple(r for r in recipients if self.service.address(r) is None)
        return ours, rest

    async def take(
        self, env: Envelope, message: bytes, qid: QueueId, verdict: Verdict | None = None
    ) -> Envelope | None:
        """Hand the list recipients of env to the service; the envelope of the rest, or
        None when nothing is left for the ordinary route. Raises SmtpReplyError to refuse
        (a loop, a post too big). verdict: intake's, for a message it did not seal (the
        lists seal each copy once); None for locally generated mail."""
        ours, rest = self.split(env.rcpt_tos)
        for rcpt in ours:
            await self.service.receive(env, rcpt, message, qid, verdict)
        if not rest:
            return None
        return replace(env, rcpt_tos=rest) if ours else env
