"""Crypto off the event loop: signature checks and ARC seals in an executor.

RSA and canonicalisation are CPU-bound; run on the loop they would stall every SMTP
session. The executor is a thread pool in each relay worker (OpenSSL releases the GIL
while it signs and hashes) or, with one relay worker, ``make_crypto_pool``'s
ProcessPoolExecutor (forkserver start method, so no worker inherits the loop's threads or
sockets) whose workers import dkimpy and cryptography once; relay.auth.wiring chooses.
Every API that uses it takes ``executor=None`` meaning "inline": tests and one-off
commands run without one. Jobs are plain top-level functions with picklable arguments,
safe to run in several threads at once (their caches are bounded dicts and lru_caches).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Below this size a message's DKIM/ARC crypto runs inline even when a thread pool is
# configured: the hand-off to a thread (a future, a queue, a wake-up, the GIL passed back
# and forth with the loop) costs more than the ~0.3 ms RSA-2048 sign it would move, and
# with one relay worker per core there is no idle core for the thread anyway (bench/run.py
# --auth: 0.7 CPU ms a message less, docs/benchmark.md). Larger messages, whose body
# hashing and canonicalisation take milliseconds, still leave the loop. A process pool
# (one relay worker: the second core does the crypto) always gets the job.
INLINE_BELOW = 128 * 1024


def _warm_up() -> None:
    import dkim  # noqa: F401
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: F401

    import relay.auth.arc  # noqa: F401
    import relay.auth.dkim  # noqa: F401


def make_crypto_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool sized to the CPUs (default: all of them, at least 1)."""
    count = workers if workers is not None else max(os.cpu_count() or 1, 1)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=count, mp_context=ctx, initializer=_warm_up)


async def run_crypto(
    executor: Executor | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run fn(*args) in the executor, or inline when executor is None."""
    if executor is None:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    if kwargs:
        import functools

        return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))
    return await loop.run_in_executor(executor, fn, *args)


async def run_crypto_for(
    executor: Executor | None, size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """run_crypto for a message of ``size`` bytes: inline when a thread pool would cost
    more than it saves (``INLINE_BELOW``)."""
    if isinstance(executor, ThreadPoolExecutor) and size < INLINE_BELOW:
        return fn(*args, **kwargs)
    return await run_crypto(executor, fn, *args, **kwargs)
