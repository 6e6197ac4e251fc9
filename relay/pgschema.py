"""The schema of every component ported to the PostgreSQL store, in the order they are
migrated (``relay db migrate`` and the start of ``relay serve``): the queue, the ARC
replay counters, the lists, the MTA-STS policy cache and the TLS-RPT ledger — every
component the relay stores."""

from __future__ import annotations

from dataclasses import dataclass

from relay.auth import replay_pg
from relay.lists import members as lists_db
from relay.mtasts import cache_pg
from relay.pgstore import PgStore
from relay.queue import pgspool
from relay.tlsrpt import ledger_pg

COMPONENTS: dict[str, list[str]] = {
    "queue": pgspool.MIGRATIONS,
    "arc_replay": replay_pg.MIGRATIONS,
    "lists": lists_db.PG_MIGRATIONS,
    "mtasts": cache_pg.MIGRATIONS,
    "tlsrpt": ledger_pg.MIGRATIONS,
}


@dataclass(frozen=True, slots=True)
class Migrated:
    component: str
    version: int
    applied: int


async def migrate_all(store: PgStore) -> list[Migrated]:
    """Apply every component's pending steps (each under the advisory lock)."""
    out = []
    for name, steps in COMPONENTS.items():
        applied = await store.migrate(name, steps)
        out.append(Migrated(name, len(steps), applied))
    return out
