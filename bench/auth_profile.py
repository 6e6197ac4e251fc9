"""CPU cost of the authentication intake transform, in process, with an optional profile.

Runs the real transform from ``relay.auth.wiring.build_auth`` (SPF, DKIM verification,
ARC validation, DMARC, the Authentication-Results header and, with ``--seal``, the ARC
seal) over the bench's 64 DKIM-signed 4 KB messages in turn, DNS answered from a
StaticResolver holding the bench zone (so no DNS cost), and prints CPU ms per message:
the best of ``--runs`` runs (the machine is shared; the best run is the least disturbed).
``--profile tottime|cumtime`` then prints a cProfile listing of one more pass.

Run: .venv/bin/python bench/auth_profile.py [--seal] [-n 1000] [--profile tottime]
Without --seal the figure is the verdict alone; with it, add the two RSA-2048 signatures
of the seal (about 0.8 ms each here) and the seal's canonicalisation and headers.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path

import structlog

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.messages import write_messages  # noqa: E402
from relay.auth.wiring import build_auth  # noqa: E402
from relay.commands.keygen import generate  # noqa: E402
from relay.config import load_config  # noqa: E402
from relay.dns import StaticResolver  # noqa: E402
from relay.intake import Transform  # noqa: E402
from relay.model import ConnInfo, Envelope  # noqa: E402

CONN = ConnInfo("127.0.0.5", 40000, helo="client.sender.test")
ENV = Envelope("bench@sender.test", ("user@sink.test",))


def build(work: Path, seal: bool) -> tuple[Transform, list[bytes]]:
    """The transform as the relay builds it, and the signed bench messages."""
    _, zone = write_messages(work / "msgs", 64, 4096, signed=True)
    signed = [p.read_bytes() for p in sorted((work / "msgs").glob("*.eml"))]
    resolver = StaticResolver()
    for name, records in zone.records.items():
        for rdtype, value in records:
            resolver.add(name, rdtype, value)
    (work / "arc.pem").write_bytes(generate("rsa", 2048).private_pem)
    (work / "relay.toml").write_text(
        '[server]\nhostname = "relay.bench.test"\nworkers = 2\n[srs]\nenabled = false\n'
        f'[arc]\nenabled = {"true" if seal else "false"}\ndomain = "relay.bench.test"\n'
        f'selector = "arc"\nprivate_key = "{work / "arc.pem"}"\n'
    )
    wiring = build_auth(load_config(work / "relay.toml"), resolver)
    return wiring.transforms[0], signed


async def measure(transform: Transform, signed: list[bytes], n: int, runs: int) -> float:
    """CPU ms per message, best of runs."""
    await transform(CONN, ENV, signed[-1])  # warm up
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        for i in range(n):
            await transform(CONN, ENV, signed[i % len(signed)])
        best = min(best, (time.process_time() - start) / n * 1000)
    return best


async def profile(transform: Transform, signed: list[bytes], n: int, sort: str) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n):
        await transform(CONN, ENV, signed[i % len(signed)])
    prof.disable()
    pstats.Stats(prof).sort_stats(sort).print_stats(45)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seal", action="store_true", help="ARC-seal too (arc.enabled)")
    parser.add_argument("-n", type=int, default=1000, help="messages per run (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs; the best is shown")
    parser.add_argument("--profile", choices=("tottime", "cumtime"), help="cProfile listing")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="auth-profile-") as tmp:
        transform, signed = build(Path(tmp), args.seal)
        ms = asyncio.run(measure(transform, signed, args.n, args.runs))
        what = "verdict + ARC seal" if args.seal else "verdict only"
        print(f"auth transform ({what}): {ms:.3f} CPU ms/msg (best of {args.runs} x {args.n})")
        if args.profile:
            asyncio.run(profile(transform, signed, args.n, args.profile))


if __name__ == "__main__":
    main()
