"""Two `relay serve` nodes on one database through pgbouncer in transaction pooling mode
(``[storage] pgbouncer = true``): A with a direct ``listen_url`` for its LISTEN, B with
none (it polls). Mail A queues unclaimed is delivered by B; every message once; the
queue commands work through the pooler; a database whose synchronous_commit default is
off is refused at start in one line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

from tests.e2e.pgharness import Node, Sink, mids, submit, until
from tests.pg.pgcluster import PgCluster


async def test_two_nodes_through_pgbouncer_deliver_each_message_once(
    tmp_path: Path, pgb_urls: tuple[str, str], lab_dns: tuple[str, int]
) -> None:
    bouncer, direct = pgb_urls
    dns, mx_port = lab_dns
    mx = Sink("127.0.0.2", mx_port, delay=0.05)
    await mx.start()
    # A takes one attempt at a time, so most of what it accepts is queued unclaimed and
    # taken by B's loader (B hears no NOTIFY: it polls every 0.2 s)
    a = Node(
        tmp_path,
        "bounce-a",
        bouncer,
        dns,
        mx_port,
        storage={"pgbouncer": True, "listen_url": direct, "pool_size": 4},
        delivery={"active_window": 1},
        logging={"level": "info"},
    )
    b = Node(
        tmp_path,
        "bounce-b",
        bouncer,
        dns,
        mx_port,
        storage={"pgbouncer": True, "pool_size": 4, "poll_interval": 0.2},
        logging={"level": "info"},
    )
    try:
        await a.start()
        await b.start()
        names = [f"pgb-{i}" for i in range(30)]
        codes = await asyncio.gather(
            *(submit((a if i % 3 else b).port, n) for i, n in enumerate(names))
        )
        assert codes == [250] * 30
        await mx.wait_for(30, timeout=30)
        await asyncio.sleep(0.5)  # a duplicate would show now
        assert sorted(mids(mx)) == sorted(f"<{n}@sender.test>" for n in names)
        await until(lambda: a.cli("queue", "list", "--json") == "[]\n", 10, "drained")
        nodes = json.loads(b.cli("nodes", "--json"))
        assert {n["node_id"] for n in nodes} >= {"bounce-a", "bounce-b"}
        assert "listen_off" in b.log.read_text()  # B: no LISTEN through the pooler
        assert "listen_off" not in a.log.read_text()
    finally:
        a.kill()
        b.kill()
        await mx.stop()


async def test_a_node_behind_pgbouncer_refuses_asynchronous_commit(
    tmp_path: Path, pgb_urls: tuple[str, str], pg_cluster: PgCluster, lab_dns: tuple[str, int]
) -> None:
    bouncer, _direct = pgb_urls
    dns, mx_port = lab_dns
    db = urllib.parse.urlsplit(bouncer).path.strip("/")
    pg_cluster.psql(f"ALTER DATABASE {db} SET synchronous_commit = off")
    node = Node(tmp_path, "lazy", bouncer, dns, mx_port, storage={"pgbouncer": True})
    res = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(node.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert any("synchronous_commit is 'off'" in ln for ln in lines), res.stderr[-2000:]
