"""The queue interface the scheduler uses, which both stores implement: ``Spool`` (SQLite,
relay/queue/spool.py) and ``PgSpool`` (PostgreSQL, relay/queue/pgspool.py). The SQLite
spool's transitions are callbacks on a sqlite3 connection run by the group-commit writer
thread; PostgreSQL's are coroutines on an asyncpg connection. So the scheduler depends on
this Protocol, not on either class; the semantics (states, leases, DSN marks) are those
of docs/queue.md for both."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from relay.model import QueueId
from relay.queue.spool import (
    ListFilter,
    LogEntry,
    NewMessage,
    QueuedMessage,
    QueuedRecipient,
    RecipientUpdate,
)


class QueueSpool(Protocol):
    owner: str
    lease: float

    async def enqueue(
        self,
        msg: NewMessage,
        qid: QueueId | None = None,
        *,
        claimed: bool = False,
        also: Callable[[Any], object] | None = None,
    ) -> QueueId: ...

    async def claim(self, qid: QueueId, addresses: Sequence[str]) -> tuple[str, ...]: ...

    async def claim_due(self, qid: QueueId) -> tuple[str, ...]: ...

    async def renew(self, qids: Iterable[QueueId]) -> int: ...

    async def record(
        self, qid: QueueId, updates: Sequence[RecipientUpdate], *, settle: bool = True
    ) -> tuple[bool, tuple[QueuedRecipient, ...]]: ...

    async def settle(self, qid: QueueId) -> tuple[bool, tuple[QueuedRecipient, ...]]: ...

    async def enqueue_report(
        self,
        report: NewMessage,
        qid: QueueId,
        *,
        about: QueueId,
        failed: Sequence[str] = (),
        delay_warning: bool = False,
        claimed: bool = False,
    ) -> bool | None: ...

    async def set_delay_warned(self, qid: QueueId) -> None: ...

    async def mark_corrupt(self, qid: QueueId) -> None: ...

    async def expire_leases(self, keep: Iterable[QueueId] = ()) -> int: ...

    async def heartbeat(self) -> None: ...

    async def release(self, qids: Iterable[QueueId]) -> int: ...

    async def flush(self) -> int: ...

    async def delete(self, qid: QueueId) -> bool: ...

    # the operator's (relay queue ...)

    async def flush_domain(self, domain: str) -> int: ...

    async def delete_many(self, qids: Sequence[QueueId]) -> list[QueueId]: ...

    async def delete_all(self) -> int: ...

    async def hold(self, qids: Sequence[QueueId]) -> list[QueueId]: ...

    async def unhold(self, qids: Sequence[QueueId]) -> list[QueueId]: ...

    async def requeue(self, qids: Sequence[QueueId]) -> list[QueueId]: ...

    async def history(self, qid: QueueId) -> list[LogEntry]: ...

    async def due(self, now: float, limit: int, exclude: set[QueueId]) -> list[QueueId]: ...

    async def unreported(self, limit: int, exclude: set[QueueId]) -> list[QueueId]: ...

    async def next_due(self) -> float | None: ...

    async def load(self, qid: QueueId) -> tuple[QueuedMessage, bytes] | None: ...

    async def get(self, qid: QueueId) -> QueuedMessage | None: ...

    async def list(self, where: ListFilter | None = None) -> list[QueuedMessage]: ...

    async def prune_log(self, before: float) -> int: ...
