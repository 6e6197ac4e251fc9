"""`relay serve --config PATH`: run the relay in the foreground until SIGTERM.

Before anything starts: the config is read, every file and address it names is checked
(relay.preflight), the store is locked for this process (relay.storelock: one store,
one running relay) and the listen sockets are bound. Any problem there is one line on
stderr and exit code 2; only then do the workers (or the one in-process relay) start.
"""

from __future__ import annotations

import argparse
import signal

from relay.config import load_config
from relay.logs import bind_process, setup


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the relay in the foreground")
    p.add_argument("--config", required=True, help="path to config.toml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from relay import preflight
    from relay.storelock import StoreLock

    config = load_config(args.config)
    from relay.unported import refuse_unported

    refuse_unported(config, "relay serve")
    setup(config.logging.level, config.logging.format)
    from relay.app import RelayApp, loop_factory, run_loop

    factory = loop_factory(config, args.config)
    preflight.check(config)
    lock = StoreLock(config.storage.path).acquire()
    from relay import metrics

    metrics.init(metrics.directory_for(config.storage.path))  # before the workers fork
    try:
        from relay.smtp.server import listeners

        sockets = preflight.bind_listeners(tuple(hp for hp, _ in listeners(config)))
        if config.server.workers > 1:
            from relay.workers import run_workers

            return run_workers(config, factory, sockets)
        bind_process(0)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the app reloads on it once started
        run_loop(RelayApp(config).serve_forever(sockets), factory)
        return 0
    finally:
        lock.release()
