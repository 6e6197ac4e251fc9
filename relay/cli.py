"""The relay command line: serve, queue, sts, dane, tlsrpt, lab, diagnose, keygen, list, check,
db, nodes, policy-server, user.

Each subcommand lives in relay.commands.<name> with a ``register(subparsers)`` function
that adds its parser and sets ``func``; a handler returns the exit code. A config error
exits 2 with one line naming the file, the key and the problem; a start-up problem
(the store held by another relay, a listen address in use, a store that does not exist)
exits 2 with one line naming it.

A command that reads a config takes ``--config PATH``; without it, ``$RELAY_CONFIG``, and
without that ``/etc/relay/config.toml`` (so `relay queue list` works bare on a server).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from relay import __version__
from relay.errors import ConfigError, StartupError

COMMAND_MODULES = (
    "relay.commands.serve",
    "relay.commands.queue",
    "relay.commands.sts",
    "relay.commands.dane",
    "relay.commands.tlsrpt",
    "relay.commands.lab",
    "relay.commands.diagnose",
    "relay.commands.keygen",
    "relay.commands.configcmd",
    "relay.commands.list",
    "relay.commands.check",
    "relay.commands.db",
    "relay.commands.policy_server",
    "relay.commands.user",
    "relay.commands.nodes",
)
DEFAULT_CONFIG = "/etc/relay/config.toml"
CONFIG_ENV = "RELAY_CONFIG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # not built yet
            raise
        mod.register(sub)
    default_config_paths(parser)
    return parser


def default_config_paths(parser: argparse.ArgumentParser) -> None:
    """Every ``--config`` of every subcommand becomes optional (resolved by
    ``config_path`` after parsing), so no command module has to know the default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                default_config_paths(sub)
        elif action.dest == "config" and "--config" in action.option_strings:
            action.required = False
            action.default = None
            action.help = (action.help or "config.toml") + (
                f" (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})"
            )


def config_path(given: str | None) -> str:
    """--config, else $RELAY_CONFIG, else /etc/relay/config.toml."""
    return given or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "config" in args:
        args.config = config_path(args.config)
    from relay.logs import setup

    setup("warning", "plain")  # one plain line on stderr: stdout is for command output
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
