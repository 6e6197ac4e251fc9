"""Several `relay serve` nodes on one PostgreSQL (issue 14), end to end: real `relay serve`
subprocesses with their own node_id and listen port, the throwaway PostgreSQL cluster, the
lab DNS server and a receiving MTA on loopback.

- one node accepts (250 after the commit) and delivers;
- two nodes on one database: every message delivered once; a message queued unclaimed on
  node A (its active window is full) is delivered by node B at once (NOTIFY, not B's
  poll); node A killed with SIGKILL while it holds a recipient in flight (the sink holds
  its DATA): node B delivers it once A's lease has expired; `relay queue list` names the
  lease owner and `relay nodes` the nodes, alive until their heartbeat is a lease old;
- two nodes with MTA-STS (a lab policy host over real HTTPS) and TLS-RPT on: mail to one
  STS domain through both at once: the policy host sees one fetch of the policy file,
  every delivery is over verified TLS, `relay sts cache` on either node shows the policy.

The faults under load (a node killed, PostgreSQL restarted, LISTEN lost) are in
test_pg_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.e2e.pgharness import LEASE, Node, Sink, mids, sql, submit, until
from tests.e2e.test_crash import free_port
from tests.mtasts.sts_https_server import Answer, HttpsServer

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


async def test_a_node_keeps_its_pool_to_storage_pool_size(
    tmp_path: Path, pg_url: str, lab_dns: tuple[str, int]
) -> None:
    """[storage] pool_size bounds the connections each worker of a node opens (the
    leader's LISTEN connection among them), seen in pg_stat_activity under the node's
    application_name while 40 deliveries finish at once (the sink answers every DATA
    after 0.3 s): two workers with the default pool of 16 open more than 2 x 4 (checked);
    with pool_size = 4 never more, and every message is delivered."""
    dns, mx_port = lab_dns
    seen: dict[str, int] = {}
    for name, size in (("pool-default", None), ("pool-four", 4)):
        over: dict[str, Any] = {"delivery": {"active_window": 100}, "server": {"workers": 2}}
        if size is not None:
            over["storage"] = {"pool_size": size}
        node = Node(tmp_path, name, pg_url, dns, mx_port, **over)
        mx = Sink("127.0.0.2", mx_port, delay=0.3)
        await mx.start()
        stop = asyncio.Event()
        try:
            await node.start()
            watcher = asyncio.create_task(_peak_connections(pg_url, f"relay:{name}", stop))
            codes = await asyncio.gather(*(submit(node.port, f"{name}-{i}") for i in range(40)))
            assert codes == [250] * 40
            await mx.wait_for(40, timeout=30)
            stop.set()
            seen[name] = await watcher
            assert sorted(mids(mx)) == sorted(f"<{name}-{i}@sender.test>" for i in range(40))
        finally:
            node.kill()
            await mx.stop()
    assert seen["pool-default"] > 8, seen  # the load needs more than 2 x 4 connections
    assert 2 <= seen["pool-four"] <= 8, seen


async def _peak_connections(url: str, app: str, stop: asyncio.Event) -> int:
    """The most connections named ``app`` seen in pg_stat_activity until ``stop``."""
    peak = 0
    while not stop.is_set():
        rows = await sql(
            url, "SELECT count(*) FROM pg_stat_activity WHERE application_name=$1", app
        )
        peak = max(peak, int(rows[0][0]))
        await asyncio.sleep(0.02)
    return peak


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


async def test_two_sts_nodes_fetch_the_policy_once_and_deliver_over_tls(
    tmp_path: Path, pg_url: str
) -> None:
    """Issue 14: two nodes, one MTA-STS domain: one policy fetch between them (the fetch
    lease in the shared cache), enforce applied by both (verified TLS to the MX)."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    mx_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.dest.test").configure_cert(mx_ctx)
    mx_port = free_port("127.0.0.2")
    policy = b"version: STSv1\nmode: enforce\nmx: mx.dest.test\nmax_age: 86400\n"
    https = await HttpsServer(ca, "127.0.0.3").start()
    # slow enough that both nodes' first lookups overlap
    https.route("mta-sts.dest.test", "/.well-known/mta-sts.txt", Answer(200, policy, delay=0.5))
    zone = Zone()
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    zone.add("_mta-sts.dest.test", "TXT", "v=STSv1; id=20261202;")
    zone.add("mta-sts.dest.test", "A", "127.0.0.3")
    over: dict[str, Any] = {
        "mta_sts": {"enabled": True, "https_port": https.port, "fetch_timeout": 5},
        "tlsrpt": {"enabled": True},
        "http": {"allow_private_addresses": True},
        "delivery": {"ca_file": str(ca_file)},
    }
    mx = LabMta("127.0.0.2", mx_port, tls_context=mx_ctx, hostname="mx.dest.test")
    with LabDnsServer(zone) as dns:
        a = Node(tmp_path, "sts-a", pg_url, dns.address, mx_port, **over)
        b = Node(tmp_path, "sts-b", pg_url, dns.address, mx_port, **over)
        try:
            await mx.start()
            await asyncio.gather(a.start(), b.start())
            codes = await asyncio.gather(
                *(submit(n.port, f"{n.name}-{i}") for i in range(5) for n in (a, b))
            )
            assert codes == [250] * 10
            await mx.wait_for(10, timeout=30)
            fetches = [s for s in https.seen if s.host == "mta-sts.dest.test"]
            assert len(fetches) == 1, fetches
            assert all(m.tls_version and m.tls_version.startswith("TLSv1.") for m in mx.messages)
            assert sorted(mids(mx)) == sorted(
                f"<{n}-{i}@sender.test>" for i in range(5) for n in ("sts-a", "sts-b")
            )
            for n in (a, b):  # both read the one cached policy
                [row] = json.loads(n.cli("sts", "cache", "--json"))
                assert (row["domain"], row["mode"], row["id"]) == ("dest.test", "enforce",
                                                                   "20261202")  # fmt: skip
        finally:
            a.kill()
            b.kill()
            await mx.stop()
            await https.stop()
