"""Composition root: builds every component from Config, runs them under supervision,
handles signals and the graceful drain.

Background loops (scheduler, MTA-STS refresher, TLS-RPT ledger flush and daily sender)
run as supervised tasks: one that fails is logged and restarted after a back-off; none
of them can stop the SMTP service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from relay import metrics
from relay.config import Config
from relay.dns import Resolver, resolver_from_config
from relay.errors import ConfigError
from relay.intake import Intake, Router
from relay.queue.base import QueueSpool
from relay.queue.scheduler import Scheduler
from relay.queue.spool import Spool
from relay.stages import QueueLink
from relay.store import Store

if TYPE_CHECKING:
    from relay.lists.service import ListService
    from relay.lists.stage import ListsStage
    from relay.pgstore import PgStore

log = structlog.get_logger("relay.app")


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(config: Config, config_path: str = "config") -> LoopFactory | None:
    """The event loop `[server] event_loop` asks for: uvloop's (auto: when importable),
    or None for asyncio's default loop. Raises ConfigError when uvloop is required but
    missing."""
    choice = config.server.event_loop
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(config_path, "server.event_loop", "uvloop is not installed") from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run_loop(main: Coroutine[Any, Any, None], factory: LoopFactory | None) -> None:
    """asyncio.run(main) on a loop made by factory (None: asyncio's default)."""
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    s = config.server
    if s.tls_cert is None or s.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
    return ctx


async def supervise(name: str, factory: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> None:
    """Run factory() until stop is set; restart it with back-off when it fails."""
    delay = 0.5
    while not stop.is_set():
        try:
            await factory()
            if stop.is_set():
                return
            log.warning("task_exited", task=name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - supervision boundary
            log.error("task_failed", task=name, error=str(exc), exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 30.0)


def _bounce_to(srs_reverse: Callable[[str], str | None] | None) -> Callable[[str], str]:
    """DSNs for forwarded mail go to the original sender, not to our SRS address."""
    if srs_reverse is None:
        return lambda address: address
    reverse = srs_reverse
    return lambda address: reverse(address) or address


def _dsn_signer(config: Config) -> Callable[[bytes, str], bytes] | None:
    """The DSNs we write are DKIM-signed by the ``[[dkim.sign]]`` key of the bounce
    sender's domain (or a parent of it) when one exists: the one signing home,
    relay.auth.signer. None when no key is configured."""
    if not config.dkim_sign:
        return None
    from relay.auth.signer import DSN_FIELDS, OutboundSigner

    return OutboundSigner.from_config(config, DSN_FIELDS).sign


def _lists_local(courier: Any, lists: ListsStage) -> Any:
    """Queued mail for a list domain (the DSNs of list copies) is delivered to the lists."""
    from relay.lists.local import ListsLocal

    return ListsLocal(courier, lists)


def _build_submission(config: Config) -> Any:
    """Authenticated submission (relay.submission) when ``[submission]`` has listeners."""
    if not config.submission.enabled:
        return None
    from relay.submission.service import Submission

    return Submission(config.submission)


class RelayApp:
    """The running relay: SMTP server, intake, queue, delivery, MTA-STS, TLS-RPT."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.time,
        poll_interval: float | None = None,
        leader: bool = True,
        recover: bool = True,
    ) -> None:
        """``leader``: this process loads due mail from the store and runs the background
        loops (one leader among worker processes); ``recover``: requeue recipients left in
        flight by a crash (the parent does it once when there are several workers)."""
        from relay.unported import refuse_unported

        refuse_unported(config, "the relay")
        self.config = config
        self.leader = leader
        self.recover = recover
        self.clock = clock
        self._resolver = resolver  # the dnspython one is made in start()
        self.poll_interval = (
            config.storage.poll_interval if poll_interval is None else poll_interval
        )
        self.store: Any = Store(config.storage.path)  # or a PgStore (storage.url), at start
        self._unlisten: Callable[[], Awaitable[None]] | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.server: Any = None
        self.scheduler: Scheduler | None = None
        self.intake: Intake | None = None
        self.policy_manager: Any = None
        self.ledger: Any = None
        self.lists: ListService | None = None
        self.http_server: Any = None
        self.policy_server: Any = None
        self.tlsrpt_sender: Any = None  # the leader's, kept for relay.reload (its DKIM key)

    @property
    def bound(self) -> list[tuple[str, int]]:
        return list(self.server.bound) if self.server is not None else []

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        from relay.delivery.courier import Courier
        from relay.smtp.rules import RelayRules
        from relay.smtp.server import SmtpServer

        cfg = self.config
        self.resolver: Resolver
        if self._resolver is not None:
            self.resolver = self._resolver
        else:
            self.resolver = resolver_from_config(cfg.dns)
        spool = await self._open_storage()

        policy_lookup = None
        if cfg.mta_sts.enabled:
            self.policy_manager = self._build_policy_manager()
            policy_lookup = self.policy_manager.get_policy
        outcome_sink = None
        if cfg.tlsrpt.enabled:
            self.ledger = self._build_ledger()
            outcome_sink = self.ledger.record
        outcome_sink = metrics.counting_tls(outcome_sink)

        local = [(hp.host, hp.port) for hp in cfg.server.listen]
        courier = Courier(
            cfg,
            self.resolver,
            policy_lookup=policy_lookup,
            outcome_sink=outcome_sink,
            local_addresses=local,
        )
        self._closers.append(courier.close)

        from relay.auth.wiring import build_auth

        # the stages, in flow order (relay.stages, docs/flow.md): verdict and seal (auth
        # wiring), route (aliases from the relay rules, SRS from the auth wiring), intake,
        # the scheduler (the queue sink intake feeds) and the courier it hands recipients to
        auth = build_auth(cfg, self.resolver, self.store)
        self.auth = auth  # kept for relay.reload (SIGHUP)
        self._closers.append(auth.close)
        queue = QueueLink()  # intake -> scheduler (DSNs are queued by the spool itself)
        lists = self._build_lists(queue, spool)
        rules = RelayRules(
            cfg,
            extra_local_check=auth.local_check,
            list_check=lists.service.check_rcpt if lists is not None else None,
        )
        router = Router(
            expand=rules.expand, srs_forward=auth.srs_forward, srs_reverse=auth.srs_reverse
        )
        self.intake = Intake(
            cfg,
            spool,
            queue=queue,
            verdict=auth.verdict,
            router=router,
            sealer=auth.sealer,
            lists=lists,
            clock=self.clock,
        )
        self.scheduler = Scheduler(
            cfg,
            spool,
            courier if lists is None else _lists_local(courier, lists),
            clock=self.clock,
            poll_interval=self.poll_interval,
            loader=self.leader,
            bounce_to=_bounce_to(auth.srs_reverse),
            sign=_dsn_signer(cfg),
            lease=cfg.storage.lease,
        )
        queue.bind(self.scheduler)
        await self._listen(spool, self.scheduler)
        self.server = SmtpServer(
            cfg,
            self.intake.submit,
            rules,
            ssl_context=server_ssl_context(cfg),
            submission=_build_submission(cfg),
        )
        self._spawn("scheduler", self.scheduler.run)
        if (
            self.leader
            and self.policy_manager is not None
            and hasattr(self.policy_manager, "run_refresher")
        ):
            pm = self.policy_manager
            self._spawn("mta-sts-refresher", lambda: pm.run_refresher(self._stop))
        if self.ledger is not None:
            self._spawn("tlsrpt-ledger", self.ledger.run)
            sender = self._build_tlsrpt_sender() if self.leader else None
            self.tlsrpt_sender = sender
            if sender is not None:
                self._spawn("tlsrpt-sender", lambda: sender.run(self._stop))
        if lists is not None and self.leader:  # sweeps, resumed fan-outs, the pages
            svc = lists.service
            self._spawn("lists", lambda: svc.run(self._stop))
            await self._start_http(svc)
        elif self.leader:  # /metrics and /health without lists
            await self._start_http(None)
        if self.leader:
            await self._start_policy_server()
        await self.server.start(sockets)
        log.info(
            "started",
            listen=[f"{h}:{p}" for h, p in self.bound],
            hostname=cfg.server.hostname,
            store=self._store_name(),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )

    # ------------------------------------------------------------ storage

    async def _open_storage(self) -> QueueSpool:
        """The store and the queue on it. SQLite (``storage.path``): opened (migrated)
        and, with ``recover``, every other owner's lease expired at once (one relay holds
        the file). PostgreSQL (``storage.url``): this process's own PgStore (asyncpg
        pools belong to one event loop: each worker opens its own), every component's
        migrations under the advisory lock, and no recovery: the other owners may be live
        nodes, so a dead one's rows come back when their leases expire."""
        cfg = self.config
        if cfg.storage.postgresql:
            from relay.pgschema import migrate_all
            from relay.pgstore import store_for
            from relay.queue.pgspool import PgSpool

            pg: PgStore = await store_for(
                cfg.storage, application_name=f"relay:{cfg.server.node_id}"
            ).open()
            self.store = pg
            try:
                await migrate_all(pg)
            except BaseException:
                await pg.close()
                raise
            return PgSpool(pg, self.clock, node_id=cfg.server.node_id, lease=cfg.storage.lease)
        await asyncio.to_thread(self.store.open)
        spool = Spool(self.store, self.clock)
        if self.recover:
            from relay.workers import recover_store

            await asyncio.to_thread(recover_store, cfg, spool)
        return spool

    async def _listen(self, spool: QueueSpool, scheduler: Scheduler) -> None:
        """On PostgreSQL the loader (the leader) wakes on any node's NOTIFY: mail queued
        unclaimed, leases expired or given back (polling stays the bounded fallback)."""
        if not (self.config.storage.postgresql and self.leader):
            return
        from relay.queue.pgspool import PgSpool

        if isinstance(spool, PgSpool):
            self._unlisten = await spool.listen(scheduler.wake)

    def _store_name(self) -> str:
        if self.config.storage.postgresql:
            from relay.pgstore import safe_url

            return safe_url(self.config.storage.url)
        return str(self.config.storage.path)

    async def _close_storage(self) -> None:
        if self._unlisten is not None:
            with contextlib.suppress(Exception):
                await self._unlisten()
        if isinstance(self.store, Store):
            await asyncio.to_thread(self.store.close)
        else:
            await self.store.close()

    # ------------------------------------------------------------ optional parts

    def _build_lists(self, queue: QueueLink, spool: QueueSpool) -> ListsStage | None:
        """The mailing lists (relay.lists) when any is configured. Copies are signed and
        sealed in a pool of two processes of their own (the Python around each signature
        costs as much as the RSA, so threads would share one core); new copies are
        handed to the scheduler through the queue link, claimed under the spool's lease
        while the active window has room."""
        if not self.config.lists:
            return None
        from relay.auth.offload import make_crypto_pool
        from relay.lists.service import PARALLEL, ListService, build_sealer
        from relay.lists.stage import ListsStage

        pool = make_crypto_pool(PARALLEL)

        async def close_pool() -> None:
            pool.shutdown(wait=False, cancel_futures=True)

        self._closers.append(close_pool)
        self.lists = ListService(
            self.config,
            self.store,
            resolver=self.resolver,
            sealer=build_sealer(self.config),
            executor=pool,
            queue=queue,
            lease=lambda: (spool.owner, spool.lease),
            clock=self.clock,
        )
        self.lists.start_warm()  # the pool's processes started and keyed before any post
        return ListsStage(self.lists)

    async def _start_http(self, lists: ListService | None) -> None:
        """[http_server]: the lists' pages, /metrics and /health, in the leader only."""
        if not self.config.http_server.listen:
            return
        from relay.http_server import HttpServer

        self.http_server = HttpServer(self.config, lists)
        await self.http_server.start()
        self._closers.insert(0, self.http_server.stop)

    def _build_policy_manager(self) -> Any:
        from relay.mtasts.manager import PolicyManager

        return PolicyManager.from_config(self.config, self.resolver, self.store, self.clock)

    async def _start_policy_server(self) -> None:
        """[policy_server] listen: Postfix's smtp_tls_policy_maps answered from the same
        MTA-STS manager (cache, refresher) delivery uses, in the leader only."""
        if not self.config.policy_server.listen:
            return
        from relay.policyserver.server import PolicyServer
        from relay.policyserver.service import PolicyService

        lookup = self.policy_manager.get_policy if self.policy_manager is not None else None
        service = PolicyService(self.config, lookup, self.resolver)
        self.policy_server = PolicyServer(service, self.config.policy_server.listen)
        await self.policy_server.start()
        self._closers.insert(0, self.policy_server.stop)

    def _build_ledger(self) -> Any:
        from relay.tlsrpt.ledger import open_ledger

        owner = f"{self.config.server.node_id}:{os.getpid()}"
        return open_ledger(self.store, self.clock, owner=owner)

    def _build_tlsrpt_sender(self) -> Any:
        try:
            from relay.http import SafeHttpClient
            from relay.tlsrpt.sender import TlsRptSender
        except ImportError:
            return None
        assert self.intake is not None
        http = SafeHttpClient(
            self.resolver,
            ca_file=self.config.delivery.ca_file,
            allow_private=self.config.http.allow_private_addresses,
            timeout=60.0,
        )
        return TlsRptSender(
            self.config, self.ledger, self.resolver, http, self.intake.inject, clock=self.clock
        )

    # ------------------------------------------------------------ lifecycle

    def _spawn(self, name: str, factory: Callable[[], Awaitable[Any]]) -> None:
        self._tasks.append(asyncio.create_task(supervise(name, factory, self._stop), name=name))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let attempts in flight finish (or requeue them), close the store."""
        log.info("stopping")
        self._stop.set()
        if self.server is not None:
            await self.server.stop(grace)
        if self.scheduler is not None:
            await self.scheduler.stop(grace)
        if self.ledger is not None and hasattr(self.ledger, "close"):
            with contextlib.suppress(Exception):
                await self.ledger.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for close in self._closers:
            with contextlib.suppress(Exception):
                await close()
        await self._close_storage()
        log.info("stopped")

    def _on_sighup(self) -> None:
        from relay.reload import reload_app

        async def run() -> None:
            await reload_app(self)

        self._tasks.append(asyncio.get_running_loop().create_task(run(), name="reload"))

    async def serve_forever(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, done.set)
        await self.start(sockets)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await done.wait()
        await self.stop()
