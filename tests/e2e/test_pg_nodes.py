"""Several `relay serve` nodes on one PostgreSQL (issue 14), end to end: real `relay serve`
subprocesses with their own node_id and listen port, the throwaway PostgreSQL cluster, the
lab DNS server and a receiving MTA on loopback.

- one node accepts (250 after the commit) and delivers;
- two nodes on one database: every message delivered once; a message queued unclaimed on
  node A (its active window is full) is delivered by node B at once (NOTIFY, not B's
  poll); node A killed with SIGKILL while it holds a recipient in flight (the sink holds
  its DATA): node B delivers it once A's lease has expired; `relay queue list` names the
  lease owner and `relay nodes` the nodes, alive until their heartbeat is a lease old.

The faults under load (a node killed, PostgreSQL restarted, LISTEN lost) are in
test_pg_faults.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from relay.lab.mta import LabMta
from tests.e2e.pgharness import LEASE, Node, Sink, mids, submit, until

pytestmark = pytest.mark.slow


async def test_one_node_on_postgresql_accepts_and_delivers(
    tmp_path: Path, pg_url: str, lab_dns: tuple[str, int]
) -> None:
    dns, mx_port = lab_dns
    node = Node(tmp_path, "solo", pg_url, dns, mx_port, logging={"level": "info"})
    async with LabMta("127.0.0.2", mx_port, hostname="mx.dest.test") as mx:
        await node.start()
        try:
            assert await submit(node.port, "one") == 250
            await mx.wait_for(1, timeout=15)
            assert mids(mx) == ["<one@sender.test>"]
            await until(lambda: node.cli("queue", "list", "--json") == "[]\n", 10, "drained")
            log = json.loads(node.cli("queue", "log", "--json", _qid(node.log)))
            assert [e["event"] for e in log] == ["received", "delivered", "removed"]
            assert list(tmp_path.rglob("*.sqlite3")) == []  # nothing local
            node.kill(signal.SIGTERM)
            assert node.proc is not None and node.proc.returncode == 0
        finally:
            node.kill()


def _qid(log: Path) -> str:
    """The queue id of the one message a node's log line about queueing names."""
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"qid"' in line:
            return str(json.loads(line)["qid"])
    raise AssertionError(f"no queue id logged in {log.read_text()[-2000:]}")


async def test_two_nodes_deliver_once_and_take_over_a_killed_node(
    tmp_path: Path, pg_url: str, lab_dns: tuple[str, int]
) -> None:
    dns, mx_port = lab_dns
    mx = Sink("127.0.0.2", mx_port, hold_first=True)
    await mx.start()
    # A holds one attempt at a time: what it accepts while the sink holds that one is
    # queued unclaimed, for any node's loader
    a = Node(tmp_path, "node-a", pg_url, dns, mx_port, delivery={"active_window": 1})
    b = Node(tmp_path, "node-b", pg_url, dns, mx_port)
    try:
        await a.start()
        await b.start()
        assert await submit(a.port, "held") == 250  # claimed by A at intake; the sink holds it
        await until(lambda: mx.holding, 15, "A's attempt reached DATA")
        listed = json.loads(a.cli("queue", "list", "--json"))
        [(owner, state)] = [(r["lease_owner"], r["state"]) for r in listed[0]["recipients"]]
        assert state == "inflight" and owner.startswith("node-a:")
        assert f"owner={owner}" in a.cli("queue", "list")
        nodes = json.loads(b.cli("nodes", "--json"))
        assert {(n["node_id"], n["alive"]) for n in nodes} == {("node-a", True), ("node-b", True)}
        assert [n["inflight"] for n in nodes if n["owner"] == owner] == [1]

        # queued unclaimed on A: B delivers each at once, woken by NOTIFY (its loader's
        # poll is once a second: eight in a row under 0.6 s each would be luck otherwise)
        latencies = []
        for i in range(8):
            sent = time.monotonic()
            assert await submit(a.port, f"via-a-{i}") == 250
            mid = f"<via-a-{i}@sender.test>"
            await until(lambda m=mid: m in mx.arrived_at, 15, f"{mid} delivered")  # type: ignore[misc]
            latencies.append(mx.arrived_at[mid] - sent)
        print(f"B delivered A's unclaimed mail in {[round(x, 3) for x in latencies]} s")
        assert max(latencies) < 0.6, latencies
        for i in range(6):
            assert await submit(b.port, f"via-b-{i}") == 250

        a.kill()  # SIGKILL with "held" in flight under A's lease
        killed = time.monotonic()
        await until(lambda: "<held@sender.test>" in mx.arrived_at, LEASE + 15, "taken over")
        took = mx.arrived_at["<held@sender.test>"] - killed
        print(f"taken over {took:.2f} s after the kill (lease {LEASE} s)")
        assert took < LEASE + 5, took  # at most a lease, a sweep and a retry after the kill
        await until(lambda: b.cli("queue", "list", "--json") == "[]\n", 15, "drained")
        nodes = json.loads(b.cli("nodes", "--json"))  # A fell silent: not alive, holds nothing
        assert {(n["node_id"], n["alive"], n["inflight"]) for n in nodes} == {
            ("node-a", False, 0),
            ("node-b", True, 0),
        }
        got = mids(mx)
        assert sorted(got) == sorted(set(got))  # each delivered once
        assert len(got) == 1 + 8 + 6
    finally:
        a.kill()
        b.kill()
        await mx.stop()
