"""What the PostgreSQL store (``[storage] url``) does not hold yet, and the guard that stops
those parts from starting on it (docs/postgresql.md). No asyncpg import here: every
command imports this."""

from __future__ import annotations

from relay.config import Config
from relay.errors import StartupError

NOT_PORTED = (
    "relay serve and intake on it",
    "MTA-STS policy cache",
    "TLS-RPT ledger",
    "ARC replay counters",
    "lists",
    "queue commands",
)


def refuse_unported(config: Config, what: str) -> None:
    """With ``[storage] url`` set, a part that still runs only on the SQLite store refuses
    to start (one line naming it) rather than run silently on a local SQLite file."""
    if config.storage.postgresql:
        raise StartupError(
            f"{what}: storage.url (PostgreSQL) holds only the queue's tables so far;"
            f" not ported yet: {', '.join(NOT_PORTED)} (docs/postgresql.md);"
            " use storage.path (SQLite) to run the relay"
        )
