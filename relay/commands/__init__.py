"""Subcommands of the relay CLI; each module has register(subparsers) and run handlers."""

from __future__ import annotations

from relay.config import Config
from relay.errors import StartupError
from relay.store import Store


def open_existing_store(config: Config) -> Store:
    """The store of a command that reads one: refused when it does not exist (a wrong
    --config must not create and show an empty store)."""
    from relay.unported import refuse_unported

    refuse_unported(config, "this command", ["the tables it reads"])
    path = config.storage.path
    if not path.is_file():
        raise StartupError(
            f"store {path} does not exist (wrong --config? `relay serve` creates it)"
        )
    return Store(path, convert=False).open()  # the relay converts, under its lock
