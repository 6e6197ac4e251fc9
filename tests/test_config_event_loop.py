"""[server] event_loop: auto (uvloop when importable), uvloop, asyncio."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop

from relay.app import loop_factory, run_loop
from relay.config import load_config
from relay.errors import ConfigError


def _running_loop_module(factory: object) -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_loop(main(), factory)  # type: ignore[arg-type]
    return seen[0]


def test_event_loop_choices(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text("")
    default = load_config(cfg)
    assert default.server.event_loop == "auto"
    assert loop_factory(default) is uvloop.new_event_loop  # uvloop is a dependency
    assert _running_loop_module(loop_factory(default)) == "uvloop"
    cfg.write_text('[server]\nevent_loop = "asyncio"\n')
    plain = load_config(cfg)
    assert loop_factory(plain) is None
    assert _running_loop_module(loop_factory(plain)) == "asyncio"
    cfg.write_text('[server]\nevent_loop = "uvloop"\n')
    assert loop_factory(load_config(cfg)) is uvloop.new_event_loop
    cfg.write_text('[server]\nevent_loop = "trio"\n')
    with pytest.raises(ConfigError, match="event_loop"):
        load_config(cfg)
