"""Mail to a list's addresses handled, and the durable fan-out of posts.

``receive`` runs before the 250 of the transaction that brought the mail: a post is
checked (loop, size, who may post), made into the list-wide copy (relay.lists.transform)
and stored with the recipients it goes to, in one fsync'd write (or held, with the
owners' notices queued in the same write); the 250 follows. ``fan_out`` then makes each
member's copy (List-Unsubscribe with the member's token, DKIM by the list domain over
it, and one ARC set per batch over the list-wide fields: PER_MEMBER) in batches; each
batch's copies are queued in the same transaction that marks their recipients done, so
after a crash the fan-out resumes where the last commit left it: every member gets one
copy (duplicates only for copies whose delivery was in flight at the crash, as for any
queued mail).

Bounces, confirmations, unsubscriptions and owner mail are handled here too; periodic
``sweep`` expires held posts, removes long-disabled members and resumes fan-outs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from relay import logs, metrics
from relay.auth.arc import ArcSealer
from relay.auth.arcfields import AS, arc_instance
from relay.auth.fastrsa import FastARC, FastDKIM, PrependView, rfc822_parse
from relay.auth.signer import OutboundSigner
from relay.auth.types import ArcCv, ArcResult
from relay.config import Config, ListConfig
from relay.dns import Resolver
from relay.errors import SmtpReplyError, StoreError
from relay.lists import members as db
from relay.lists import notices, policy, transform
from relay.lists.addresses import ListAddress, address_of, parse_list_address
from relay.lists.bounces import read_bounce
from relay.lists.tx import Tx, lists_db
from relay.model import Envelope, QueueId, SmtpReply
from relay.queue.scheduler import LOADED_SHARE
from relay.queue.spool import (
    FLAG_NO_DSN,
    NewMessage,
    Spool,
    extract_message_id,
    new_qid,
)
from relay.stages import QueueSink, Verdict
from relay.store import Store

log = logs.get("relay.lists")

NotifyFn = Callable[[QueueId, NewMessage, float, bool], None]
# what mail to one list address writes: run inside a store transaction (alone, or in
# the one that queues the message's other recipients), it returns what to do once that
# transaction is committed (start the fan-out, tell the scheduler, log)
Write = Callable[[Tx], Awaitable[Callable[[], None]]]
BATCH = 50  # member copies per commit of the fan-out (one signing job each)
PARALLEL = 2  # signing processes the app gives the lists
IN_FLIGHT = 2 * PARALLEL  # signing jobs outstanding: a process never waits for a commit
TODO_PAGE = 1000  # recipients read from the store at once
FANOUT_LEASE = 60.0  # a fan-out's lease without a spool's (tests, commands)

_ARC_SEAL_CV = re.compile(rb"(?:^|;)\s*cv\s*=\s*([a-z]+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message the list queues: envelope and bytes."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes


def _top_seal(fields: Sequence[transform.Field]) -> tuple[int, bytes]:
    """The highest ARC-Seal instance in fields and its cv (0, b"" when none)."""
    top, cv = 0, b""
    for f in fields:
        if f.key == AS:
            value = f.raw.split(b":", 1)[1]
            i = arc_instance(AS, value)
            m = _ARC_SEAL_CV.search(value)
            if i is not None and i > top:
                top, cv = i, (m.group(1).lower() if m else b"")
    return top, cv


def chain_of(post: bytes) -> tuple[str, ArcResult]:
    """The AAR value and chain state read from a message that intake sealed (a post
    stored before the verdict was kept beside it): our Authentication-Results of the
    post, and the chain as intake left it (its newest set is ours: its cv says whether
    the older sets held)."""
    fields, _ = transform.split_message(post)
    ar = next((f.value() for f in fields if f.key == b"authentication-results"), "")
    top, cv = _top_seal(fields)
    if top == 0:
        return ar, ArcResult(ArcCv.NONE)
    state = ArcCv.FAIL if cv == b"fail" else ArcCv.PASS
    return ar, ArcResult(state, instances=top)


def verdict_of(post: bytes, stored: db.PostVerdict) -> Verdict:
    """The verdict a stored post's copies are sealed with: the one kept beside it, or
    (a post stored before it was kept, when intake still sealed) the one read from it."""
    ar, cv = stored
    if not cv:
        return Verdict(*chain_of(post))
    top, _ = _top_seal(transform.split_message(post)[0])
    return Verdict(ar, ArcResult(ArcCv(cv), instances=top))


# the fields of a list copy that differ from member to member: the list's DKIM signature
# covers them (RFC 8058 section 4), the ARC set does not (RFC 8617 section 4.1.2 leaves
# the AMS's fields to the sealer, as DKIM's h=), so one set serves every copy of a post
PER_MEMBER = (b"list-unsubscribe",)


class CopyMaker:
    """Per-member copies: personalise, DKIM-sign by the list domain, ARC-seal. Plain
    function of its inputs (runs in a thread: OpenSSL releases the GIL)."""

    def __init__(self, config: Config, signer: OutboundSigner, sealer: ArcSealer | None) -> None:
        self.config = config
        self.signer = signer
        self.sealer = sealer

    def copy(
        self, cfg: ListConfig, distributed: bytes, token: str, ar: str, chain: ArcResult
    ) -> bytes:
        msg = transform.personalise(distributed, cfg, self.config.lists_http.base_url, token)
        msg = self.signer.sign(msg, cfg.domain)
        if self.sealer is not None:
            ar = ar or f"{self.config.authserv_id}; none"
            msg = self.sealer.seal(msg, ar, chain, unsigned=PER_MEMBER)
        return msg

    def batch(
        self,
        cfg: ListConfig,
        distributed: bytes,
        rcpts: Sequence[tuple[str, str]],
        verdict: Verdict | None = None,
    ) -> list[tuple[str, str, bytes]]:
        """The copies of (address, token) recipients (none for an empty token): the same
        bytes ``copy`` makes, with the list-wide copy parsed and its body hashed once for
        the batch (only each copy's own fields on top, List-Unsubscribe and the
        DKIM-Signature, are parsed per copy) and the ARC set made once for the batch: it
        signs none of a copy's own fields (PER_MEMBER; the DKIM-Signature is never in an
        AMS), so it is the same set on every copy, and a copy costs one RSA signature,
        not three."""
        v = verdict or Verdict(*chain_of(distributed))
        todo = [(a, t) for a, t in rcpts if t]
        view = PrependView(distributed)
        if not todo or not view.usual or not self._composes(cfg, view, todo[0][1]):
            return [(a, t, self.copy(cfg, distributed, t, v.ar, v.chain)) for a, t in todo]
        ar = v.ar or f"{self.config.authserv_id}; none"
        dkim_signer = FastDKIM(b"")
        seal = b""
        if self.sealer is not None:
            seal = b"".join(
                self.sealer.seal_headers_prepended(
                    b"", view, FastARC(b""), ar, v.chain, unsigned=PER_MEMBER
                )
            )
        out = []
        for a, t in todo:
            top = transform.unsubscribe_field(cfg, self.config.lists_http.base_url, t)
            top = self.signer.signatures_prepended(top, view, cfg.domain, dkim_signer) + top
            out.append((a, t, seal + top + distributed))
        return out

    def _composes(self, cfg: ListConfig, view: PrependView, token: str) -> bool:
        """Whether the parse of a copy's own fields beside the reused parse of the list-wide
        copy is the parse of the whole copy (checked once a batch)."""
        top = transform.unsubscribe_field(cfg, self.config.lists_http.base_url, token)
        return view.view(top) == rfc822_parse(top + view.base)


_MAKERS: dict[tuple[object, ...], CopyMaker] = {}


def make_copies(
    config: Config,
    cfg: ListConfig,
    distributed: bytes,
    rcpts: Sequence[tuple[str, str]],
    verdict: Verdict | None = None,
) -> list[tuple[str, str, bytes]]:
    """CopyMaker.batch in a worker process: the keys are loaded once per process."""
    return _maker(config).batch(cfg, distributed, rcpts, verdict)


def _maker(config: Config) -> CopyMaker:
    key = (str(config.path), config.arc, config.dkim_sign, config.authserv_id)
    maker = _MAKERS.get(key)
    if maker is None:
        maker = CopyMaker(config, OutboundSigner.from_config(config), build_sealer(config))
        _MAKERS[key] = maker
    return maker


def prime(config: Config, hold: float = 0.2) -> int:
    """In a pool process, before any post: the imports done and the keys loaded (tens of
    milliseconds of CPU a key, more for the imports), which the first fan-out would
    otherwise pay. Holds the process a moment so that each of the PARALLEL prime jobs
    submitted at once starts a process of its own."""
    _maker(config)
    time.sleep(hold)
    return os.getpid()


def build_sealer(config: Config) -> ArcSealer | None:
    """The relay's ARC key ([arc]) for sealing list copies; None when sealing is off."""
    a = config.arc
    if not a.enabled or a.private_key is None or not a.domain or not a.selector:
        return None
    return ArcSealer(a.domain, a.selector, a.private_key.read_bytes(), config.authserv_id)


class ListService:
    def __init__(
        self,
        config: Config,
        store: Any,
        *,
        resolver: Resolver | None = None,
        signer: OutboundSigner | None = None,
        sealer: ArcSealer | None = None,
        executor: Executor | None = None,
        notify: NotifyFn | None = None,
        queue: QueueSink | None = None,
        lease: Callable[[], tuple[str, float]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``queue`` and ``lease`` (the scheduler's window and the spool's owner id and
        lease seconds): copies of a post are written in flight under that lease, each in
        a place of the window it reserved, and handed to the scheduler in memory (as
        intake does with new mail), so no loader reads them back; without a place left
        (or without these) a copy is queued for the loader."""
        self.config = config
        self.lists = config.lists
        self.store = lists_db(store)  # a Store, a PgStore (relay.lists.tx) or their ListsDb
        self.resolver = resolver
        self.signer = signer or OutboundSigner.from_config(config)
        self.maker = CopyMaker(config, self.signer, sealer)
        self.executor = executor
        self.notify = notify if notify is not None or queue is None else queue.submit_new
        self.queue = queue
        self.lease = lease
        self._own = (f"lists:{os.getpid()}:{secrets.token_hex(4)}", FANOUT_LEASE)
        self.clock = clock
        self.base_url = config.lists_http.base_url
        self._running: dict[str, asyncio.Task[int]] = {}
        self._lost: set[str] = set()  # fan-outs whose lease another owner took over
        self._warming: asyncio.Future[list[int]] | None = None
        if isinstance(store, Store):  # PostgreSQL's tables come from relay.pgschema
            db.open_tables(store)
            Spool(store)  # the queue's tables: copies and notices are written into them

    # ------------------------------------------------------------ RCPT

    def address(self, address: str) -> ListAddress | None:
        return parse_list_address(address, self.lists)

    def check_rcpt(self, address: str) -> SmtpReply | None:
        """For the RCPT rules: 250 for an address of a list, None for the rest."""
        if not self.lists:
            return None
        return SmtpReply(250, "2.1.5 OK") if self.address(address) is not None else None

    # ------------------------------------------------------------ one recipient

    async def receive(
        self,
        env: Envelope,
        rcpt: str,
        message: bytes,
        qid: QueueId,
        verdict: Verdict | None = None,
    ) -> None:
        """Handle mail for list address rcpt durably (raises SmtpReplyError to refuse).
        verdict: what intake recorded (message is then not sealed by intake); None for
        mail that was sealed or is our own (a DSN)."""
        write = await self.prepare(env, rcpt, message, qid, verdict)
        if write is not None:
            after = await self.store.write(write)
            after()

    async def prepare(
        self,
        env: Envelope,
        rcpt: str,
        message: bytes,
        qid: QueueId,
        verdict: Verdict | None = None,
        index: int = 0,
    ) -> Write | None:
        """The checks, lookups and signing for mail to list address rcpt (raises
        SmtpReplyError to refuse), and the write that makes it durable: the caller runs
        it in one transaction with the rest of the message (relay.lists.stage), then
        calls what it returns. None: nothing to write (a dropped bounce or auto-reply).
        index: this recipient's place among the transaction's list posts (the second
        post of one transaction, to another list, gets its own post id)."""
        la = self.address(rcpt)
        if la is None:
            raise SmtpReplyError(550, "5.1.1", "no such list address")
        if la.kind == "post":
            return await self._post(la, env, message, qid, verdict, index)
        if la.kind == "owner":
            return await self._owner(la, env, message, qid, verdict)
        handler = {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "bounces": self._bounce,
            "confirm": self._confirm,
        }[la.kind]
        return await handler(la, env, message, qid)

    def _sender(self, env: Envelope, message: bytes) -> str:
        return env.mail_from or transform.author(message)[1]

    async def _post(
        self,
        la: ListAddress,
        env: Envelope,
        message: bytes,
        qid: QueueId,
        verdict: Verdict | None = None,
        index: int = 0,
    ) -> Write | None:
        cfg = la.list
        if transform.has_our_list_id(message, cfg):
            log.warning("list_loop_refused", qid=qid, list=cfg.address)
            metrics.list_post("rejected", cfg.address)
            raise SmtpReplyError(554, "5.4.6", "Mail loop: this post came through this list")
        if len(message) > cfg.max_message_size:
            metrics.list_post("rejected", cfg.address)
            raise SmtpReplyError(552, "5.3.4", "Message too big for this list")
        if not env.mail_from or transform.auto_submitted(message):
            log.info("list_post_automatic_dropped", qid=qid, list=cfg.address)
            metrics.list_post("dropped", cfg.address)
            return None  # a bounce or auto-reply to the post address never goes there
        _, author = transform.author(message)
        now = self.clock()
        member = await self.store.read(lambda c: db.get_member(c, cfg.address, author))
        decision, reason = policy.posting_decision(
            cfg, member is not None and member.state != "pending"
        )
        known = verdict.author_policy if verdict is not None else None
        distributed = await self.distributed(cfg, message, qid, author, known)
        kept = (verdict or Verdict(*chain_of(message))).stored()
        if decision == "hold":
            return self._hold(
                cfg, env.mail_from, author, message, distributed, reason, qid, now, kept
            )
        post_id = qid if index == 0 else f"{qid}-{index}"

        async def run(c: Tx) -> Callable[[], None]:
            await self._store_post(c, cfg, post_id, distributed, now, kept)
            return functools.partial(self._accepted, post_id, cfg, author)

        return run

    def _accepted(self, post_id: str, cfg: ListConfig, author: str) -> None:
        log.info("list_post_accepted", qid=post_id, list=cfg.address, author=author)
        metrics.list_post("distributed", cfg.address)
        self.start_fan_out(post_id)

    async def _store_post(
        self,
        c: Tx,
        cfg: ListConfig,
        post_id: str,
        data: bytes,
        now: float,
        verdict: db.PostVerdict = ("", ""),
    ) -> int:
        rcpts = await db.active_addresses(c, cfg.address)
        if cfg.archive_public:  # RFC 2369 List-Archive, RFC 5064 Archived-At
            data = transform.with_archive(data, cfg, self.base_url, post_id)
        owner, seconds = self.fanout_lease()  # we start the fan-out after the commit
        lease = (owner, self.clock() + seconds)
        await db.store_post(c, post_id, cfg.address, data, rcpts, now, verdict, lease)
        if cfg.archive:
            mid = extract_message_id(data).strip().strip("<>")
            await db.archive(c, cfg.address, transform.author(data)[1], data, now, post_id, mid)
        if not rcpts:
            await db.mark_done(c, post_id, ())
        return len(rcpts)

    async def distributed(
        self,
        cfg: ListConfig,
        message: bytes,
        qid: QueueId,
        author: str,
        known: tuple[str, str] | None = None,
    ) -> bytes:
        """The list-wide copy; known: (domain, policy) from intake's DMARC check, used
        when it is the author's domain (else the policy is looked up here)."""
        dom = transform.address_domain(author)
        if known is not None and known[0] == dom:
            pol = known[1]
        else:
            pol = await self.author_policy(dom)
        mitigate = policy.needs_mitigation(cfg, pol)
        log.info(
            "list_dmarc",
            qid=qid,
            list=cfg.address,
            author_domain=dom,
            policy=pol,
            mitigation=cfg.dmarc_mitigation if mitigate else "none",
        )
        return transform.distribute(message, cfg, self.base_url, mitigate)

    async def author_policy(self, domain: str) -> str:
        """The DMARC policy the author's domain publishes (p=, sp=, np=), looked up
        through the relay's (caching) resolver: only when intake's verdict did not carry
        it (``[auth]`` off, mail from the scheduler, or a From the check did not use)."""
        if self.resolver is None or not domain:
            return ""
        from relay.auth.dmarc import discover

        try:
            found = await discover(self.resolver, domain)
        except Exception as exc:  # noqa: BLE001 - DNS trouble: no policy known
            log.warning("list_dmarc_lookup_failed", domain=domain, error=str(exc))
            return ""
        if found.record is None:
            return ""
        sub = found.record_domain != domain
        nonexistent = False
        if sub and "np=" in found.record.raw.lower():
            nonexistent = not await self._exists(domain)
        return policy.published_policy(found.record.raw, sub, nonexistent)

    async def _exists(self, domain: str) -> bool:
        from relay.errors import DnsNotFound

        assert self.resolver is not None
        try:
            await self.resolver.a(domain)
        except DnsNotFound:
            return False
        except Exception:  # noqa: BLE001 - NoData and failures: it may exist
            return True
        return True

    def _hold(
        self,
        cfg: ListConfig,
        mail_from: str,
        author: str,
        message: bytes,
        distributed: bytes,
        reason: str,
        qid: QueueId,
        now: float,
        verdict: db.PostVerdict = ("", ""),
    ) -> Write:
        subject = _subject(message)
        held_id = secrets.token_hex(4)
        outs = [
            self.notice(cfg, o, notices.held_notice(cfg, o, held_id, author, subject, reason))
            for o in cfg.owners
        ]

        async def run(c: Tx) -> Callable[[], None]:
            await db.hold(
                c,
                held_id,
                cfg.address,
                mail_from,
                author,
                subject,
                reason,
                distributed,
                now,
                verdict,
            )
            return functools.partial(done, [await self._queue(c, o, now) for o in outs])

        def done(queued: list[tuple[QueueId, NewMessage]]) -> None:
            self._notify(queued, now)
            metrics.list_post("held", cfg.address)
            log.info(
                "list_post_held",
                qid=qid,
                list=cfg.address,
                held=held_id,
                author=author,
                reason=reason,
            )

        return run

    async def _subscribe(
        self, la: ListAddress, env: Envelope, message: bytes, qid: QueueId
    ) -> Write | None:
        address = self._sender(env, message)
        if not address:
            return None
        return self._subscription(la.list, address, qid)

    async def request_subscription(self, cfg: ListConfig, address: str, qid: str = "") -> None:
        """Send one confirmation (at most one an hour per address); already a member:
        nothing is sent (and nothing tells the asker)."""
        after = await self.store.write(self._subscription(cfg, address, qid))
        after()

    def _subscription(self, cfg: ListConfig, address: str, qid: str) -> Write:
        now = self.clock()
        addr = db.normalise(address)

        async def run(c: Tx) -> Callable[[], None]:
            queued = []
            m = await db.get_member(c, cfg.address, addr)
            if (m is None or m.state == "pending") and await db.confirm_allowed(
                c, cfg.address, addr, now, policy.CONFIRM_INTERVAL
            ):
                token = await db.new_confirm(c, cfg.address, addr, now)
                note = notices.confirmation(cfg, addr, token, self.base_url)
                queued.append(await self._queue(c, self.notice(cfg, addr, note), now))
            return functools.partial(done, queued)

        def done(queued: list[tuple[QueueId, NewMessage]]) -> None:
            log.info("list_subscribe_request", qid=qid, list=cfg.address, sent=bool(queued))
            self._notify(queued, now)

        return run

    async def confirm(self, token: str) -> db.Member | None:
        now = self.clock()
        m = await self.store.write(
            lambda c: db.take_confirm(c, token, now - policy.CONFIRM_VALID, now)
        )
        if m is not None:
            log.info("list_subscribed", list=m.list, address=m.address)
        return m

    async def _confirm(
        self, la: ListAddress, env: Envelope, message: bytes, qid: QueueId
    ) -> Write | None:
        token, lst = la.token, la.list.address
        now = self.clock()

        def done(m: db.Member | None) -> None:
            if m is None or m.list != lst:
                log.info("list_confirm_unknown_token", qid=qid, list=lst)
            else:
                log.info("list_subscribed", qid=qid, list=m.list, address=m.address)

        async def run(c: Tx) -> Callable[[], None]:
            m = await db.take_confirm(c, token, now - policy.CONFIRM_VALID, now) if token else None
            return functools.partial(done, m)

        return run

    async def _unsubscribe(
        self, la: ListAddress, env: Envelope, message: bytes, qid: QueueId
    ) -> Write | None:
        address = self._sender(env, message)
        cfg = la.list
        ar, _ = chain_of(message)
        if not policy.sender_authenticated(ar, self.config.authserv_id):
            log.info("list_unsubscribe_unauthenticated", qid=qid, list=cfg.address)
            return None

        def done(gone: bool) -> None:
            log.info("list_unsubscribe_mail", qid=qid, list=cfg.address, removed=gone)

        async def run(c: Tx) -> Callable[[], None]:
            return functools.partial(done, await db.remove_member(c, cfg.address, address))

        return run

    async def unsubscribe_token(self, token: str) -> bool:
        m = await self.store.write(lambda c: db.remove_by_token(c, token))
        if m is not None:
            log.info("list_unsubscribed_one_click", list=m.list, address=m.address)
        return m is not None

    async def valid_member_token(self, token: str) -> bool:
        return await self.store.read(lambda c: db.member_by_token(c, token)) is not None

    async def valid_confirm_token(self, token: str) -> bool:
        oldest = self.clock() - policy.CONFIRM_VALID
        return await self.store.read(lambda c: db.confirm_lookup(c, token, oldest)) is not None

    async def _owner(
        self,
        la: ListAddress,
        env: Envelope,
        message: bytes,
        qid: QueueId,
        verdict: Verdict | None = None,
    ) -> Write | None:
        cfg = la.list
        if not env.mail_from:
            log.info("list_owner_bounce_dropped", qid=qid, list=cfg.address)
            return None
        sealer = self.maker.sealer
        if verdict is not None and sealer is not None:  # forwarded: our one ARC set
            message = await asyncio.to_thread(sealer.seal, message, verdict.ar, verdict.chain)
        now = self.clock()
        out = Outgoing(address_of(cfg, "bounces"), cfg.owners, message)

        async def run(c: Tx) -> Callable[[], None]:
            return functools.partial(self._notify, [await self._queue(c, out, now)], now)

        return run

    async def _bounce(
        self, la: ListAddress, env: Envelope, message: bytes, qid: QueueId
    ) -> Write | None:
        """VERP: the token in the address says who bounced (RFC 3464 / 5965 report or
        plain text); a bounce never goes to the list."""
        cfg = la.list
        report = read_bounce(message)
        token = la.token or report.token
        now = self.clock()
        day = time.strftime("%Y-%m-%d", time.gmtime(now))

        async def score(c: Tx) -> tuple[str, list[tuple[QueueId, NewMessage]]]:
            m = await db.member_by_token(c, token) if token else None
            if m is None or m.list != cfg.address:
                return "stranger", []
            if report.kind == "abuse":
                await db.remove_member(c, m.list, m.address)
                return "removed_abuse", []
            s = policy.score_bounce(
                m.score,
                m.last_scored,
                day,
                report.kind,
                cfg.bounce_threshold,
                m.state == "disabled",
            )
            if not s.counted:
                return "not_counted", []
            await db.set_score(c, m, s.score, day, now if s.disable else m.disabled_at)
            if not s.disable:
                return "scored", []
            probe = self.notice(cfg, m.address, notices.probe_notice(cfg, m.address))
            return "disabled", [await self._queue(c, probe, now)]

        def done(outcome: str, queued: list[tuple[QueueId, NewMessage]]) -> None:
            if outcome == "stranger":
                log.warning(
                    "list_bounce_unknown_token_dropped", qid=qid, list=cfg.address, kind=report.kind
                )
            else:
                log.info(
                    "list_bounce",
                    qid=qid,
                    list=cfg.address,
                    kind=report.kind,
                    status=report.status,
                    outcome=outcome,
                )
            self._notify(queued, now)

        async def run(c: Tx) -> Callable[[], None]:
            return functools.partial(done, *await score(c))

        return run

    # ------------------------------------------------------------ moderation

    async def approve(self, lst: str, held_id: str) -> bool:
        cfg = self.lists[lst]
        now = self.clock()

        async def run(c: Tx) -> bool:
            got = await db.take_held(c, lst, held_id)
            if got is None:
                return False
            await self._store_post(c, cfg, held_id, got[1], now, got[2])
            return True

        ok = await self.store.write(run)
        if ok:
            self.start_fan_out(held_id)
        return ok

    async def reject(self, lst: str, held_id: str, reason: str) -> bool:
        cfg = self.lists[lst]
        now = self.clock()

        async def run(c: Tx) -> tuple[QueueId, NewMessage] | None | bool:
            got = await db.take_held(c, lst, held_id)
            if got is None:
                return False
            held = got[0]
            if not held.mail_from:
                return None
            note = notices.rejected_notice(cfg, held.author, held.subject, reason)
            return await self._queue(c, self.notice(cfg, held.mail_from, note), now)

        res = await self.store.write(run)
        if res is False:
            return False
        if res is not None and res is not True:
            self._notify([res], now)
        return True

    # ------------------------------------------------------------ fan-out

    def start_warm(self) -> None:
        """Start the signing pool's processes now, keys loaded (relay.lists.service.prime),
        so the first post's fan-out does not pay for them; a failure is only logged (the
        first fan-out then loads them itself)."""
        if not isinstance(self.executor, ProcessPoolExecutor):
            return
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.executor, prime, self.config) for _ in range(PARALLEL)]
        task = asyncio.ensure_future(asyncio.gather(*jobs))
        task.add_done_callback(_warm_done)
        self._warming = task

    def fanout_lease(self) -> tuple[str, float]:
        """(owner, seconds) of this process's fan-out leases: the spool's lease owner and
        length when the relay gave them, else this service's own."""
        return self.lease() if self.lease is not None else self._own

    def start_fan_out(self, post_id: str) -> None:
        if post_id in self._running and not self._running[post_id].done():
            return
        task = asyncio.create_task(self.fan_out(post_id))
        task.add_done_callback(functools.partial(_fan_out_done, post_id))
        self._running[post_id] = task

    async def fan_out(self, post_id: str) -> int:
        """Queue every remaining member copy of a post; returns how many were queued.
        Recipients are taken BATCH at a time, one signing job each, IN_FLIGHT jobs at
        once; each batch's copies are committed (with their recipients marked done) as
        soon as its job returns, in whatever order the jobs finish: the marks, not the
        order, say what is left after a crash. The post's fan-out lease is taken first
        (renewed with each batch): while another owner's runs, that owner is making the
        copies and this returns 0."""
        owner, seconds = self.fanout_lease()

        async def take(c: Tx) -> bool:
            now = self.clock()
            return await db.take_fanout(c, post_id, owner, now, now + seconds)

        if not await self.store.write(take):
            log.info("list_fanout_elsewhere", qid=post_id)
            return 0
        got = await self.store.read(lambda c: db.post_data(c, post_id))
        if got is None:
            return 0
        lst, distributed = got
        stored = await self.store.read(lambda c: db.post_verdict(c, post_id))
        verdict = verdict_of(distributed, stored)
        cfg = self.lists.get(lst)
        if cfg is None:
            log.warning("list_gone_fanout_dropped", qid=post_id, list=lst)
            return 0
        job: Callable[
            [ListConfig, bytes, Sequence[tuple[str, str]], Verdict | None],
            list[tuple[str, str, bytes]],
        ]
        if isinstance(self.executor, ProcessPoolExecutor):
            job = functools.partial(make_copies, self.config)
        else:
            job = self.maker.batch
        loop = asyncio.get_running_loop()
        mid = extract_message_id(distributed)  # every copy's (its own fields go on top)
        slots = asyncio.Semaphore(IN_FLIGHT)
        running: set[asyncio.Task[int]] = set()
        failed: list[BaseException] = []
        total = 0

        async def one(todo: list[tuple[str, str]]) -> int:
            try:
                made = await loop.run_in_executor(
                    self.executor, job, cfg, distributed, todo, verdict
                )
                return await self._queue_batch(post_id, cfg, made, [a for a, _ in todo], mid)
            finally:
                slots.release()

        def finished(task: asyncio.Task[int]) -> None:
            nonlocal total
            running.discard(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                failed.append(exc)
            else:
                total += task.result()

        after = ""
        try:
            while not failed and post_id not in self._lost:
                page = await self.store.read(
                    functools.partial(_todo_page, post_id=post_id, after=after)
                )
                if not page:
                    break
                after = page[-1][0]
                for i in range(0, len(page), BATCH):
                    await slots.acquire()
                    if failed or post_id in self._lost:
                        slots.release()
                        break
                    task = asyncio.create_task(one(page[i : i + BATCH]))
                    running.add(task)
                    task.add_done_callback(finished)
            while running:
                await asyncio.wait(set(running))
        finally:
            for task in list(running):
                task.cancel()
        if failed:
            raise failed[0]
        if post_id in self._lost:
            self._lost.discard(post_id)
            log.warning("list_fanout_taken_over", qid=post_id, list=lst, copies=total)
            return total
        log.info("list_fanout_done", qid=post_id, list=lst, copies=total)
        return total

    async def _queue_batch(
        self,
        post_id: str,
        cfg: ListConfig,
        copies: Sequence[tuple[str, str, bytes]],
        done: Sequence[str],
        message_id: str | None = None,
    ) -> int:
        """One signed batch committed: its copies queued (in flight under our lease, in
        the places of the window reserved for them, when we have those), its recipients
        marked done; the scheduler told. Returns how many copies were queued."""
        now = self.clock()
        outs = [(a, Outgoing(address_of(cfg, "bounces", t), (a,), data)) for a, t, data in copies]
        places = 0
        if self.queue is not None and self.lease is not None:
            while places < len(outs) and self.queue.reserve(LOADED_SHARE):
                places += 1
        claim = self.lease() if places and self.lease is not None else None
        try:
            queued, leased = await self.store.write(
                lambda c: self._commit(
                    post_id, outs, done, now, c, claim=claim, places=places, message_id=message_id
                )
            )
        except BaseException:
            for _ in range(places):
                assert self.queue is not None
                self.queue.release()
            raise
        if not leased:  # taken over (this owner stalled past its lease): these copies
            self._lost.add(post_id)  # are queued (each recipient claimed), the new owner
        metrics.list_copies(cfg.address, len(queued))  # makes the rest
        mine = sum(1 for _, _, claimed in queued if claimed)
        for _ in range(places - mine):  # copies another fan-out had queued already
            assert self.queue is not None
            self.queue.release()
        if self.notify is not None:
            for qid, new, claimed in queued:
                self.notify(qid, new, now, claimed)
        return len(queued)

    async def _commit(
        self,
        post_id: str,
        outs: Sequence[tuple[str, Outgoing]],
        done: Sequence[str],
        now: float,
        c: Tx,
        *,
        claim: tuple[str, float] | None = None,
        places: int = 0,
        message_id: str | None = None,
    ) -> tuple[list[tuple[QueueId, NewMessage, bool]], bool]:
        """One batch: its copies queued and its recipients marked done, one transaction;
        with whether this owner still held the post's fan-out lease (now renewed).
        With ``claim`` (owner, lease seconds), the first ``places`` copies queued are
        written in flight under that lease (claimed: True in the result).
        ``message_id``: the copies' Message-ID when known (the list-wide copy's), else
        read from each."""
        queued: list[tuple[QueueId, NewMessage, bool]] = []
        for address, out in outs:  # only copies not queued by another fan-out of the post
            if await db.claim_recipient(c, post_id, address):
                mine = claim is not None and len(queued) < places
                qid = new_qid(now)
                new = NewMessage(
                    out.mail_from, out.recipients, out.data, (), 0, message_id=message_id
                )
                if mine and claim is not None:  # the lease runs from this write
                    until = self.clock() + claim[1]
                    await c.queue(qid, new, now, owner=claim[0], until=until)
                else:
                    await c.queue(qid, new, now)
                queued.append((qid, new, mine))
        owner, seconds = self.fanout_lease()
        leased = await db.renew_fanout(c, post_id, owner, self.clock() + seconds)
        claimed = {address for address, _ in outs}  # marked done by claim_recipient above
        rest = [a for a in done if a not in claimed]  # members without a copy (no token)
        await db.mark_done(c, post_id, rest)  # the last one deletes the post
        return queued, leased

    async def resume(self) -> int:
        """Start the fan-out of every unfinished post whose fan-out lease has expired
        (its owner died or stalled: another node's, or a relay's before a restart, whose
        leases the restart released) or is this process's own (a fan-out that failed);
        the others are being fanned out by their owners. Were two to run at once, no copy
        would be doubled: each recipient is claimed in the write of its copy."""
        owner, _ = self.fanout_lease()
        now = self.clock()
        posts = await self.store.read(lambda c: db.unfinished_posts(c, now, owner))
        for p in posts:
            self.start_fan_out(p)
        return len(posts)

    async def wait_idle(self) -> None:
        while any(not t.done() for t in self._running.values()):
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    # ------------------------------------------------------------ periodic

    async def sweep(self) -> None:
        """Expire held posts (7 days, the author told once), remove members disabled for
        14 days, resume unfinished fan-outs."""
        now = self.clock()

        async def run(c: Tx) -> list[tuple[QueueId, NewMessage]]:
            queued = []
            for h in await db.expired_held(c, now - policy.HELD_EXPIRY):
                cfg = self.lists.get(h.list)
                if await db.take_held(c, h.list, h.id) is None:
                    continue  # taken by another node's sweep or a moderator meanwhile
                if cfg is not None and h.mail_from:
                    note = notices.expired_notice(cfg, h.author, h.subject)
                    queued.append(await self._queue(c, self.notice(cfg, h.mail_from, note), now))
            for m in await db.expired_disabled(c, now - policy.DISABLED_REMOVE_AFTER):
                await db.remove_member(c, m.list, m.address)
            return queued

        queued = await self.store.write(run)
        self._notify(queued, now)
        await self.resume()

    async def run(self, stop: asyncio.Event, interval: float = 60.0) -> None:
        """The sweep every ``interval``; between sweeps, every half fan-out lease, the
        fan-outs whose owner stopped renewing are resumed (a node that died in the
        middle of a post's copies: another node finishes them within about 1.5 leases)."""
        check = min(interval, self.fanout_lease()[1] / 2)
        next_sweep = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + interval
                    await self.sweep()
                else:
                    await self.resume()
            except StoreError as exc:  # the store down: the next round tries again
                log.error("list_sweep_failed", error=str(exc))
            try:
                await asyncio.wait_for(stop.wait(), check)
            except TimeoutError:
                pass
        await self.wait_idle()

    # ------------------------------------------------------------ queueing

    def notice(self, cfg: ListConfig, to: str, data: bytes) -> Outgoing:
        """A notice of the list: DKIM-signed by the list domain; sent from -bounces (bare:
        its bounces are dropped, never looped)."""
        return Outgoing(address_of(cfg, "bounces"), (to,), self.signer.sign(data, cfg.domain))

    async def _queue(
        self, c: Tx, out: Outgoing, now: float, flags: int = FLAG_NO_DSN
    ) -> tuple[QueueId, NewMessage]:
        qid = new_qid(now)
        new = NewMessage(out.mail_from, out.recipients, out.data, (), flags)
        await c.queue(qid, new, now)
        return qid, new

    def _notify(self, queued: Sequence[tuple[QueueId, NewMessage]], now: float) -> None:
        if self.notify is None:
            return
        for qid, new in queued:
            self.notify(qid, new, now, False)


async def _todo_page(c: Tx, *, post_id: str, after: str) -> list[tuple[str, str]]:
    return await db.fanout_todo(c, post_id, TODO_PAGE, after=after)


def _warm_done(task: asyncio.Future[list[int]]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("list_pool_warm_failed", error=repr(exc))
    else:
        log.info("list_pool_ready", pids=sorted(set(task.result())))


def _fan_out_done(post_id: str, task: asyncio.Task[int]) -> None:
    """A fan-out that failed is logged; its post stays unfinished and the next sweep
    (or restart) resumes it."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("list_fanout_failed", qid=post_id, error=repr(exc), exc_info=exc)


def _subject(message: bytes) -> str:
    fields, _ = transform.split_message(message)
    f = transform.first(fields, b"subject")
    return f.value() if f else ""
