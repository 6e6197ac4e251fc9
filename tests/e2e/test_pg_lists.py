"""A mailing list served by two `relay serve` nodes on one PostgreSQL (issue 14), end to
end: the list lab (DNS with SPF/DKIM/DMARC, the members' MTAs on loopback), members added
with `relay list add` on storage.url, a post accepted by node A delivered once to every
member; a member unsubscribed with the one-click POST (RFC 8058) to node A's HTTP listener
is not sent the next post, accepted by node B (a post to the list and to another
recipient: the post and the message in one transaction); `relay list members` on node
B's config shows the change."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from relay.config import dump_toml
from relay.lab.mta import LabMta, Received
from tests.e2e.test_crash import start_relay, wait_listening
from tests.labutil import free_port, send
from tests.lists.listlab import AUTHOR_IP, LIST, MEMBER_IPS, ListLab, post
from tests.pg.pgcluster import PASSWORD

pytestmark = pytest.mark.slow
MEMBERS = ["b@one.test", "c@two.test", "d@three.test"]


def cli(cfg: Path, *argv: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "relay", *argv, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
async def mtas(tmp_path: Path) -> AsyncIterator[dict[str, LabMta]]:
    out: dict[str, LabMta] = {}
    port = 0
    for dom, ip in MEMBER_IPS.items():
        out[dom] = await LabMta(ip, port, hostname=f"mx.{dom}").start()
        port = out[dom].port
    yield out
    for m in out.values():
        await m.stop()


def received(mtas: dict[str, LabMta]) -> list[Received]:
    return [r for m in mtas.values() for r in m.messages]


async def arrivals(mtas: dict[str, LabMta], n: int, timeout: float = 30) -> list[Received]:
    deadline = time.monotonic() + timeout
    while len(received(mtas)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(received(mtas))} of {n} messages arrived")
        await asyncio.sleep(0.05)
    return received(mtas)


async def _wait_http(port: int, timeout: float = 20) -> None:
    """Until the node's HTTP listener (started by the leader once its store is open)
    answers /health."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status in (200, 503):
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no HTTP listener on port {port}")
            await asyncio.sleep(0.05)


def node_configs(
    lab: ListLab, tmp_path: Path, pg_url: str, mx_port: int, **over: dict[str, Any]
) -> dict[str, tuple[Path, int, int]]:
    """Configs of nodes "a" and "b" on the one database: name -> (config, SMTP port, HTTP
    port); ``over``: sections updated on both."""
    nodes = {}
    for name in ("a", "b"):
        smtp, http = free_port(), free_port()
        doc: dict[str, Any] = lab.doc(mx_port, smtp_port=smtp, http_port=http)
        doc["server"]["node_id"] = name
        doc["storage"] = {"url": pg_url, "lease": 2.0}
        doc["relay"]["trusted_networks"] = ["127.0.0.1/32", f"{AUTHOR_IP}/32"]
        for section, values in over.items():
            doc.setdefault(section, {}).update(values)
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(dump_toml(doc))
        nodes[name] = (cfg, smtp, http)
    return nodes


def subject(r: Received) -> str:
    return r.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


async def test_a_list_on_two_nodes_delivers_and_honours_an_unsubscribe_on_the_other(
    tmp_path: Path, pg_url: str, mtas: dict[str, LabMta]
) -> None:
    lab = ListLab(tmp_path)
    mx_port = next(iter(mtas.values())).port
    procs = []
    try:
        nodes = node_configs(lab, tmp_path, pg_url, mx_port)
        cfg_a, smtp_a, _ = nodes["a"]
        cfg_b, smtp_b, _ = nodes["b"]
        out = cli(cfg_a, "list", "add", LIST, *MEMBERS)  # on storage.url: migrates first
        assert out.count("\tadded") == 3
        for name in ("a", "b"):
            procs.append(start_relay(nodes[name][0], tmp_path / f"{name}.log"))
        for name in ("a", "b"):
            await wait_listening(nodes[name][1])
            await _wait_http(nodes[name][2])  # the leader's listener, up after the SMTP one

        raw = post("alice@author.test", LIST, "first")
        await send("127.0.0.1", smtp_a, "alice@author.test", [LIST], raw, source=AUTHOR_IP)
        first = await arrivals(mtas, 3)
        assert sorted(r.rcpt_tos[0] for r in first) == MEMBERS
        assert all(subject(r) == "[dev] first" for r in first)
        unsub = {
            r.rcpt_tos[0]: r.data.split(b"List-Unsubscribe: <", 1)[1].split(b">", 1)[0].decode()
            for r in first
        }
        # the copy names the base_url of the node that made it (either node may run a
        # fan-out); the one-click POST goes to node A's listener whichever it was
        ports = {nodes[n][2] for n in ("a", "b")}
        base, path = unsub["b@one.test"].split("/lists/", 1)
        assert base in {f"http://127.0.0.1:{p}" for p in ports}
        url_a = f"http://127.0.0.1:{nodes['a'][2]}/lists/{path}"
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url_a, data={"List-Unsubscribe": "One-Click"}, allow_redirects=False
            ) as resp:
                assert resp.status == 200
        listed = json.loads(cli(cfg_b, "list", "members", LIST, "--json"))
        assert [m["address"] for m in listed] == ["c@two.test", "d@three.test"]

        # node B: the next post, to the list and to one other recipient (one transaction)
        raw = post("alice@author.test", LIST, "second")
        await send(
            "127.0.0.1",
            smtp_b,
            "alice@author.test",
            [LIST, "zed@two.test"],
            raw,
            source=AUTHOR_IP,
        )
        got = await arrivals(mtas, 3 + 3)
        await asyncio.sleep(1.0)  # nothing more may come
        second = [r for r in received(mtas) if r not in first]
        assert sorted((r.rcpt_tos[0], subject(r)) for r in second) == [
            ("c@two.test", "[dev] second"),
            ("d@three.test", "[dev] second"),
            ("zed@two.test", "second"),  # the plain message, not a list copy
        ]
        assert len(got) == len(received(mtas)) == 6
        b_copy = next(r for r in second if r.rcpt_tos[0] == "c@two.test")
        assert f"http://127.0.0.1:{nodes['b'][2]}/".encode() in b_copy.data  # made by B
        queue = json.loads(cli(cfg_a, "queue", "list", "--json"))
        assert queue == []  # every copy delivered and removed, whichever node sent it
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(20)
        lab.close()


async def test_a_node_killed_in_the_middle_of_a_fan_out_leaves_the_rest_to_the_other(
    tmp_path: Path, pg_url: str, mtas: dict[str, LabMta]
) -> None:
    """Node A accepts a post to a 900-member list and is killed (-9, every process)
    after its first batches of copies are committed; node B, which left A's fan-out
    alone while A renewed its lease, takes the post over once the lease has expired and
    makes the rest: every member gets the post, duplicates only for copies A was
    sending at the kill."""
    lab = ListLab(tmp_path)
    mx_port = next(iter(mtas.values())).port
    domains = list(MEMBER_IPS)
    members = [f"m{i:04d}@{domains[i % len(domains)]}" for i in range(900)]
    window = 20
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        nodes = node_configs(
            lab, tmp_path, pg_url, mx_port,
            delivery={"active_window": window}, logging={"level": "info"},
        )  # fmt: skip
        cli(nodes["a"][0], "list", "add", LIST, *members)
        for name in ("a", "b"):
            procs[name] = start_relay(nodes[name][0], tmp_path / f"{name}.log")
        for name in ("a", "b"):
            await wait_listening(nodes[name][1])

        raw = post("alice@author.test", LIST, "big")
        await send("127.0.0.1", nodes["a"][1], "alice@author.test", [LIST], raw, source=AUTHOR_IP)
        conn = await asyncpg.connect(pg_url, password=PASSWORD)
        try:
            deadline = time.monotonic() + 30
            while True:  # the first batch committed: A is in the middle of the fan-out
                done = await conn.fetchval("SELECT count(*) FROM list_fanout WHERE done=1")
                if done:
                    break
                assert time.monotonic() < deadline, "A never committed a batch"
                await asyncio.sleep(0.005)
            procs["a"].kill()  # the parent; its workers die with it (PR_SET_PDEATHSIG)
            procs["a"].wait(20)
            left = await conn.fetchval("SELECT count(*) FROM list_fanout WHERE done=0")
            assert left, "A finished the whole fan-out before the kill"
            [running] = json.loads(cli(nodes["b"][0], "list", "show", LIST, "--json"))["fanouts"]
            # A's lease until it expires, then B's (the command takes a second to start)
            assert running["left"] > 0 and running["lease_owner"].split(":")[0] in ("a", "b")
        finally:
            await conn.close()

        got = await arrivals(mtas, len(members), timeout=120)
        await asyncio.sleep(1.0)  # late duplicates would show now
        got = received(mtas)
        per_member = collections.Counter(r.rcpt_tos[0] for r in got)
        assert set(per_member) == set(members)  # nobody missed the post
        doubled = sum(n - 1 for n in per_member.values())
        assert doubled <= 2 * window, f"{doubled} duplicates (A had at most {2 * window} in flight)"
        b_log = (tmp_path / "b.log").read_text()
        assert '"list_fanout_done"' in b_log  # B finished A's post
        assert '"list_fanout_taken_over"' not in b_log
        queue = json.loads(cli(nodes["b"][0], "queue", "list", "--json"))
        assert queue == []
        shown = json.loads(cli(nodes["b"][0], "list", "show", LIST, "--json"))
        assert shown["fanouts"] == []  # the post finished, whoever made its copies
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(20)
        lab.close()
