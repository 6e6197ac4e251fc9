"""The relay command line: serve, queue, sts, dane, tlsrpt, lab, diagnose, keygen, list, check, db.

Each subcommand lives in relay.commands.<name> with a ``register(subparsers)`` function
that adds its parser and sets ``func``; a handler returns the exit code. A config error
exits 2 with one line naming the file, the key and the problem; a start-up problem
(the store held by another relay, a listen address in use, a store that does not exist)
exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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
    "relay.commands.list",
    "relay.commands.check",
    "relay.commands.db",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from relay.logs import setup

    setup("warning", "auto")  # on stderr: stdout is for command output only
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
