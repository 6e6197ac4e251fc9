"""Where the auth crypto runs: a pool with one relay process, inline with several."""

from __future__ import annotations

from pathlib import Path

from relay.auth.wiring import build_auth, crypto_pool_size
from relay.config import ArcConfig, AuthConfig, Config, ServerConfig, SrsConfig
from relay.dns import StaticResolver


def _config(workers: int, crypto_workers: int) -> Config:
    return Config(
        path=Path("/nonexistent/config.toml"),
        server=ServerConfig(workers=workers),
        auth=AuthConfig(crypto_workers=crypto_workers),
        srs=SrsConfig(enabled=False),
        arc=ArcConfig(enabled=False),
    )


def test_one_relay_process_uses_the_pool() -> None:
    assert crypto_pool_size(_config(1, 1)) == 1
    assert crypto_pool_size(_config(1, 3)) == 3


def test_several_relay_processes_run_crypto_inline() -> None:
    assert crypto_pool_size(_config(2, 1)) == 0
    assert crypto_pool_size(_config(4, 2)) == 0


def test_zero_is_inline() -> None:
    assert crypto_pool_size(_config(1, 0)) == 0


async def test_build_auth_makes_no_pool_with_several_workers() -> None:
    wiring = build_auth(_config(2, 1), StaticResolver())
    try:
        assert wiring.executor is None
        assert len(wiring.transforms) == 1  # [auth] is on by default: the verdict still runs
    finally:
        await wiring.close()
