"""[server] workers: 0 (the default) means one process per CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.config import load_config
from relay.errors import ConfigError


def test_workers_auto_and_default(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text("[server]\nworkers = 0\n")
    assert load_config(cfg).server.workers == (os.cpu_count() or 1)
    cfg.write_text("")
    assert load_config(cfg).server.workers == (os.cpu_count() or 1)
    cfg.write_text("[server]\nworkers = 1\n")
    assert load_config(cfg).server.workers == 1
    cfg.write_text("[server]\nworkers = -1\n")
    with pytest.raises(ConfigError):
        load_config(cfg)
