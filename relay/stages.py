"""The stages a message passes through, as typed interfaces (docs/flow.md, docs/design.md).

Flow order, each hand-over one of these protocols, all built once in ``relay.app``:

1. the SMTP session (``relay.smtp.server``) hands the accepted bytes to intake
   (``SubmitFn``); intake parses them once into a ``relay.message.ParsedMessage``;
2. intake runs ``VerdictStage.judge`` (forged A-R removed, SPF/DKIM/DMARC/ARC, our A-R;
   raises ``SmtpReplyError`` to refuse), ``RouteStage.route`` (aliases, SRS; lists
   later), ``SealStage.seal`` (the ARC set), then writes the spool and tells the
   ``QueueSink`` (the scheduler);
3. the scheduler hands recipients to the courier (``relay.queue.scheduler.CourierLike``)
   and has the spool queue its DSNs together with the marks that say they were sent;
   other locally generated mail (TLS reports) enters through a ``Submitter`` (intake's
   ``inject``).

Each stage reads and returns immutable values; none holds a reference to the next
stage, so a walk of one message from the session to the courier never loses sight of
it: session -> intake.submit -> judge -> route -> seal -> spool + QueueSink.submit_new ->
scheduler -> courier.deliver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.auth.types import ArcCv, ArcResult
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope, QueueId
from relay.queue.spool import NewMessage

# The SMTP session's hand-over: (connection, envelope, DATA bytes) -> text after "250 ".
SubmitFn = Callable[[ConnInfo, Envelope, bytes], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Judged:
    """What the verdict stage hands on: the message as it will be sealed and queued, the
    Authentication-Results value the AAR repeats, and the ARC chain's state (the cv the
    seal states)."""

    message: ParsedMessage
    ar_value: str
    chain: ArcResult = ArcResult(ArcCv.NONE)
    # the author (RFC5322.From) domain and the DMARC policy it publishes (p=, sp= or np=,
    # "" when none) as the DMARC check found them; None: not checked ([auth] off)
    author_policy: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verdict intake recorded for a message it hands to the lists unsealed: our
    Authentication-Results value (the AAR of each copy's ARC set repeats it) and the ARC
    chain's state as it arrived (the cv that set states). Each list copy carries one ARC
    set of ours, i = previous + 1, over its final header fields (RFC 8617 section 5.1)."""

    ar: str
    chain: ArcResult = ArcResult(ArcCv.NONE)
    # (author domain, published DMARC policy) from intake's DMARC check, so the lists
    # need not look it up again; None: unknown (the lists look it up)
    author_policy: tuple[str, str] | None = None

    def stored(self) -> tuple[str, str]:
        """(ar, cv) as the lists' tables keep them."""
        return (self.ar, str(self.chain.cv))


class VerdictStage(Protocol):
    async def judge(self, conn: ConnInfo, env: Envelope, message: ParsedMessage) -> Judged:
        """The verdict applied: raises SmtpReplyError to refuse the message."""
        ...


@dataclass(frozen=True, slots=True)
class Route:
    """Where a message goes: the reverse-path it is sent with (SRS-rewritten when it is
    forwarded), its recipients, and the address given at RCPT for each of them."""

    mail_from: str
    recipients: tuple[str, ...]
    originals: tuple[str, ...]


class RouteStage(Protocol):
    def route(self, env: Envelope) -> Route: ...


class SealStage(Protocol):
    async def seal(self, judged: Judged) -> ParsedMessage:
        """The judged message with our ARC set on top (unchanged when none is added)."""
        ...


class QueueSink(Protocol):
    """The scheduler as intake sees it: a place in the active window, and new mail."""

    def reserve(self, share: float = 1.0) -> bool: ...

    def release(self) -> None: ...

    def submit_new(self, qid: QueueId, msg: NewMessage, created: float, claimed: bool) -> None: ...


class Submitter(Protocol):
    """Locally generated mail (DSNs, TLS reports) into the queue: intake's ``inject``."""

    async def inject(
        self, mail_from: str, recipients: Sequence[str], data: bytes, flags: int = 0
    ) -> QueueId: ...


class AcceptAll:
    """The verdict stage when ``[auth]`` and ``[arc]`` are off: every message goes on,
    with nothing to repeat in an AAR."""

    def __init__(self, authserv_id: str) -> None:
        self.ar_value = f"{authserv_id}; none"

    async def judge(self, conn: ConnInfo, env: Envelope, message: ParsedMessage) -> Judged:
        return Judged(message, self.ar_value)


class NoSeal:
    """The seal stage when ``[arc]`` is off."""

    async def seal(self, judged: Judged) -> ParsedMessage:
        return judged.message


class QueueLink:
    """The one true cycle of the house, made explicit: intake feeds the scheduler
    (``QueueSink``). Intake is built with this link, then the scheduler, and the link is
    bound to the scheduler once, right after; it refuses a second binding, and mail
    handed to it before it is bound is a programming error (the SMTP server starts only
    after the scheduler is built)."""

    def __init__(self) -> None:
        self._sink: QueueSink | None = None

    def bind(self, sink: QueueSink) -> None:
        if self._sink is not None:
            raise RuntimeError("QueueLink is bound already")
        self._sink = sink

    @property
    def sink(self) -> QueueSink:
        if self._sink is None:
            raise RuntimeError("QueueLink used before the scheduler was built")
        return self._sink

    def reserve(self, share: float = 1.0) -> bool:
        return self.sink.reserve(share)

    def release(self) -> None:
        self.sink.release()

    def submit_new(self, qid: QueueId, msg: NewMessage, created: float, claimed: bool) -> None:
        self.sink.submit_new(qid, msg, created, claimed)
