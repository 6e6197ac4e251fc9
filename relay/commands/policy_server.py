"""`relay policy-server --config PATH [--listen HOST:PORT]...`: the Postfix TLS policy
service on its own (relay.policyserver; docs/postfix-policy.md).

Postfix asks ``smtp_tls_policy_maps = socketmap:inet:HOST:PORT:NAME`` for each next-hop
domain; the answers come from the relay's MTA-STS cache (the store of ``--config``, the
same tables `relay serve` delivers with) and the refresher renews that cache in the
background. `relay serve` runs the same service itself when ``[policy_server] listen`` is
set, so one daemon can serve both; this command is for a host where Postfix delivers and
the relay does not (it needs no lock: it never touches the queue).

``--listen`` (repeatable) overrides ``[policy_server] listen``; without either,
127.0.0.1:8461. The first line on stdout names the bound addresses; SIGTERM or SIGINT
stops it (exit 0). A listen address in use: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from typing import Any

from relay.config import Config, HostPort, load_config, parse_hostport
from relay.errors import ConfigError

DEFAULT_LISTEN = HostPort("127.0.0.1", 8461)


def _hostport(text: str) -> HostPort:
    def bad(problem: str) -> ConfigError:
        raise argparse.ArgumentTypeError(problem)

    return parse_hostport(text, None, bad, allow_zero=True)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "policy-server",
        help="answer Postfix's smtp_tls_policy_maps (socketmap) from the MTA-STS cache",
    )
    p.add_argument("--config", required=True, help="path to config.toml")
    p.add_argument(
        "--listen",
        action="append",
        type=_hostport,
        metavar="HOST:PORT",
        help="listen here (repeatable; overrides [policy_server] listen)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from relay import preflight
    from relay.app import loop_factory, run_loop
    from relay.logs import setup
    from relay.unported import refuse_unported

    config = load_config(args.config)
    refuse_unported(config, "relay policy-server")
    setup(config.logging.level, config.logging.format)
    listen = tuple(args.listen or ()) or config.policy_server.listen or (DEFAULT_LISTEN,)
    factory = loop_factory(config, args.config)
    sockets = preflight.bind_listeners(listen)
    try:
        run_loop(serve(config, sockets), factory)
    finally:
        for s in sockets:
            s.close()
    return 0


async def serve(config: Config, sockets: list[socket.socket]) -> None:
    from relay.app import supervise
    from relay.dns import resolver_from_config
    from relay.mtasts.manager import PolicyManager
    from relay.policyserver.server import PolicyServer
    from relay.policyserver.service import PolicyService
    from relay.store import Store

    store = Store(config.storage.path, convert=False)
    await asyncio.to_thread(store.open)
    resolver = resolver_from_config(config.dns)
    manager = None
    if config.mta_sts.enabled:
        manager = PolicyManager.from_config(config, resolver, store)
    service = PolicyService(config, manager.get_policy if manager else None, resolver)
    server = PolicyServer(service, ())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[Any]] = []
    try:
        await server.start(sockets)
        where = " ".join(f"{h}:{p}" for h, p in server.bound)
        print(f"policy server listening on {where}", flush=True)
        if manager is not None:
            pm = manager
            refresh = supervise("mta-sts-refresher", lambda: pm.run_refresher(stop), stop)
            tasks.append(asyncio.create_task(refresh))
        await stop.wait()
    finally:
        await server.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(store.close)
