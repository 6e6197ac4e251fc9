"""Several worker processes sharing the listen sockets, so the relay uses every core.

The parent (``relay serve``, which already holds the store lock and has bound the
sockets) requeues what a crash left in flight, then forks the workers. Each runs a whole
RelayApp on the shared store (SQLite serialises the writers); new mail is delivered by
the worker that accepted it, and only worker 0 (the leader) loads due mail from the store
and runs the background loops.

Supervision:

* If a worker dies, the parent logs why (exit code or signal), stops the others,
  requeues, and starts them all again after a back-off that doubles with each death in
  a row (1 s up to 30 s) and resets once the workers have run for a while, so a poison
  message cannot crash-loop every worker once a second.
* SIGTERM / SIGINT stop the relay whatever the parent is doing: waiting, stopping the
  others after a death, sleeping before a restart or forking. They are blocked while a
  worker is forked, so no worker starts unaware of a stop.
* A worker that stops on a configuration or start-up error exits 2; the parent does not
  restart it but stops and exits 2 (the parent's checks make this rare).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from relay import logs
from relay.config import Config, HostPort
from relay.errors import ConfigError, StartupError
from relay.queue.spool import Spool
from relay.store import Store

log = structlog.get_logger("relay.workers")

PR_SET_PDEATHSIG = 1
EXIT_FATAL = 2  # a worker's config / start-up error: restarting cannot help
STOP_GRACE = 30.0  # seconds a worker gets to drain after SIGTERM before SIGKILL
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def bind(hp: HostPort) -> socket.socket:
    from relay.preflight import bind_listeners

    return bind_listeners((hp,))[0]


def recover(config: Config) -> int:
    """``recover_store`` on the SQLite store, opened for it. On a shared PostgreSQL store
    nothing: other nodes' leases may be live (they expire)."""
    if config.storage.postgresql:
        return 0
    store = Store(config.storage.path).open()
    try:
        return recover_store(config, Spool(store))
    finally:
        store.close()


def recover_store(config: Config, spool: Spool) -> int:
    """At the start of a relay on its SQLite store (which one relay holds, so every
    other owner is dead): requeue what they left in flight and free the lists' fan-outs
    they had leased. Returns how many recipients were requeued (both logged)."""
    n = spool.recover_sync()
    if n:
        log.info("recovered_inflight", recipients=n)
    if config.lists:
        from relay.lists.members import release_fanouts

        released = release_fanouts(spool.store)
        if released:
            log.info("fanouts_released", posts=released)
    return n


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting the workers after a death: doubles with each death in a
    row (initial, 2 x initial, ... up to cap); a run of at least ``stable`` seconds
    counts as healthy and starts the series again."""

    initial: float = 1.0
    cap: float = 30.0
    stable: float = 60.0

    def next(self, previous: float | None, ran: float) -> float:
        if previous is None or ran >= self.stable:
            return self.initial
        return min(previous * 2, self.cap)


def describe_exit(code: int) -> dict[str, object]:
    """Log fields saying why a process ended: its exit code, or the signal that killed it
    (os.waitstatus_to_exitcode gives -signum for those)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return {"signal": name}
    return {"exit_code": code}


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the parent dies (even by kill -9), so no
    orphan keeps delivering while a restarted relay requeues its mail in flight."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's SIGTERM path still works
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _child(
    config: Config,
    index: int,
    sockets: list[socket.socket],
    parent: int,
    factory: LoopFactory | None,
) -> int:
    """A worker's life; returns its exit code and logs why it stops early."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app reloads on it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    _die_with_parent(parent)
    logs.bind_process(index)  # the app's one "started" line names this worker and pid
    try:
        from relay.app import RelayApp, run_loop

        app = RelayApp(config, leader=index == 0, recover=False)
        run_loop(app.serve_forever(sockets), factory)
    except (ConfigError, StartupError) as exc:
        log.error("worker_config_error", worker=index, error=str(exc))
        return EXIT_FATAL
    except BaseException:
        log.exception("worker_crashed", worker=index)
        return 1
    return 0


class _Supervisor:
    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        factory: LoopFactory | None,
        backoff: Backoff,
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.factory = factory
        self.backoff = backoff
        self.children: dict[int, int] = {}  # pid -> worker index
        self.lists_live = bool(config.lists)  # the workers start their list service
        self.shutdown = False  # a real SIGTERM/SIGINT: set only by on_signal

    def on_hup(self, _signum: int, _frame: object) -> None:
        """SIGHUP: each worker reloads its config (relay.reload); the parent takes the
        reloaded config too (the old one when the new is invalid), for the workers it
        starts after a death."""
        from relay.reload import reload_config

        log.info("reload_requested", workers=list(self.children))
        self.config = reload_config(self.config, self.lists_live)
        self.terminate(signal.SIGHUP)

    def on_signal(self, signum: int, _frame: object) -> None:
        if not self.shutdown:
            log.info("stopping", signal=signal.Signals(signum).name)
        self.shutdown = True
        self.terminate()

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def start_workers(self) -> None:
        parent = os.getpid()
        for i in range(self.config.server.workers):
            if self.shutdown:
                return
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            try:
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        code = _child(self.config, i, self.sockets, parent, self.factory)
                    finally:
                        os._exit(code)
                self.children[pid] = i
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # pending ones run now
        log.info(
            "workers_started", workers=len(self.children), pids=list(self.children), parent=parent
        )

    def reap(self, block: bool = True) -> tuple[int, int, int] | None:
        """One ended worker as (pid, index, exit code), or None (nothing ended yet when
        not blocking; no workers left)."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return None
            if pid == 0:
                return None
            index = self.children.pop(pid, None)
            if index is not None:
                return pid, index, os.waitstatus_to_exitcode(status)
        return None

    def stop_all(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every worker, SIGKILL what is left after grace; wait for them all."""
        self.terminate()
        deadline = time.monotonic() + grace
        while self.children:
            if self.reap(block=False) is None and self.children:
                if time.monotonic() >= deadline:
                    log.warning("workers_killed", pids=list(self.children))
                    self.terminate(signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.05)

    def sleep(self, seconds: float) -> None:
        """Sleep before a restart; a stop signal ends it at once."""
        end = time.monotonic() + seconds
        while not self.shutdown and time.monotonic() < end:
            time.sleep(min(0.05, max(end - time.monotonic(), 0.0)))

    def run(self) -> int:
        delay: float | None = None
        while not self.shutdown:
            recover(self.config)
            started = time.monotonic()
            self.start_workers()
            if self.shutdown:
                break
            ended = self.reap()
            if ended is None or self.shutdown:
                break
            pid, index, code = ended
            ran = time.monotonic() - started
            why = describe_exit(code)
            log.error("worker_died", worker=index, pid=pid, ran=round(ran, 1), **why)
            self.stop_all()
            if code == EXIT_FATAL:
                log.error("workers_fatal", reason="a worker could not start; see above")
                return EXIT_FATAL
            if self.shutdown:
                break
            delay = self.backoff.next(delay, ran)
            log.info("workers_restart", delay=delay)
            self.sleep(delay)
        self.stop_all()
        return 0


def run_workers(
    config: Config,
    factory: LoopFactory | None = None,
    sockets: list[socket.socket] | None = None,
    backoff: Backoff | None = None,
) -> int:
    """Fork config.server.workers workers, each running its loop made by factory
    (None: asyncio's default loop), on sockets (None: bound here). Returns the exit code:
    0 after SIGTERM/SIGINT, 2 when a worker cannot start."""
    import relay.app  # noqa: F401 - imported once here, not in every worker after fork

    if sockets is None:
        from relay.preflight import bind_listeners
        from relay.smtp.server import listeners

        sockets = bind_listeners(tuple(hp for hp, _ in listeners(config)))
    sup = _Supervisor(config, sockets, factory, backoff or Backoff())
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    signal.signal(signal.SIGHUP, sup.on_hup)
    return sup.run()
