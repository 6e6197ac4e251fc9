"""Faults of several `relay serve` nodes on one PostgreSQL (issue 14), end to end: real
nodes (subprocesses on loopback), the throwaway cluster, the lab DNS and a sink MX.

- load from 20 clients spread over two (three) nodes, one node killed with SIGKILL at a
  seeded random moment: every 250 delivered; duplicates only of recipients the dead
  node held in flight at the kill (read from the database right after it); those
  delivered by a survivor once their lease expired; nothing leased, nothing queued after;
- PostgreSQL restarted during a stream to two nodes: 451 while it is down, every 250
  delivered (accepted before and after the restart), delivery resumes on both nodes;
- a LISTEN connection terminated on the server: re-established, and a NOTIFY after that
  still wakes the node at once (its poll is 10 s);
- ARC replay limits counted once across nodes: one sealed message replayed to two nodes
  earns the DMARC override for override_max_recipients recipients in all;
- one node with `[server] workers = 2` on PostgreSQL delivers.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import time
from pathlib import Path

import aiosmtplib
import pytest

from relay.auth.arc import ArcSealer
from relay.auth.types import ArcCv, ArcResult
from tests.e2e.pgharness import LEASE, Node, Sink, mids, sql, submit, until
from tests.e2e.test_auth_e2e import AuthLab
from tests.labutil import send
from tests.pg.pgcluster import PASSWORD, PgCluster, remove_cluster, start_cluster

pytestmark = pytest.mark.slow

CLIENTS = 20
MESSAGES = 300


async def _queued(url: str) -> tuple[int, int]:
    """(recipient rows, of them in flight) left in the queue."""
    [row] = await sql(
        url,
        "SELECT count(*) AS n, count(*) FILTER (WHERE state = 'inflight') AS inflight"
        " FROM queue_recipients",
    )
    return int(row["n"]), int(row["inflight"])


async def _drained(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := await _queued(url)) != (0, 0):
        assert time.monotonic() < deadline, f"queue not drained: {left} recipient rows left"
        await asyncio.sleep(0.2)
    assert await sql(url, "SELECT id FROM queue_messages") == []


def _bracket(mid: str) -> str:
    return mid if mid.startswith("<") else f"<{mid}>"


@pytest.mark.parametrize("n_nodes", [2, 3])
async def test_load_with_a_node_killed_loses_nothing_and_bounds_duplicates(
    tmp_path: Path, pg_url: str, lab_dns: tuple[str, int], n_nodes: int
) -> None:
    dns, mx_port = lab_dns
    seed = int(os.environ.get("RELAY_FAULT_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    victim_i = rng.randrange(n_nodes)
    kill_after = rng.randint(MESSAGES // 5, MESSAGES * 3 // 5)  # accepted before the kill
    print(f"seed {seed}: node {victim_i} of {n_nodes} killed after {kill_after} accepted")
    mx = await Sink("127.0.0.2", mx_port, delay=0.03).start()  # deliveries stay in flight
    nodes = [Node(tmp_path, f"node-{i}", pg_url, dns, mx_port) for i in range(n_nodes)]
    victim = nodes[victim_i]
    codes: dict[str, int | None] = {}  # None: the session broke (its node died)
    leased: dict[str, float] = {}  # Message-ID -> lease expiry, the victim's rows at the kill
    killed: list[float] = []
    try:
        await asyncio.gather(*(n.start() for n in nodes))

        async def client(c: int) -> None:
            at = c % n_nodes
            for k in range(MESSAGES // CLIENTS):
                mid = f"c{c}-{k}"
                try:
                    codes[mid] = await submit(nodes[at].port, mid)
                except (aiosmtplib.SMTPException, OSError):
                    codes[mid] = None  # may or may not be queued: not retried
                    at = (at + 1) % n_nodes  # the next node, as an MTA tries the next MX
                    if nodes[at] is victim:
                        at = (at + 1) % n_nodes

        async def killer() -> None:
            await until(
                lambda: sum(c == 250 for c in codes.values()) >= kill_after, 60, "kill point"
            )
            victim.kill()  # SIGKILL: no lease given back, no outcome written
            killed.append(time.time())
            rows = await sql(
                pg_url,
                "SELECT m.message_id, r.lease_expiry FROM queue_recipients r"
                " JOIN queue_messages m ON m.id = r.qid"
                " WHERE r.state = 'inflight' AND r.lease_owner LIKE $1",
                f"{victim.name}:%",
            )
            leased.update({_bracket(r["message_id"]): r["lease_expiry"] for r in rows})

        started = time.monotonic()
        await asyncio.gather(killer(), *(client(c) for c in range(CLIENTS)))
        sent_for = time.monotonic() - started
        await _drained(pg_url, 30)
        await asyncio.sleep(0.5)  # nothing more may arrive
        drained_for = time.monotonic() - started

        accepted = {f"<{m}@sender.test>" for m, c in codes.items() if c == 250}
        broken = {f"<{m}@sender.test>" for m, c in codes.items() if c is None}
        assert {c for c in codes.values() if c is not None} == {250}, collections.Counter(
            codes.values()
        )
        got = collections.Counter(mids(mx))
        dups = {m: n - 1 for m, n in got.items() if n > 1}
        print(
            f"{len(accepted)} accepted, {len(broken)} sessions cut by the kill"
            f" ({len(set(got) & broken)} of them delivered), {len(leased)} recipients"
            f" leased by the dead node at the kill, {sum(dups.values())} duplicate(s);"
            f" sent in {sent_for:.1f} s, drained in {drained_for:.1f} s"
        )
        assert accepted - set(got) == set(), "a message that got 250 was lost"
        assert set(got) <= accepted | broken  # nothing delivered that was never sent
        assert set(dups) <= set(leased), dups  # only what the dead node held in flight
        assert all(n == 1 for n in dups.values()), dups
        assert sum(dups.values()) <= len(leased)
        assert leased, "the kill met no delivery in flight (the sink is slow: unexpected)"

        # the dead node's recipients: delivered by a survivor once the lease expired
        last = {m: t for m, t in mx.arrivals}  # the latest arrival of each
        assert set(leased) <= set(last)
        late = [last[m] - leased[m] for m in leased]
        assert min(late) >= 0, "delivered again before the dead node's lease expired"
        took = max(last[m] for m in leased) - killed[0]
        print(f"the dead node's recipients re-delivered by {took:.2f} s after the kill")
        assert took < LEASE + 5

        survivor = nodes[(victim_i + 1) % n_nodes]
        listed = json.loads(survivor.cli("nodes", "--json"))
        state = {n["node_id"]: (n["alive"], n["inflight"]) for n in listed}
        assert state == {n.name: (n is not victim, 0) for n in nodes}, state
        assert await _queued(pg_url) == (0, 0)
    finally:
        for n in nodes:
            n.kill()
        await mx.stop()


async def test_postgresql_restarted_under_two_nodes_gives_451_and_delivery_resumes(
    tmp_path: Path, lab_dns: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    dns, mx_port = lab_dns
    cluster: PgCluster = await asyncio.to_thread(start_cluster)  # this test's own
    monkeypatch.setenv("RELAY_DB_PASSWORD", PASSWORD)
    nodes: list[Node] = []
    mx = await Sink("127.0.0.2", mx_port, delay=0.05).start()  # a backlog at the restart
    try:
        url = cluster.url(await asyncio.to_thread(cluster.create_database))
        nodes = [Node(tmp_path, f"node-{x}", url, dns, mx_port) for x in "ab"]
        await asyncio.gather(*(n.start() for n in nodes))
        codes: dict[str, int] = {}
        phase: dict[str, str] = {}
        now = ["before"]
        stop = asyncio.Event()

        async def stream(n: Node, tag: str) -> None:
            i = 0
            while not stop.is_set():
                mid = f"{tag}-{i}"
                phase[mid] = now[0]
                try:
                    codes[mid] = await submit(n.port, mid)
                except (aiosmtplib.SMTPException, OSError) as exc:
                    raise AssertionError(f"{mid}: the relay broke the session: {exc}") from exc
                i += 1

        tasks = [asyncio.create_task(stream(n, f"{n.name}-{j}")) for n in nodes for j in (0, 1)]
        try:
            await until(lambda: len(codes) >= 30, 30, "first messages")
            now[0] = "down"
            restart_at = time.monotonic()
            await asyncio.to_thread(cluster.restart)
            now[0] = "after"
            restarted = time.monotonic() - restart_at

            def back() -> bool:  # both nodes accept again on the restarted server
                after = [m for m in codes if phase[m] == "after" and codes[m] == 250]
                return all(any(m.startswith(n.name) for m in after) for n in nodes)

            await until(lambda: back() and len(codes) > 80, 60, "back")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        refused = [m for m, c in codes.items() if c != 250]
        accepted = [m for m, c in codes.items() if c == 250]
        by_phase = collections.Counter((phase[m], codes[m]) for m in codes)
        print(
            f"restart took {restarted:.2f} s; {len(accepted)} accepted, {len(refused)} refused;"
            f" {dict(by_phase)}"
        )
        assert refused, "no submission met the restart"
        assert {codes[m] for m in refused} == {451}, codes
        assert by_phase[("before", 250)] and by_phase[("after", 250)]
        want = {f"<{m}@sender.test>" for m in accepted}
        resumed = time.monotonic()
        await until(lambda: want <= set(mids(mx)), 60, "every 250 delivered")
        print(f"every 250 delivered {time.monotonic() - resumed:.2f} s after the stream ended")
        # delivery resumed on both nodes: new mail through each is delivered at once
        for n in nodes:
            assert await submit(n.port, f"{n.name}-late") == 250
        await until(
            lambda: {f"<{n.name}-late@sender.test>" for n in nodes} <= set(mids(mx)),
            15,
            "mail after the restart",
        )
        await _drained(url, 30)
        for n in nodes:
            n.kill(signal.SIGTERM)
            assert n.proc is not None and n.proc.returncode == 0
    finally:
        for n in nodes:
            n.kill()
        await mx.stop()
        await asyncio.to_thread(remove_cluster, cluster)


async def test_a_lost_listen_connection_is_re_established_and_still_wakes_the_node(
    tmp_path: Path, pg_url: str, lab_dns: tuple[str, int]
) -> None:
    dns, mx_port = lab_dns
    mx = await Sink("127.0.0.2", mx_port, hold_first=True).start()
    slow = {"poll_interval": 10.0}  # only a NOTIFY wakes a loader within the test's bound
    # A holds one attempt at a time (the sink holds it): the rest it accepts is queued
    # unclaimed, for B's loader, woken by A's NOTIFY at commit
    a = Node(tmp_path, "node-a", pg_url, dns, mx_port, delivery={"active_window": 1}, storage=slow)
    b = Node(tmp_path, "node-b", pg_url, dns, mx_port, storage=slow, logging={"level": "info"})
    try:
        await a.start()
        await b.start()
        assert await submit(a.port, "held") == 250
        await until(lambda: mx.holding, 15, "A's attempt reached DATA")

        async def handed_over(tag: str) -> list[float]:
            latencies = []
            for i in range(4):
                sent = time.monotonic()
                assert await submit(a.port, f"{tag}-{i}") == 250
                mid = f"<{tag}-{i}@sender.test>"
                await until(lambda m=mid: m in mx.arrived_at, 9, f"{mid} delivered")  # type: ignore[misc]
                latencies.append(mx.arrived_at[mid] - sent)
            return latencies

        before = await handed_over("before")
        rows = await sql(
            pg_url,
            "SELECT pid, pg_terminate_backend(pid) AS done FROM pg_stat_activity"
            " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
        )
        assert len(rows) == 2 and all(r["done"] for r in rows)  # A's and B's LISTEN
        await until(lambda: "listen_restored" in b.log.read_text(), 10, "B listens again")
        listening = await sql(
            pg_url,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
            " AND pid <> ALL($1::int[])",
            [r["pid"] for r in rows],
        )
        assert listening[0]["n"] == 2
        after = await handed_over("after")
        print(
            f"B woken by NOTIFY in {[round(x, 3) for x in before]} s before the LISTEN"
            f" connections were terminated, {[round(x, 3) for x in after]} s after (poll 10 s)"
        )
        assert max(after) < 2.0, after  # a NOTIFY, not the 10 s poll
        assert "listen_lost" in b.log.read_text()
    finally:
        a.kill()
        b.kill()
        await mx.stop()


async def test_arc_replay_limits_are_counted_once_across_nodes(tmp_path: Path, pg_url: str) -> None:
    lab = AuthLab(tmp_path)
    try:
        mx = await lab.mta("127.0.0.2")
        list_key = lab.publish("arc", "list.lab.test")
        lab.zone.add("list.lab.test", "TXT", "v=spf1 ip4:127.0.0.7 -all")
        users = {f"u{i}@lists.lab.test": [f"u{i}@dest.test"] for i in range(10)}
        nodes = []
        for name in ("node-a", "node-b"):
            work = tmp_path / name
            work.mkdir()
            key = work / "arc.pem"
            key.write_bytes(lab.publish("arc", f"{name}.lab.test"))
            node = Node(
                work,
                name,
                pg_url,
                lab.dns.address,
                lab.port,
                auth={"enabled": True, "crypto_workers": 0},
                arc={
                    "enabled": True,
                    "domain": f"{name}.lab.test",
                    "selector": "arc",
                    "private_key": str(key),
                    "trusted_sealers": ["list.lab.test"],
                    "override_max_recipients": 5,
                },
                aliases=users,
            )
            nodes.append(node)
        a, b = nodes
        await asyncio.gather(a.start(), b.start())
        # the list broke the author's DKIM signature (footer) and sealed what it saw
        post = lab.signed(frm="ceo@sender.test", to="all@list.lab.test") + b"-- \r\nfooter\r\n"
        ar = "list.lab.test; dkim=pass header.d=sender.test; dmarc=pass header.from=sender.test"
        sealed = ArcSealer("list.lab.test", "arc", list_key, "list.lab.test").seal(
            post, ar, ArcResult(ArcCv.NONE)
        )
        rcpts = list(users)

        async def replay(node: Node, batch: list[str]) -> int:
            try:
                await send(
                    "127.0.0.1", node.port, "bounces@list.lab.test", batch, sealed, "127.0.0.7"
                )
            except aiosmtplib.SMTPDataError as exc:
                assert exc.code == 550 and "ARC override refused" in exc.message, exc.message
                return 0
            return len(batch)

        # limit 5 recipients per seal, shared: 3 at A, then 3 at B would make 6
        assert await replay(a, rcpts[0:3]) == 3
        assert await replay(b, rcpts[3:6]) == 0  # over the limit: counted across nodes
        assert await replay(b, rcpts[6:8]) == 2  # exactly up to it
        assert await replay(a, rcpts[8:9]) == 0
        [row] = await sql(pg_url, "SELECT recipients FROM arc_replay_seal")
        assert row["recipients"] == 5  # the refused replays are not counted
        got = await mx.wait_for(2, timeout=20)
        assert sorted(len(m.rcpt_tos) for m in got) == [2, 3]
        for m in got:
            assert b"policy.override=trusted_forwarder" in b"".join(m.data.split())
    finally:
        for n in locals().get("nodes", []):
            n.kill()
        await lab.close()


async def test_a_node_with_two_workers_on_postgresql_delivers(
    tmp_path: Path, pg_url: str, lab_dns: tuple[str, int]
) -> None:
    dns, mx_port = lab_dns
    mx = await Sink("127.0.0.2", mx_port).start()
    node = Node(tmp_path, "node-w", pg_url, dns, mx_port, server={"workers": 2})
    try:
        await node.start()
        codes = await asyncio.gather(*(submit(node.port, f"w-{i}") for i in range(12)))
        assert codes == [250] * 12
        await until(lambda: len(mx.messages) >= 12, 20, "delivered")
        await _drained(pg_url, 15)
        assert sorted(mids(mx)) == sorted(f"<w-{i}@sender.test>" for i in range(12))
        # each worker its own pool and scheduler: each sweeps and heartbeats as its own
        # lease owner (node_id:pid:random), both on this database
        owners = [r["owner"] for r in await sql(pg_url, "SELECT owner FROM relay_nodes")]
        print(f"lease owners {sorted(owners)}")
        assert len({o.split(":")[1] for o in owners if o.startswith("node-w:")}) == 2, owners
        node.kill(signal.SIGTERM)
        assert node.proc is not None and node.proc.returncode == 0
    finally:
        node.kill()
        await mx.stop()
