"""Benchmark: our relay against Postfix, same load, same sink, same run.

    .venv/bin/python bench/run.py [--clients 20] [--messages 5000] [--size 4096] [--auth]

On loopback: the load generator (bench/loadgen.py, C concurrent SMTP clients, one
message per connection) sends N messages of S bytes to the system under test, which
relays them (durable queue, fsync before every 250) to Postfix's smtp-sink. The systems:

- ``relay``: ``relay serve`` (with ``--auth``: SPF, DKIM, DMARC, A-R header, ARC seal);
- ``postfix``: a bare Postfix relay, no authentication work;
- ``postfix+rspamd`` (with ``--auth``): the same Postfix with rspamd as its milter doing
  SPF, DKIM, DMARC, ARC validation and sealing and the A-R header (bench/rspamdsys.py),
  the peer that does the relay's work.

Measured for each system: accepted msgs/s (N / time until the last 250), delivered msgs/s
(N / time until the sink has all N), p50/p99 accept latency (MAIL FROM to the 250 after
"."), p50/p99 commit latency ("." to 250), CPU ms per message (user+sys of every process
of the system, rspamd's included), peak memory (summed RSS and PSS of its processes).
Prints a table with the ratios relay/each other system and the machine's RSA-2048 sign
time, and writes JSON to bench/out/. With ``--auth``, before a system that seals is
measured, a few copies that went through it are caught and checked with dkimpy
(bench/sealcheck.py): the run stops if its ARC set does not verify or its
Authentication-Results header is missing.

Addresses: sink 127.0.0.11, relay 127.0.0.12, Postfix 127.0.0.13, probe sink 127.0.0.14,
rspamd's milter 127.0.0.15 (ports picked free). The relay finds the sink through MX
records of sink.test served by a lab DNS server in this process (rspamd asks the same
server); Postfix sends everything to [127.0.0.11]:port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import rsaspeed  # noqa: E402
from bench.messages import SINK_DOMAIN, write_messages  # noqa: E402
from bench.pgsys import PgRelaySystem, PgServer  # noqa: E402
from bench.postfix import PROBE_DOMAIN, PostfixSystem  # noqa: E402
from bench.procstat import PeakMemory, context_switches, cpu_seconds  # noqa: E402
from bench.relaysys import RelaySystem  # noqa: E402
from bench.rspamdsys import SEAL_DOMAIN, SEAL_SELECTOR, PostfixRspamdSystem  # noqa: E402
from bench.rspamdsys import available as rspamd_available  # noqa: E402
from bench.sealcheck import SealCheckError, verify_system  # noqa: E402
from bench.sink import Sink  # noqa: E402
from relay.lab.dnsserver import LabDnsServer, Zone  # noqa: E402
from relay.lab.postfix import POSTCONF, PostfixError, available, free_port  # noqa: E402

SINK_IP = "127.0.0.11"
RELAY_IP = "127.0.0.12"
POSTFIX_IP = "127.0.0.13"
PROBE_IP = "127.0.0.14"
MILTER_IP = "127.0.0.15"
RELAY, POSTFIX, RSPAMD = "relay", "postfix", "postfix+rspamd"
RELAY_PG, RELAY_PG2 = "relay-pg", "relay-pg-x2"  # --store postgresql: one node, two nodes
PROBE_COPIES = 3
# Goals of issue 10 for the relay with everything on (delivered msgs/s).
GOALS = {RSPAMD: 2.0, POSTFIX: 1.3}
OUT = ROOT / "bench" / "out"


class System(Protocol):
    name: str
    host: str
    port: int

    def start(self) -> None: ...
    def pids(self) -> list[int]: ...
    def stop(self) -> None: ...
    def log_tail(self, n: int = 2000) -> str: ...


def loadgen(
    host: str,
    port: int,
    msgdir: Path,
    count: int,
    args: argparse.Namespace,
    also: tuple[int, ...] = (),
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        "--host",
        host,
        "--port",
        str(port),
        "--messages",
        str(msgdir),
        "--clients",
        str(args.clients),
        "--count",
        str(count),
        "--per-conn",
        str(args.per_conn),
        "--duration",
        str(args.duration),
        "--rcpt-to",
        f"user@{SINK_DOMAIN}",
    ]
    for p in also:  # the clients spread over the nodes
        cmd += ["--also-port", str(p)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 120)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed: {r.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def measure(system: System, sink: Sink, msgdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then one measured run of ``args.messages`` messages."""
    print(f"[{system.name}] warm-up: {args.warmup} messages", flush=True)
    base = sink.count
    also = tuple(getattr(system, "also_ports", ()))  # the other nodes of a system of several
    warm = loadgen(system.host, system.port, msgdir, args.warmup, args, also)
    if warm["ok"] == 0:
        raise RuntimeError(f"{system.name} accepted nothing in warm-up: {warm['errors']}")
    if not sink.wait_for(base + warm["ok"], timeout=60):
        raise RuntimeError(
            f"{system.name}: warm-up mail not delivered ({sink.count - base}/{warm['ok']})\n"
            + system.log_tail()
        )
    time.sleep(0.5)
    base = sink.count
    statements = getattr(system, "statements", None)  # --pg-stats: reset before the run
    if statements is not None:
        statements()
    print(f"[{system.name}] measured: {args.messages} messages, {args.clients} clients", flush=True)
    profiler = start_profiler(system, args) if args.profile else None
    cpu0 = cpu_seconds(system.pids())
    csw0 = context_switches(system.pids())
    own0 = time.process_time()  # this process: the lab DNS server's threads, the sink reader
    parts = getattr(system, "parts", None)  # name -> pids, for a system of several
    parts0 = {k: cpu_seconds(p) for k, p in parts().items()} if parts else {}
    with PeakMemory(system.pids) as mem:
        gen = loadgen(system.host, system.port, msgdir, args.messages, args, also)
        complete = sink.wait_for(base + gen["ok"], timeout=args.drain_timeout)
        t_delivered = sink.last_change
        cpu1 = cpu_seconds(system.pids())
        csw1 = context_switches(system.pids())
        own1 = time.process_time()
        parts1 = {k: cpu_seconds(p) for k, p in parts().items()} if parts else {}
    time.sleep(0.5)  # late duplicates would show now
    delivered = sink.count - base
    profile = stop_profiler(profiler, system, args) if profiler else None
    ok = gen["ok"]
    accept_s = max(1e-9, gen["t_last_ok"] - gen["t_start"])
    deliver_s = max(1e-9, t_delivered - gen["t_start"])
    cpu = cpu1 - cpu0
    result: dict[str, Any] = {
        "system": system.name,
        "accepted": ok,
        "failed": gen["failed"],
        "errors": gen["errors"],
        "delivered": delivered,
        "duplicates": max(0, delivered - ok),
        "complete": complete,
        "accept_seconds": round(accept_s, 3),
        "deliver_seconds": round(deliver_s, 3),
        "accepted_per_s": round(ok / accept_s, 1),
        "delivered_per_s": round(min(delivered, ok) / deliver_s, 1),
        "latency_ms": gen["latency_ms"],
        "commit_ms": gen["commit_ms"],
        "cpu_seconds": round(cpu, 3),
        "cpu_ms_per_msg": round(cpu * 1000 / max(1, ok), 3),
        "context_switches_per_msg": round((csw1 - csw0) / max(1, ok), 1),
        "peak_rss_mib": round(mem.peak_rss_kib / 1024, 1),
        "peak_pss_mib": round(mem.peak_pss_kib / 1024, 1),
        "peak_processes": mem.peak_processes,
        "generator_cpu_seconds": round(gen["cpu_s"], 3),
        "bench_process_cpu_ms_per_msg": round((own1 - own0) * 1000 / max(1, ok), 3),
        "message_bytes": gen["message_bytes"],
    }
    if parts1:
        result["cpu_ms_per_msg_parts"] = {
            k: round((parts1[k] - parts0.get(k, 0.0)) * 1000 / max(1, ok), 3) for k in parts1
        }
    if profile is not None:
        result["profile"] = profile
    top = statements() if statements is not None else []
    if top:
        result["pg_statements"] = top
        print(f"[{system.name}] server time per statement (pg_stat_statements, measured run):")
        for st in top:
            print(
                f"  {st['calls']:7d} calls {st['total_ms']:9.1f} ms {st['mean_ms']:.4f} ms/call"
                f" {st['wal_bytes'] / max(1, ok):8.0f} WAL B/msg  {st['query'][:110]}"
            )
    if not complete:
        print(f"[{system.name}] NOT all delivered: {delivered}/{ok}\n{system.log_tail()}")
    return result


# ------------------------------------------------------------------ profiling (py-spy)


def record_tree(pid: int, out: Path, gil: bool = False) -> subprocess.Popen[bytes] | None:
    """py-spy recording the process tree of pid (raw stacks, 200 Hz) into out; None, said
    on stderr, when py-spy is not installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        print("--profile: py-spy is not installed (.venv/bin/pip install py-spy)", file=sys.stderr)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "200"]
    cmd += ["--format", "raw", "--output", str(out), "--nonblocking"]
    if gil:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def end_recordings(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop py-spy recorders (SIGINT: they write their output) and wait for them."""
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


def start_profiler(system: System, args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    """py-spy on each relay node's process tree (relay, relay-pg, relay-pg-x2)."""
    nodes = getattr(system, "nodes", None) or [system]
    roots = [n.pids()[0] for n in nodes if n.pids()]
    if not roots or system.name not in (RELAY, RELAY_PG, RELAY_PG2):
        return []
    procs = []
    for i, pid in enumerate(roots):
        out = OUT / f"relay-profile-{system.name}-{i}.txt"
        proc = record_tree(pid, out, args.profile_gil)
        if proc is None:
            return []
        procs.append(proc)
    time.sleep(1.0)
    return procs


def stop_profiler(
    procs: list[subprocess.Popen[bytes]], system: System, args: argparse.Namespace
) -> dict[str, Any]:
    end_recordings(procs)
    paths = sorted(OUT.glob(f"relay-profile-{system.name}-*.txt"))
    return summarize_profile(paths, args.profile_top) if paths else {}


def summarize_profile(paths: list[Path], top: int) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    lines = [ln for p in paths for ln in p.read_text(errors="replace").splitlines()]
    for line in lines:
        stack, _, n_s = line.rpartition(" ")
        if not n_s.isdigit():
            continue
        n = int(n_s)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        names = [_frame_name(f) for f in frames]
        own[names[-1]] = own.get(names[-1], 0) + n
        for name in set(names):
            incl[name] = incl.get(name, 0) + n

    def top_of(d: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [(k, round(100.0 * v / max(1, total), 1)) for k, v in ranked]

    return {"samples": total, "self_pct": top_of(own), "inclusive_pct": top_of(incl)}


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/file.py:line)"
    fn, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{fn}"


# ------------------------------------------------------------------ seal check


def seal_check(
    name: str, system: System, probe: tuple[str, int], msgdir: Path, zone: Zone
) -> dict[str, Any]:
    """Send PROBE_COPIES signed messages through ``system`` to a dumping sink on ``probe``
    and verify the copies (bench/sealcheck.py); SealCheckError when the work is missing."""
    messages = [p.read_bytes() for p in sorted(msgdir.glob("*.eml"))[:PROBE_COPIES]]
    domain = "relay.bench.test" if name == RELAY else SEAL_DOMAIN
    result = verify_system(name, (system.host, system.port), probe, messages, zone, domain)
    print(f"[{name}] seal check: {result}", flush=True)
    return result


# ------------------------------------------------------------------ report


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("accepted msgs/s", "accepted_per_s", "{:.0f}"),
        ("delivered msgs/s", "delivered_per_s", "{:.0f}"),
        ("accept latency p50 ms", ("latency_ms", "p50"), "{:.1f}"),
        ("accept latency p99 ms", ("latency_ms", "p99"), "{:.1f}"),
        ("commit latency p50 ms", ("commit_ms", "p50"), "{:.1f}"),
        ("commit latency p99 ms", ("commit_ms", "p99"), "{:.1f}"),
        ("CPU ms / message", "cpu_ms_per_msg", "{:.2f}"),
        ("context switches / message", "context_switches_per_msg", "{:.1f}"),
        ("peak RSS MiB (sum)", "peak_rss_mib", "{:.0f}"),
        ("peak PSS MiB (sum)", "peak_pss_mib", "{:.0f}"),
        ("processes (peak)", "peak_processes", "{:.0f}"),
        ("accepted / delivered", None, ""),
        ("failed", "failed", "{:d}"),
        ("duplicates delivered", "duplicates", "{:d}"),
    ]
    names = list(results)
    # relay / each other system, when the relay was measured
    others = [n for n in names if n != RELAY] if RELAY in names else []
    head = f"{'':24}" + "".join(f"{n:>16}" for n in names)
    head += "".join(f"{'relay/' + n:>22}" for n in others)
    lines = [head]

    def get(r: dict[str, Any], key: Any) -> Any:
        if isinstance(key, tuple):
            return r[key[0]][key[1]]
        return r[key]

    for label, key, fmt in rows:
        if key is None:
            cells = [f"{r['accepted']}/{r['delivered']}" for r in results.values()]
            lines.append(f"{label:24}" + "".join(f"{c:>16}" for c in cells))
            continue
        vals = {n: get(r, key) for n, r in results.items()}
        line = f"{label:24}" + "".join(f"{fmt.format(v):>16}" for v in vals.values())
        for n in others:
            if isinstance(vals[n], int | float) and vals[n]:
                line += f"{vals[RELAY] / vals[n]:>21.2f}x"
        lines.append(line)
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "postfix": out([POSTCONF, "-d", "-h", "mail_version"]),  # -d: no main.cf needed
        "rspamd": out(["/usr/bin/rspamd", "--version"]).removeprefix("Rspamd daemon version "),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "commit": out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
    }


# ------------------------------------------------------------------ main


def run_system(
    name: str,
    rnd: int,
    args: argparse.Namespace,
    work: Path,
    msgdir: Path,
    dns: LabDnsServer,
    zone: Zone,
    pg: PgServer | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Start a fresh sink and a fresh system, check its seals (first round), measure,
    stop both."""
    check = None
    sink = Sink(SINK_IP, free_port(SINK_IP)).start()
    try:
        system: System
        # Where probe.test's mail goes: the relay delivers every MX on its [delivery]
        # port (the sink's), the Postfixes to a transport of their own.
        relayish = name in (RELAY, RELAY_PG, RELAY_PG2)
        probe = (PROBE_IP, sink.port if relayish else free_port(PROBE_IP))
        extra = dict(kv.split("=", 1) for kv in args.postfix_set)
        if name in (RELAY_PG, RELAY_PG2):
            assert pg is not None
            system = PgRelaySystem(
                name,
                pg,
                2 if name == RELAY_PG2 else 1,
                RELAY_IP,
                work / f"{name}-{rnd}",
                dns.address,
                sink.port,
                workers=args.pg2_workers
                if name == RELAY_PG2 and args.pg2_workers
                else args.workers,
                auth=False,
                log_level=args.relay_log_level,
                overrides=args.relay_set,
            )
        elif name == RELAY:
            relay = RelaySystem(
                RELAY_IP,
                work / f"relay-{rnd}",
                dns.address,
                sink.port,
                workers=args.workers,
                auth=args.auth,
                log_level=args.relay_log_level,
                overrides=args.relay_set,
            )
            if relay.arc_record:
                zone.set("arc._domainkey.relay.bench.test", "TXT", [relay.arc_record])
            system = relay
        elif name == RSPAMD:
            peer = PostfixRspamdSystem(
                POSTFIX_IP,
                MILTER_IP,
                (SINK_IP, sink.port),
                dns.address,
                extra,
                workers=args.rspamd_workers or os.cpu_count() or 1,
                probe=probe,
            )
            zone.set(f"{SEAL_SELECTOR}._domainkey.{SEAL_DOMAIN}", "TXT", [peer.arc_record])
            system = peer
        else:
            system = PostfixSystem(POSTFIX_IP, (SINK_IP, sink.port), extra)
        print(f"[{name}] starting", flush=True)
        system.start()
        try:
            if args.auth and name != POSTFIX:
                check = seal_check(name, system, probe, msgdir, zone)
            return measure(system, sink, msgdir, args), check
        finally:
            system.stop()
    finally:
        sink.stop()


_TOTALS = ("accepted", "failed", "delivered", "duplicates")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds: counts summed, figures as medians."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {"system": runs[0]["system"], "rounds": len(runs)}
    for key, first in runs[0].items():
        values = [r[key] for r in runs if key in r]
        if key in _TOTALS:
            out[key] = sum(values)
        elif key == "complete":
            out[key] = all(values)
        elif key == "errors":
            merged: dict[str, int] = {}
            for v in values:
                for k, n in v.items():
                    merged[k] = merged.get(k, 0) + n
            out[key] = merged
        elif isinstance(first, bool) or key in ("system", "profile"):
            out[key] = first
        elif isinstance(first, int | float):
            out[key] = statistics.median(values)
        elif isinstance(first, dict):
            out[key] = {k: statistics.median(v[k] for v in values) for k in first}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="relay vs Postfix (and rspamd) benchmark")
    p.add_argument("--clients", type=int, default=20, help="concurrent SMTP clients (20)")
    p.add_argument("--messages", type=int, default=5000, help="messages per system (5000)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (4096)")
    p.add_argument("--per-conn", type=int, default=1, help="messages per connection (1)")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured messages first (200)")
    p.add_argument("--duration", type=float, default=90.0, help="cap on sending, seconds (90)")
    p.add_argument("--drain-timeout", type=float, default=90.0, help="cap on delivery wait")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds, medians (1)")
    p.add_argument("--auth", action="store_true", help="DKIM-signed mail; relay auth+ARC on")
    p.add_argument(
        "--workers", type=int, default=None, help="relay [server] workers (the relay's default)"
    )
    p.add_argument(
        "--only",
        action="append",
        choices=(RELAY, POSTFIX, RSPAMD, RELAY_PG, RELAY_PG2),
        help="measure this system only (repeatable; default: relay, postfix and, with "
        "--auth, postfix+rspamd; with --store postgresql also relay-pg, relay-pg-x2)",
    )
    p.add_argument(
        "--rspamd-workers",
        type=int,
        default=None,
        help="rspamd proxy (self-scan) processes (default: one per CPU)",
    )
    p.add_argument("--relay-log-level", default="info", help="relay [logging] level (info)")
    p.add_argument(
        "--relay-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a relay config key (repeatable)",
    )
    p.add_argument(
        "--postfix-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a Postfix main.cf parameter (repeatable)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the relay (skews figures)")
    p.add_argument(
        "--pg2-workers",
        type=int,
        default=None,
        help="[server] workers of each node of relay-pg-x2 (default: as --workers; 1 splits"
        " a 2-core machine's cores between the two nodes)",
    )
    p.add_argument(
        "--pg-stats",
        action="store_true",
        help="--store postgresql: print the server time per statement (pg_stat_statements)",
    )
    p.add_argument("--profile-top", type=int, default=25, help="functions listed (25)")
    p.add_argument("--profile-gil", action="store_true", help="only samples holding the GIL")
    p.add_argument("--distinct", type=int, default=200, help="distinct messages, used in turn")
    p.add_argument("--json", type=Path, help="JSON output path (default bench/out/...)")
    p.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="postgresql: also the relay on a throwaway PostgreSQL, one node and two nodes "
        "on one database (bench/pgsys.py), beside the SQLite store",
    )
    return p.parse_args(argv)


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return round(float(a[key]) / max(1e-9, float(b[key])), 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not available():
        print("needs Debian's postfix package and root (see docs/benchmark.md)", file=sys.stderr)
        return 2
    everything = [RELAY, POSTFIX, RSPAMD] if args.auth else [RELAY, POSTFIX]
    names = [n for n in (RELAY, POSTFIX, RSPAMD) if n in args.only] if args.only else everything
    if args.store == "postgresql":
        if args.auth:
            print("--store postgresql measures without --auth", file=sys.stderr)
            return 2
        pgs = [n for n in (RELAY_PG, RELAY_PG2) if not args.only or n in args.only]
        names[1:1] = pgs
    if RSPAMD in names and not rspamd_available():
        print("postfix+rspamd needs Debian's rspamd package", file=sys.stderr)
        return 2
    if RSPAMD in names and not args.auth:
        print("postfix+rspamd does the --auth work: run it with --auth", file=sys.stderr)
        return 2
    started = time.monotonic()
    # The unit the authentication work scales with (two signatures per ARC set).
    rsa: dict[str, float | None] = {"openssl_ms": None, "cryptography_ms": None}
    if args.auth:
        print("RSA-2048 sign time (openssl speed, cryptography) ...", flush=True)
        rsa = rsaspeed.measure()
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    work.chmod(0o755)
    msgdir = work / "messages"
    size, zone = write_messages(msgdir, args.distinct, args.size, signed=args.auth)
    zone.add(SINK_DOMAIN, "MX", (10, f"mx.{SINK_DOMAIN}"))
    zone.add(f"mx.{SINK_DOMAIN}", "A", SINK_IP)
    zone.add(PROBE_DOMAIN, "MX", (10, f"mx.{PROBE_DOMAIN}"))
    zone.add(f"mx.{PROBE_DOMAIN}", "A", PROBE_IP)
    dns = LabDnsServer(zone).start()
    pg = PgServer(stats=args.pg_stats) if args.store == "postgresql" else None
    runs: dict[str, list[dict[str, Any]]] = {}
    checks: dict[str, list[dict[str, Any]]] = {}
    try:
        for rnd in range(args.rounds):
            # Alternate who goes first, so a drift in the machine's load hits all.
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                print(f"--- round {rnd + 1}/{args.rounds}: {name}", flush=True)
                result, check = run_system(name, rnd, args, work, msgdir, dns, zone, pg)
                runs.setdefault(name, []).append(result)
                if check is not None:
                    checks.setdefault(name, []).append(check)
    except PostfixError as exc:
        print(f"Postfix failed: {exc}", file=sys.stderr)
        return 1
    except SealCheckError as exc:
        print(f"ABORTED: {exc}", file=sys.stderr)
        return 1
    finally:
        dns.stop()
        if pg is not None:
            pg.stop()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    results = {name: combine(rs) for name, rs in runs.items()}
    print()
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds (counts are totals)")
    print(
        f"{args.messages} messages of {size} bytes, {args.clients} clients, "
        f"{args.per_conn} per connection, auth={'on' if args.auth else 'off'}, "
        f"relay workers={args.workers or 'default'}"
        + (f", rspamd workers={args.rspamd_workers or os.cpu_count()}" if RSPAMD in names else "")
    )
    print(table(results))
    if rsa["cryptography_ms"] is not None:
        openssl_ms = rsa["openssl_ms"]
        print(
            f"RSA-2048 sign on this machine: {openssl_ms} ms (openssl speed), "
            f"{rsa['cryptography_ms']} ms (cryptography, in process)"
            + (f"; {openssl_ms / 0.30:.1f}x the 0.30 ms in issue 10" if openssl_ms else "")
        )
    for r in results.values():
        if "cpu_ms_per_msg_parts" in r:
            split = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_msg_parts"].items())
            print(f"CPU ms / message of {r['system']}: {split}")
    for r in results.values():
        if r["errors"]:
            print(f"{r['system']} errors: {r['errors']}")
        if "profile" in r:
            print("\nrelay profile, self time (% of samples):")
            for fn, pct in r["profile"].get("self_pct", []):
                print(f"  {pct:5.1f}  {fn}")
            print("relay profile, inclusive (% of samples):")
            for fn, pct in r["profile"].get("inclusive_pct", []):
                print(f"  {pct:5.1f}  {fn}")
    report: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "message_bytes": size,
        "environment": environment(),
        "rsa2048_sign_ms": rsa,
        "results": results,
        "runs": runs,
        "seal_checks": checks,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    if RELAY in results:
        r = results[RELAY]
        report["ratios"] = {}
        print()
        for other in (n for n in names if n != RELAY):
            o = results[other]
            d, acc = ratio(r, o, "delivered_per_s"), ratio(r, o, "accepted_per_s")
            report["ratios"][other] = {"delivered": d, "accepted": acc}
            line = f"delivered msgs/s ratio relay/{other}: {d:.2f}"
            if args.auth and other in GOALS:
                goal = GOALS[other]
                line += f"  (goal >= {goal}x: {'met' if d >= goal else 'NOT met'})"
            print(line)
        if RELAY_PG in results:  # issue 14's goals
            one = ratio(results[RELAY_PG], r, "delivered_per_s")
            two = (
                ratio(results[RELAY_PG2], results[RELAY_PG], "delivered_per_s")
                if RELAY_PG2 in results
                else None
            )
            report["ratios"]["postgresql"] = {"one_node_vs_sqlite": one, "two_vs_one": two}
            print(f"delivered msgs/s relay-pg/relay (SQLite): {one:.2f}  "
                  f"(goal >= 0.8x: {'met' if one >= 0.8 else 'NOT met'})")  # fmt: skip
            if two is not None:
                print(f"delivered msgs/s relay-pg-x2/relay-pg: {two:.2f}  "
                      f"(goal >= 1.0x: {'met' if two >= 1.0 else 'NOT met'})")  # fmt: skip
        if POSTFIX in results:  # the keys earlier reports and the interop test read
            report["ratio_delivered"] = report["ratios"][POSTFIX]["delivered"]
            report["ratio_accepted"] = report["ratios"][POSTFIX]["accepted"]
    path = args.json
    if path is None:
        OUT.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = OUT / f"bench-{stamp}{'-auth' if args.auth else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {path}  (wall {report['wall_seconds']} s)")
    ok = all(r["complete"] and r["failed"] == 0 and r["duplicates"] == 0 for r in results.values())
    if not ok:
        print("FAILED: a system lost, refused or duplicated mail (see the table)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
