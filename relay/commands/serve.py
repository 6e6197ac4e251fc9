"""`relay serve --config PATH`: run the relay in the foreground until SIGTERM.

Before anything starts: the config is read, every file and address it names is checked
(relay.preflight), the SQLite store is locked for this process (relay.storelock: one
store, one running relay; a shared PostgreSQL store, ``storage.url``, takes no lock: its
nodes coordinate by leases) and the listen sockets are bound. Any problem there is one line on
stderr and exit code 2; only then do the workers (or the one in-process relay) start.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from relay.config import Config, load_config
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
    lock = None if config.storage.postgresql else StoreLock(config.storage.path).acquire()
    from relay import metrics

    mdir = _metrics_dir(config)
    metrics.init(mdir)  # before the workers fork
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
        if lock is not None:
            lock.release()
        if config.storage.postgresql:
            import shutil

            shutil.rmtree(mdir.parent, ignore_errors=True)


def _metrics_dir(config: Config) -> Path:
    """Beside the SQLite store; on PostgreSQL (no local store) a private directory of
    this serve's own under the temp dir (the per-process files live only as long as it)."""
    from relay import metrics

    if not config.storage.postgresql:
        return metrics.directory_for(config.storage.path)
    import tempfile

    return Path(tempfile.mkdtemp(prefix="relay-metrics-")) / "metrics"
