"""Mailing-list fan-out benchmark: one post to a 5,000-member list, every copy delivered
to Postfix's smtp-sink, beside Postfix expanding the same 5,000 recipients as one virtual
alias, in the same run.

Our relay (``relay serve`` subprocess: durable store, lab DNS, [auth] and [arc] on)
makes one copy per member: its own List-Unsubscribe, a DKIM signature by the list domain
over it, the ARC set its batch of 50 shares, a VERP envelope sender, its own SMTP
transaction. Postfix gets the post to an alias of the same 5,000 addresses and sends it
as it does (up to 50 recipients per transaction, no signing). Measured from the 250 of
the post to the last delivery: deliveries (recipients) per second, and CPU milliseconds
per copy (the relay process tree's utime + stime over the fan-out, divided by the
members).

    python -m bench.lists_bench [--members 5000] [--runs N] [--out results.json] [--profile]

With ``--runs N``, N pairs of runs (Postfix, then the relay, each on a fresh work
directory), every run's figures and the medians: on a shared machine whose speed drifts
from minute to minute, one pair says little. ``BENCH_LOG=info`` runs the relay at that log level and
``BENCH_KEEP=1`` keeps the work directory (its ``run-N/relay.log``), to see where a run
went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procstat import cpu_seconds, tree
from bench.rsaspeed import cryptography_sign_ms, openssl_parallel_signs_per_s
from bench.run import end_recordings, record_tree, summarize_profile
from bench.sink import Sink
from relay.commands.keygen import generate
from relay.config import dump_toml
from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.postfix import PostfixInstance, PostfixSpec, free_port, wait_port
from relay.lists.service import BATCH
from tests.labutil import send

LIST = "dev@lists.bench.test"
SINK_HOST = "127.0.0.40"
RELAY_HOST = "127.0.0.41"
# a copy's own DKIM-Signature, and its share of the batch's one ARC set (AMS + AS)
SIGNATURES_PER_COPY = 1 + 2 / BATCH
POSTFIX_HOST = "127.0.0.42"
PROFILE = Path(__file__).resolve().parent / "out" / "lists-profile.txt"  # py-spy raw stacks
POST = (
    b"From: Alice <alice@author.test>\r\nTo: dev@lists.bench.test\r\nSubject: plan\r\n"
    b"Message-ID: <bench@author.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n"
    + b"The plan, in some detail.\r\n"
    * 40
)


def relay_config(work: Path, dns: str, sink_port: int, port: int, zone: Zone) -> Path:
    keys = {}
    for name, sel, dom in (("list", "s1", "lists.bench.test"), ("arc", "arc", "relay.bench.test")):
        k = generate("rsa", 2048)
        zone.set(f"{sel}._domainkey.{dom}", "TXT", [k.record()])  # this run's key
        (work / f"{name}.pem").write_bytes(k.private_pem)
        keys[name] = str(work / f"{name}.pem")
    doc: dict[str, Any] = {
        "server": {"listen": [f"{RELAY_HOST}:{port}"], "hostname": "relay.bench.test"},
        "relay": {"trusted_networks": ["127.0.0.0/8"], "local_domains": []},
        "storage": {"path": str(work / "relay.sqlite3")},
        "dns": {"nameservers": [dns], "timeout": 5},
        "delivery": {"port": sink_port, "retry_first": 5, "concurrency_per_domain": 20},
        "mta_sts": {"enabled": False},
        "tlsrpt": {"enabled": False},
        "auth": {"enabled": True},
        "arc": {
            "enabled": True,
            "domain": "relay.bench.test",
            "selector": "arc",
            "private_key": keys["arc"],
        },
        "srs": {"enabled": False},
        "logging": {"level": os.environ.get("BENCH_LOG", "warning"), "format": "json"},
        "lists": {LIST: {"owners": ["owner@sink.test"], "name": "Dev", "posting": "anyone"}},
        "lists_http": {"base_url": "https://lists.bench.test"},
        "dkim": {
            "sign": [{"domain": "lists.bench.test", "selector": "s1", "private_key": keys["list"]}]
        },
    }
    cfg = work / "config.toml"
    cfg.write_text(dump_toml(doc))
    return cfg


def run_relay(
    work: Path,
    dns: LabDnsServer,
    zone: Zone,
    members: list[str],
    profile: bool = False,
    gil: bool = False,
) -> dict[str, Any]:
    sink_port = free_port(SINK_HOST)
    sink = Sink(SINK_HOST, sink_port).start()
    port = free_port(RELAY_HOST)
    cfg = relay_config(work, dns.address, sink_port, port, zone)
    subprocess.run(
        [sys.executable, "-m", "relay", "list", "add", LIST, *members, "--config", str(cfg)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
        stdout=(work / "relay.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(RELAY_HOST, port, timeout=30)
        time.sleep(1.0)
        settle(proc.pid)  # start-up done (workers, the signing pools keyed): an idle relay
        pids = tree(proc.pid)
        cpu0 = cpu_seconds(pids)
        parts0 = cpu_parts(pids)
        spy = start_spy(proc.pid, gil) if profile else None
        t0 = time.monotonic()
        asyncio.run(send(RELAY_HOST, port, "alice@author.test", [LIST], POST))
        accepted = time.monotonic() - t0
        ok = sink.wait_for(len(members), timeout=240)
        elapsed = (sink.last_change or time.monotonic()) - t0
        pids = tree(proc.pid)
        cpu = cpu_seconds(pids) - cpu0
        parts = {k: v - parts0.get(k, 0.0) for k, v in cpu_parts(pids).items()}
        per = 1000 / max(sink.count, 1)
        extra = {"profile": stop_spy(spy)} if spy is not None else {}
        return extra | {
            "delivered": sink.count,
            "complete": ok,
            "seconds": round(elapsed, 2),
            "post_250_seconds": round(accepted, 3),
            "deliveries_per_s": round(sink.count / elapsed, 1),
            "cpu_ms_per_copy": round(1000 * cpu / max(sink.count, 1), 2),
            # where it went: the signing pool's processes (copies made, signed, sealed)
            # and the relay workers (fan-out commits, scheduler, courier, store)
            "cpu_ms_per_copy_signing_pool": round(per * parts.get("pool", 0.0), 2),
            "cpu_ms_per_copy_workers": round(per * parts.get("workers", 0.0), 2),
            # each worker process's share of the workers' CPU (the leader fans out)
            "workers_cpu_split": sorted(
                (
                    round(v / max(parts.get("workers", 0.0), 1e-9), 2)
                    for k, v in parts.items()
                    if k.startswith("worker ")
                ),
                reverse=True,
            ),
        }
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        sink.stop()


def start_spy(pid: int, gil: bool = False) -> subprocess.Popen[bytes] | None:
    """py-spy on the relay's process tree (workers and signing pool) for the fan-out;
    with ``gil``, only the thread holding each process's GIL (CPU, not waits)."""
    proc = record_tree(pid, PROFILE, gil=gil)
    if proc is not None:
        time.sleep(1.0)
    return proc


def stop_spy(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    end_recordings([proc])
    return summarize_profile([PROFILE], 30) if PROFILE.exists() else {}


def cpu_parts(pids: list[int]) -> dict[str, float]:
    """CPU seconds of the signing pool (the forkserver and the pool processes it forks)
    and of the rest of the relay's process tree."""
    out = {"pool": 0.0, "workers": 0.0}
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        cpu = cpu_seconds([pid])
        out["pool" if b"forkserver" in cmd else "workers"] += cpu
        if b"forkserver" not in cmd and pid != pids[0]:
            out[f"worker {pid}"] = cpu
    return out


def signing_ceiling(postfix_rate: float) -> dict[str, Any]:
    """RSA-2048 sign time measured now, and the copies a second the machine's cores could
    sign at most (a copy's DKIM signature and 1/BATCH of the batch's ARC-Message-Signature
    and ARC-Seal), also as a ratio to Postfix's rate: what signing alone allows, before
    any other work. The ceiling is what every core signs at once (``openssl speed
    -multi``), not one core's rate times the cores: on a virtual machine whose cores
    share a host the two differ (by a fifth on the eleventh session's machine)."""
    ms = cryptography_sign_ms()
    cores = os.cpu_count() or 1
    together = openssl_parallel_signs_per_s(cores)
    per_s = together if together is not None else cores * 1000 / ms
    ceiling = per_s / SIGNATURES_PER_COPY
    return {
        "rsa2048_sign_ms": ms,
        "cores": cores,
        "rsa2048_signs_per_s_all_cores": round(per_s),
        "rsa2048_sign_ms_per_core_all_busy": round(cores * 1000 / per_s, 3),
        "signing_ceiling_copies_per_s": round(ceiling),
        "signing_ceiling_ratio": round(ceiling / postfix_rate, 2),
    }


def settle(pid: int, timeout: float = 30.0) -> None:
    """Until the process tree uses under 5% of a CPU over half a second."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(tree(pid))
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(tree(pid))
        if now - last < 0.025:
            return
        last = now


def run_postfix(work: Path, members: list[str]) -> dict[str, Any]:
    sink_port = free_port(SINK_HOST)
    sink = Sink(SINK_HOST, sink_port).start()
    table = work / "virtual"
    table.write_text(f"{LIST} {', '.join(members)}\n")
    table.chmod(0o644)
    port = free_port(POSTFIX_HOST)
    spec = PostfixSpec(
        listen=(POSTFIX_HOST, port),
        nexthop=(SINK_HOST, sink_port),
        hostname="postfix.bench.test",
        extra={
            "virtual_alias_domains": "lists.bench.test",
            "virtual_alias_maps": f"texthash:{table}",
            "virtual_alias_expansion_limit": str(len(members) + 10),
            "default_destination_concurrency_limit": "20",
        },
    )
    inst = PostfixInstance(spec, name="lists-bench")
    try:
        inst.start()
        t0 = time.monotonic()
        asyncio.run(send(POSTFIX_HOST, port, "alice@author.test", [LIST], POST))
        deadline = t0 + 240
        while time.monotonic() < deadline:
            if sink.count and inst.queue_count() == 0:
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        return {
            "delivered": len(members) if inst.queue_count() == 0 else -1,
            "transactions": sink.count,
            "seconds": round(elapsed, 2),
            "deliveries_per_s": round(len(members) / elapsed, 1),
        }
    finally:
        inst.cleanup()
        sink.stop()


def summary_line(run: dict[str, Any]) -> str:
    r, p = run["relay"], run["postfix"]
    return (
        f"relay {r['deliveries_per_s']}/s at {r['cpu_ms_per_copy']} ms a copy "
        f"(pool {r['cpu_ms_per_copy_signing_pool']}, workers {r['cpu_ms_per_copy_workers']}), "
        f"Postfix {p['deliveries_per_s']}/s, ratio {run['ratio']}, "
        f"RSA-2048 {run['ceiling']['rsa2048_sign_ms']} ms "
        f"({run['ceiling']['rsa2048_sign_ms_per_core_all_busy']} ms a core with all busy)"
    )


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each figure over the runs (the ratio: the median of each run's own)."""

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    rel = [r["relay"] for r in runs]
    return {
        "relay_deliveries_per_s": med([r["deliveries_per_s"] for r in rel]),
        "cpu_ms_per_copy": med([r["cpu_ms_per_copy"] for r in rel]),
        "cpu_ms_per_copy_signing_pool": med([r["cpu_ms_per_copy_signing_pool"] for r in rel]),
        "cpu_ms_per_copy_workers": med([r["cpu_ms_per_copy_workers"] for r in rel]),
        "postfix_deliveries_per_s": med([r["postfix"]["deliveries_per_s"] for r in runs]),
        "ratio": med([r["ratio"] for r in runs]),
        "rsa2048_sign_ms": med([r["ceiling"]["rsa2048_sign_ms"] for r in runs]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=1, help="pairs of runs (medians reported)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", action="store_true", help="py-spy the relay (skews figures)")
    ap.add_argument("--profile-gil", action="store_true", help="--profile, GIL holders only")
    args = ap.parse_args(argv)
    members = [f"m{i:05d}@sink.test" for i in range(args.members)]
    work = Path(tempfile.mkdtemp(prefix="lists-bench-"))
    work.chmod(0o755)
    zone = Zone()
    zone.add("sink.test", "MX", (10, "mx.sink.test"))
    zone.add("mx.sink.test", "A", SINK_HOST)
    zone.add("_dmarc.author.test", "TXT", "v=DMARC1; p=reject")  # munged copies
    zone.add("author.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
    dns = LabDnsServer(zone).start()
    runs: list[dict[str, Any]] = []
    profile = args.profile or args.profile_gil
    try:
        for i in range(args.runs):
            here = work / f"run-{i}"
            here.mkdir()
            here.chmod(0o755)
            postfix = run_postfix(here, members)
            relay = run_relay(here, dns, zone, members, profile, args.profile_gil)
            runs.append(
                {
                    "relay": relay,
                    "postfix": postfix,
                    "ratio": round(relay["deliveries_per_s"] / postfix["deliveries_per_s"], 2),
                    "ceiling": signing_ceiling(postfix["deliveries_per_s"]),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                }
            )
            if args.runs > 1:
                print(f"run {i + 1}/{args.runs}: {summary_line(runs[-1])}", file=sys.stderr)
    finally:
        dns.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {"members": args.members, **runs[0]}
    if args.runs > 1:
        result = {"members": args.members, "runs": runs, "median": medians(runs)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
