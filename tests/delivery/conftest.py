"""Fixtures of the delivery tests: an MxLab (lab DNS, CA, receiving MTAs on 127.0.0.x)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.delivery.mxlab import MxLab


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[MxLab]:
    lab = MxLab(tmp_path)
    try:
        yield lab
    finally:
        await lab.close()
