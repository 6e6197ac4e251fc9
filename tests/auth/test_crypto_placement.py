"""Where the auth crypto runs: a process pool with one relay process, a thread pool in each
of several; never on the event loop unless set to 0."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim

from relay.auth.arc import SealerSpec, seal_async
from relay.auth.offload import INLINE_BELOW
from relay.auth.types import ArcCv, ArcResult
from relay.auth.wiring import build_auth, crypto_pool_size, crypto_thread_count
from relay.commands.keygen import generate
from relay.config import ArcConfig, AuthConfig, Config, ServerConfig, SrsConfig
from relay.dns import StaticResolver


def _config(workers: int, crypto_workers: int, crypto_threads: int = 2) -> Config:
    return Config(
        path=Path("/nonexistent/config.toml"),
        server=ServerConfig(workers=workers),
        auth=AuthConfig(crypto_workers=crypto_workers, crypto_threads=crypto_threads),
        srs=SrsConfig(enabled=False),
        arc=ArcConfig(enabled=False),
    )


def test_one_relay_process_uses_the_pool() -> None:
    assert crypto_pool_size(_config(1, 1)) == 1
    assert crypto_pool_size(_config(1, 3)) == 3


def test_several_relay_processes_use_threads() -> None:
    assert crypto_pool_size(_config(2, 1)) == 0
    assert crypto_pool_size(_config(4, 2)) == 0
    assert crypto_thread_count(_config(2, 1)) == 2
    assert crypto_thread_count(_config(4, 1, 3)) == 3
    assert crypto_thread_count(_config(1, 1)) == 0  # one relay process: the process pool


def test_zero_is_inline() -> None:
    assert crypto_pool_size(_config(1, 0)) == 0
    assert crypto_thread_count(_config(2, 1, 0)) == 0


async def test_build_auth_makes_a_thread_pool_with_several_workers() -> None:
    wiring = build_auth(_config(2, 1), StaticResolver())
    try:
        assert isinstance(wiring.executor, ThreadPoolExecutor)
        assert wiring.executor._max_workers == 2
        assert len(wiring.transforms) == 1  # [auth] is on by default: the verdict still runs
    finally:
        await wiring.close()
    inline = build_auth(_config(2, 1, 0), StaticResolver())
    assert inline.executor is None
    await inline.close()


MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n" * 1
LARGE = MESSAGE + b"a line of the body, long enough to count\r\n" * (INLINE_BELOW // 40)


async def test_seal_in_a_crypto_thread_leaves_the_loop_free_and_gives_the_same_bytes() -> None:
    """OpenSSL releases the GIL while it signs: the loop keeps running during a seal in a
    crypto thread, and never during an inline one. A message under INLINE_BELOW is sealed
    inline even with a thread pool (the hand-off costs more than the sign). All verify."""
    key = generate("rsa", 2048)
    spec = SealerSpec("example.net", "arc", key.private_pem, "relay.example.net")
    chain = ArcResult(ArcCv.NONE)
    ar = "relay.example.net; spf=pass smtp.mailfrom=example.com"
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    async def ticks_during(
        executor: ThreadPoolExecutor | None, message: bytes = LARGE
    ) -> tuple[int, bytes]:
        nonlocal ticks
        await asyncio.sleep(0)
        ticks = 0
        sealed = await seal_async(spec, message, ar, chain, executor=executor)
        return ticks, sealed.raw

    task = asyncio.create_task(ticker())
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        await seal_async(spec, MESSAGE, ar, chain, executor=pool)  # warm the sealer cache
        threaded = [await ticks_during(pool) for _ in range(5)]
        inline = [await ticks_during(None) for _ in range(5)]
        small = [await ticks_during(pool, MESSAGE) for _ in range(5)]
    finally:
        stop = True
        await task
        pool.shutdown()
    assert all(n > 0 for n, _ in threaded)  # the loop ran while each seal was signed
    assert all(n == 0 for n, _ in inline)  # inline, the loop waits for the whole seal
    assert all(n == 0 for n, _ in small)  # a small message: inline though a pool is there

    record = key.record().encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record if name.rstrip(b".") == b"arc._domainkey.example.net" else b""

    for _, sealed in threaded + inline + small:
        cv, _results, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc)
        assert cv == dkim.CV_Pass, reason
