"""The lists as intake sees them: the recipients of a transaction that are list
addresses are handed to the list service, the others go on through the ordinary route;
locally generated mail to a list address (a DSN for a list copy, sent to its
-bounces+TOKEN address) is handed over the same way.

What the list recipients write is one ``Pending`` unit: intake runs it inside the very
transaction that queues the message for its other recipients (``enqueue(..., also=)``
of relay.queue.spool or relay.queue.pgspool: ``Pending.run`` is in the form that store's
transaction takes, relay.lists.tx), so a message to a list and to others is one durable
write before its 250, on SQLite and on PostgreSQL: a crash leaves both or neither."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from relay.lists.service import ListService, Write
from relay.lists.tx import ListsDb, Tx
from relay.model import Envelope, QueueId
from relay.stages import Verdict


class Pending:
    """The list writes of one transaction: ``run`` inside a store transaction (the
    store's own callback: sync on a sqlite3 connection, async on an asyncpg one), then
    ``done`` once it is committed (fan-outs started, notices announced)."""

    def __init__(self, writes: Sequence[Write], store: ListsDb) -> None:
        self.writes = tuple(writes)
        self.store = store
        self._after: list[Callable[[], None]] = []
        self.run: Callable[[Any], object] = store.native(self.apply)

    async def apply(self, tx: Tx) -> None:
        self._after = [await w(tx) for w in self.writes]

    def done(self) -> None:
        for after in self._after:
            after()


class ListsStage:
    def __init__(self, service: ListService) -> None:
        self.service = service

    def split(self, recipients: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(list addresses, the others), order kept."""
        ours = tuple(r for r in recipients if self.service.address(r) is not None)
        rest = tuple(r for r in recipients if self.service.address(r) is None)
        return ours, rest

    async def prepare(
        self, env: Envelope, message: bytes, qid: QueueId, verdict: Verdict | None = None
    ) -> tuple[Envelope | None, Pending | None]:
        """(the envelope of the other recipients, or None when nothing is left for the
        ordinary route; the list recipients' writes, None when there are none). Nothing
        is written yet. Raises SmtpReplyError to refuse (a loop, a post too big).
        verdict: intake's, for a message it did not seal (the lists seal each copy
        once); None for locally generated mail."""
        ours, rest = self.split(env.rcpt_tos)
        writes, posts, seen = [], 0, set()
        for rcpt in ours:
            if rcpt.lower() in seen:  # the same list twice in one transaction: one post
                continue
            seen.add(rcpt.lower())
            w = await self.service.prepare(env, rcpt, message, qid, verdict, index=posts)
            posts += self._is_post(rcpt)
            if w is not None:
                writes.append(w)
        pending = Pending(writes, self.service.store) if writes else None
        if not rest:
            return None, pending
        return (replace(env, rcpt_tos=rest) if ours else env), pending

    def _is_post(self, rcpt: str) -> bool:
        la = self.service.address(rcpt)
        return la is not None and la.kind == "post"

    async def commit(self, pending: Pending | None) -> None:
        """The list writes alone (the message had no other recipient), one transaction."""
        if pending is None:
            return
        await self.service.store.write(pending.apply)
        pending.done()

    async def take(
        self, env: Envelope, message: bytes, qid: QueueId, verdict: Verdict | None = None
    ) -> Envelope | None:
        """prepare and commit the list part at once; the envelope of the rest."""
        rest, pending = await self.prepare(env, message, qid, verdict)
        await self.commit(pending)
        return rest
