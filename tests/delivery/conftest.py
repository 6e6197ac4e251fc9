"""Fixtures of the delivery tests: an MxLab (lab DNS, CA, receiving MTAs on 127.0.0.x) and
RawMx servers (a pipelining server that records each segment it reads)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.delivery.mxlab import MxLab
from tests.delivery.rawmx import RawMx


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[MxLab]:
    lab = MxLab(tmp_path)
    try:
        yield lab
    finally:
        await lab.close()


@pytest.fixture
async def raw_factory() -> AsyncIterator[Callable[..., Any]]:
    """RawMx servers on 127.0.0.150, .151, ... (ephemeral port, unless given)."""
    started: list[RawMx] = []

    async def make(port: int = 0, **kw: Any) -> RawMx:
        mx = await RawMx(f"127.0.0.{150 + len(started)}", port, **kw).start()
        started.append(mx)
        return mx

    yield make
    for mx in started:
        await mx.stop()
