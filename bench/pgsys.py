"""The relay on PostgreSQL under test (``bench/run.py --store postgresql``): one or two
``relay serve`` nodes (bench/relaysys.py configs with ``[storage] url``) on one fresh
database of a throwaway PostgreSQL cluster (tests/pg/pgcluster.py: Debian's binaries,
a Unix socket in a temp dir, ``fsync=on``, ``synchronous_commit=on``), started once per
benchmark run and removed at the end.

With two nodes the load generator spreads its clients over both nodes' ports. CPU is
split into ``relay`` (every node's processes) and ``postgres`` (the server's processes:
the postmaster and all its children, the backends, WAL writer and checkpointer); the
system's ``cpu_ms_per_msg`` is their sum.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.procstat import tree
from bench.relaysys import RelaySystem
from tests.pg.pgcluster import PASSWORD, PgCluster, remove_cluster, start_cluster


class PgServer:
    """The run's PostgreSQL cluster; ``database()`` a fresh database's URL. With
    ``stats``, pg_stat_statements (nested statements too: those of relay_record) is loaded
    and ``top_statements()`` reads and resets it."""

    def __init__(self, *, stats: bool = False) -> None:
        self.cluster: PgCluster = start_cluster()
        self.stats = stats
        os.environ["RELAY_DB_PASSWORD"] = PASSWORD  # the relay reads it at connect time
        if stats:
            self.cluster.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            self.cluster.restart()  # the library is loaded at start; then its settings
            self.cluster.psql("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
            self.cluster.psql("SELECT pg_reload_conf()")

    def top_statements(self, database: str, n: int = 25) -> list[dict[str, Any]]:
        """The ``n`` statements of ``database`` that took the most server time since the
        last call (calls, total and mean ms, rows, WAL bytes), then reset."""
        if not self.stats:
            return []
        self.cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", database)
        out = self.cluster.psql(
            "SELECT calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric,"
            " 4), rows, wal_bytes, regexp_replace(left(query, 160), '\\s+', ' ', 'g')"
            " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            f" WHERE d.datname = '{database}' ORDER BY total_exec_time DESC LIMIT {n}",
            database,
        )
        self.cluster.psql("SELECT pg_stat_statements_reset()", database)
        rows = []
        for line in out.splitlines():
            calls, total, mean, nrows, wal, query = line.split("|", 5)
            rows.append(
                {
                    "calls": int(calls),
                    "total_ms": float(total),
                    "mean_ms": float(mean),
                    "rows": int(nrows),
                    "wal_bytes": int(wal),
                    "query": query,
                }
            )
        return rows

    def database(self) -> str:
        return self.cluster.url(self.cluster.create_database())

    def pids(self) -> list[int]:
        try:
            first = (self.cluster.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return []
        return tree(int(first))

    def stop(self) -> None:
        remove_cluster(self.cluster)


class PgRelaySystem:
    """``nodes`` relay processes on one database of ``server``."""

    def __init__(
        self,
        name: str,
        server: PgServer,
        nodes: int,
        host: str,
        workdir: Path,
        dns: str,
        sink_port: int,
        **kw: Any,
    ) -> None:
        self.name = name
        self.server = server
        self.url = server.database()
        self.nodes = [
            RelaySystem(
                host,
                workdir / f"node-{i}",
                dns,
                sink_port,
                storage_url=self.url,
                node_id=f"bench-{i}",
                **kw,
            )
            for i in range(nodes)
        ]
        self.database = self.url.split("/", 3)[3].split("?", 1)[0]
        self.host = host
        self.port = self.nodes[0].port
        self.also_ports = [n.port for n in self.nodes[1:]]

    def start(self) -> None:
        try:
            for n in self.nodes:  # one after the other: the first migrates the database
                n.start()
        except BaseException:
            self.stop()
            raise

    def statements(self) -> list[dict[str, Any]]:
        """The database's costliest statements since the last call (``--pg-stats``)."""
        return self.server.top_statements(self.database)

    def relay_pids(self) -> list[int]:
        return [p for n in self.nodes for p in n.pids()]

    def pids(self) -> list[int]:
        return self.relay_pids() + self.server.pids()

    def parts(self) -> dict[str, list[int]]:
        return {"relay": self.relay_pids(), "postgres": self.server.pids()}

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def log_tail(self, n: int = 2000) -> str:
        return "\n".join(node.log_tail(n) for node in self.nodes)
