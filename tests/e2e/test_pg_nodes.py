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
  every delivery is over verified TLS, `relay sts cache` on either node shows the policy;
- PostgreSQL restarted (immediate mode: every connection cut) during a stream of
  submissions: the messages whose commit failed get 451, never 250, and every 250 is
  delivered (a cluster of the test's own).
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta, _Handler
from tests.e2e.test_crash import free_port, start_relay, wait_listening
from tests.labutil import base_doc, message, write_config
from tests.mtasts.sts_https_server import Answer, HttpsServer
from tests.pg.pgcluster import PASSWORD, PgCluster, remove_cluster, start_cluster

pytestmark = pytest.mark.slow
LEASE = 2.0


class HoldFirstMta(LabMta):
    """Holds the DATA of the first message (never answers it); accepts every other one.
    Remembers when each message arrived."""

    holding = False
    arrived_at: dict[str, float]

    def _factory(self) -> SMTP:
        proto = super()._factory()
        mta = self

        class Hold(_Handler):
            async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
                if not mta.holding:
                    mta.holding = True
                    await asyncio.sleep(3600)  # the sender dies before an answer
                mta.arrived_at[_mid(bytes(envelope.content or b""))] = time.monotonic()
                return await super().handle_DATA(server, session, envelope)

        hold = Hold(self)
        proto.event_handler = hold
        proto._handle_hooks["DATA"] = hold.handle_DATA  # aiosmtpd binds hooks at init
        return proto


def _mid(data: bytes) -> str:
    return data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()


def mids(mx: LabMta) -> list[str]:
    return [_mid(m.data) for m in mx.messages]


class Node:
    """One `relay serve` process with a config of its own on the shared database."""

    def __init__(self, tmp: Path, name: str, url: str, dns: str, mx_port: int, **over: Any):
        self.name = name
        self.port = free_port()
        doc = base_doc(tmp, dns, mx_port)
        doc["server"].update({"listen": [f"127.0.0.1:{self.port}"], "node_id": name})
        doc["storage"] = {"url": url, "lease": LEASE}
        doc["delivery"].update({"retry_first": 1, "retry_max": 2, "retry_jitter": 0.0})
        for k, v in over.items():
            doc.setdefault(k, {}).update(v)
        self.config = tmp / f"{name}.toml"
        write_config(self.config, doc)
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> Node:
        self.proc = start_relay(self.config, self.log)
        await wait_listening(self.port)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def cli(self, *argv: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "relay", *argv, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout


async def submit(port: int, mid: str) -> int:
    """Send one message; the code of the reply to DATA (or to the first refusal)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    try:
        async with client:
            await client.sendmail(
                "alice@sender.test", ["bob@dest.test"], message(msgid=f"<{mid}@sender.test>")
            )
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    return 250


async def until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def lab_dns() -> Iterator[tuple[str, int]]:
    zone = Zone()
    mx_port = free_port("127.0.0.2")
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    with LabDnsServer(zone) as dns:
        yield dns.address, mx_port


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
    mx = HoldFirstMta("127.0.0.2", mx_port, hostname="mx.dest.test")
    mx.arrived_at = {}
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


async def test_postgresql_restarted_during_a_run_gives_451_never_250(
    tmp_path: Path, lab_dns: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    dns, mx_port = lab_dns
    cluster: PgCluster = await asyncio.to_thread(start_cluster)  # this test's own
    monkeypatch.setenv("RELAY_DB_PASSWORD", PASSWORD)
    try:
        url = cluster.url(await asyncio.to_thread(cluster.create_database))
        node = Node(tmp_path, "node-r", url, dns, mx_port)
        async with LabMta("127.0.0.2", mx_port, hostname="mx.dest.test") as mx:
            await node.start()
            codes: dict[str, int] = {}
            stop = asyncio.Event()

            async def stream() -> None:
                i = 0
                while not stop.is_set():
                    mid = f"s-{i}"
                    try:
                        codes[mid] = await submit(node.port, mid)
                    except (aiosmtplib.SMTPException, OSError) as exc:
                        raise AssertionError(f"{mid}: the relay broke the session: {exc}") from exc
                    i += 1

            task = asyncio.create_task(stream())
            try:
                await until(lambda: len(codes) >= 10, 30, "first messages")
                await asyncio.to_thread(cluster.restart)
                # until the relay accepts again on the restarted server
                n = len(codes)
                await until(
                    lambda: len(codes) > n + 10 and 250 in list(codes.values())[-5:], 60, "back"
                )
            finally:
                stop.set()
                await task
            refused = [m for m, c in codes.items() if c != 250]
            accepted = [m for m, c in codes.items() if c == 250]
            print(f"{len(accepted)} accepted, {len(refused)} refused during the restart")
            assert refused, "no submission met the restart"
            assert {codes[m] for m in refused} <= {451}, codes
            want = {f"<{m}@sender.test>" for m in accepted}
            await until(lambda: want <= set(mids(mx)), 60, "every 250 delivered")
            node.kill(signal.SIGTERM)
    finally:
        if "node" in locals():
            node.kill()
        await asyncio.to_thread(remove_cluster, cluster)
