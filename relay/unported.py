"""What the PostgreSQL store (``[storage] url``) does not hold yet, and the guard that stops
a configuration needing it from starting (docs/postgresql.md). No asyncpg import here:
every command imports this.

Ported: every part — the queue (relay.queue.pgspool), the ARC replay counters
(relay.auth.replay_pg), the lists (relay.lists.members over relay.lists.tx), the MTA-STS
policy cache (relay.mtasts.cache_pg) and the TLS-RPT ledger (relay.tlsrpt.ledger_pg). The
check stays for what a later part adds: a configuration turning on a part not ported
refuses to start on ``storage.url`` in one line naming it — never runs it silently on a
local SQLite file (whose state another node would not share)."""

from __future__ import annotations

from relay.config import Config
from relay.errors import StartupError


def unported_parts(config: Config) -> list[str]:
    """The parts this configuration turns on that the PostgreSQL store cannot hold yet."""
    del config  # nothing configurable lacks a PostgreSQL form now
    return []


def refuse_unported(config: Config, what: str, parts: list[str] | None = None) -> None:
    """With ``[storage] url`` set, refuse (one line) when ``parts`` — by default the
    configured parts of ``unported_parts`` — would need the SQLite store."""
    if not config.storage.postgresql:
        return
    missing = unported_parts(config) if parts is None else parts
    if missing:
        raise StartupError(
            f"{what}: storage.url (PostgreSQL) does not hold {'; '.join(missing)}"
            " yet (docs/postgresql.md); use storage.path (SQLite) for it"
        )
