"""Several worker processes sharing the listen sockets, so the relay uses every core.

The parent binds the sockets, requeues what a crash left in flight, then forks the
workers. Each runs a whole RelayApp on the shared store (SQLite serialises the writers);
new mail is delivered by the worker that accepted it, and only worker 0 (the leader)
loads due mail from the store and runs the background loops. If a worker dies, the
parent stops the others, requeues, and starts them all again. SIGTERM is passed on.
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

import structlog

from relay.config import Config, HostPort
from relay.queue.spool import Spool
from relay.store import Store

log = structlog.get_logger("relay.workers")

PR_SET_PDEATHSIG = 1


def bind(hp: HostPort) -> socket.socket:
    family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((hp.host, hp.port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def recover(config: Config) -> int:
    store = Store(config.storage.path).open()
    try:
        return Spool(store).recover_sync()
    finally:
        store.close()


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
    from relay.app import RelayApp, run_loop

    _die_with_parent(parent)

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    app = RelayApp(config, leader=index == 0, recover=False)
    run_loop(app.serve_forever(sockets), factory)
    return 0


def run_workers(config: Config, factory: LoopFactory | None = None) -> int:
    """Fork config.server.workers workers, each running its loop made by factory
    (None: asyncio's default loop)."""
    import relay.app  # noqa: F401 - imported once here, not in every worker after fork

    n = config.server.workers
    sockets = [bind(hp) for hp in config.server.listen]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    children: dict[int, int] = {}
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        n_rec = recover(config)
        if n_rec:
            log.info("recovered_inflight", recipients=n_rec)
        parent = os.getpid()
        for i in range(n):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(config, i, sockets, parent, factory)
                finally:
                    os._exit(code)
            children[pid] = i
        log.info("workers_started", workers=n, pids=list(children))
        failed = False
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            index = children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if not stopping:
                log.error("worker_died", worker=index, pid=pid, code=code)
                failed = True
                on_signal(signal.SIGTERM, None)
        if stopping and not failed:
            return 0
        # a worker died: everything is stopped now; requeue and start again
        stopping = False
        time.sleep(1.0)
