"""`relay serve --config PATH`: run the relay in the foreground until SIGTERM."""

from __future__ import annotations

import argparse

from relay.config import load_config
from relay.logs import setup


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the relay in the foreground")
    p.add_argument("--config", required=True, help="path to config.toml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    setup(config.logging.level, config.logging.format)
    from relay.app import RelayApp, loop_factory, run_loop

    factory = loop_factory(config, args.config)
    if config.server.workers > 1:
        from relay.workers import run_workers

        return run_workers(config, factory)
    run_loop(RelayApp(config).serve_forever(), factory)
    return 0
