"""CPU per DNS query of the relay's resolver, against the lab DNS server.

The lab server (relay/lab/dnsserver.py) runs in a child process, so the CPU time
measured (process_time of this process: every thread) is the client's alone. Each
resolver answers N distinct A queries (no cache), C at a time.

    PYTHONPATH=. .venv/bin/python bench/dns_cpu.py [-n 3000] [-c 20] [--impl dnspython|aiodns]

aiodns is measured only when it is installed (it was the resolver before dnspython).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from typing import Any


def _serve(n: int, q: Any) -> None:
    from relay.lab.dnsserver import LabDnsServer, Zone

    zone = Zone()
    for i in range(n):
        zone.add(f"h{i}.bench.test", "A", f"192.0.2.{i % 250 + 1}")
    with LabDnsServer(zone) as srv:
        q.put(srv.address)
        time.sleep(3600)


async def _run(impl: str, address: str, n: int, conc: int) -> dict[str, float]:
    if impl == "aiodns":
        import aiodns  # type: ignore[import-not-found, unused-ignore]

        res = aiodns.DNSResolver(nameservers=[address], timeout=2.0, tries=2)

        async def one(name: str) -> None:
            await res.query_dns(name, "A")
    else:
        from relay.dns import DnspythonResolver

        dres = DnspythonResolver([address], timeout=2.0, dnssec="trust-ad")

        async def one(name: str) -> None:
            await dres.a(name)

    sem = asyncio.Semaphore(conc)

    async def bounded(i: int) -> None:
        async with sem:
            await one(f"h{i}.bench.test")

    await one("h0.bench.test")  # warm up (imports, sockets)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(bounded(i) for i in range(n)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"queries": n, "cpu_us_per_query": cpu / n * 1e6, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("-c", type=int, default=20)
    ap.add_argument("--impl", action="append", choices=["dnspython", "aiodns"])
    args = ap.parse_args(argv)
    impls = args.impl or ["dnspython", "aiodns"]
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(args.n, q), daemon=True)
    proc.start()
    try:
        address = q.get(timeout=30)
        out: dict[str, Any] = {}
        for impl in impls:
            try:
                out[impl] = asyncio.run(_run(impl, address, args.n, args.c))
            except ImportError as exc:
                out[impl] = {"skipped": str(exc)}
        print(json.dumps(out, indent=2))
    finally:
        proc.kill()
        proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
