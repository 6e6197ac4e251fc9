"""The post and its fan-out are one accepted unit: kill -9 right after the post's 250
with a 200-member list, restart, and every member gets exactly one copy (the members'
MX is down until the restart, so no copy was in flight at the kill)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from relay.cli import main as cli
from relay.config import dump_toml
from relay.lab.mta import LabMta
from tests.e2e.test_crash import start_relay, wait_listening
from tests.labutil import send
from tests.lists.listlab import AUTHOR_IP, LIST, ListLab, free_port, post

pytestmark = pytest.mark.slow


async def test_kill_9_after_the_posts_250_loses_and_doubles_nothing(tmp_path: Path) -> None:
    lab = ListLab(tmp_path)
    mx_port = free_port("127.0.0.2")
    smtp_port = free_port()
    doc = lab.doc(mx_port, smtp_port=smtp_port)
    doc["auth"]["crypto_workers"] = 0
    cfg = tmp_path / "config.toml"
    cfg.write_text(dump_toml(doc))
    members = [f"m{i:03d}@one.test" for i in range(200)]
    assert cli(["list", "add", LIST, *members, "--config", str(cfg)]) == 0
    log = tmp_path / "relay.log"
    proc = start_relay(cfg, log)
    try:
        await wait_listening(smtp_port)
        await send(
            "127.0.0.1",
            smtp_port,
            "alice@author.test",
            [LIST],
            post("alice@author.test", LIST),
            source=AUTHOR_IP,
        )
        proc.send_signal(signal.SIGKILL)  # right after the 250
        proc.wait(10)
        async with LabMta("127.0.0.2", mx_port, hostname="mx.one.test") as mx:
            proc = start_relay(cfg, log)
            await wait_listening(smtp_port)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(mx.messages) < 200:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # nothing more may come
            got = sorted(m.rcpt_tos[0] for m in mx.messages)
            assert got == sorted(members), (len(got), len(set(got)))
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lab.close()
