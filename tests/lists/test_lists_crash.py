"""The post and its fan-out are one accepted unit: kill -9 right after the post's 250
with a 200-member list, restart, and every member gets exactly one copy (the members'
MX is down until the restart, so no copy was in flight at the kill)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from relay.cli import main as cli
from relay.config import dump_toml
from relay.lab.mta import LabMta
from tests.e2e.test_crash import start_relay, wait_listening
from tests.labutil import free_port, send
from tests.lists.listlab import AUTHOR_IP, LIST, ListLab, post

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


def _start(cfg: Path, log: Path, crash_at: str = "") -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_TEST_CRASH_AT"}
    if crash_at:
        env["RELAY_TEST_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )


async def test_kill_9_before_the_write_of_a_post_with_mixed_recipients(tmp_path: Path) -> None:
    """A post to the list and to a non-member at once is one write with one 250: killed
    (RELAY_TEST_CRASH_AT=lists_prepared) after the list part is ready and before that
    write, nothing was stored and no 250 given; the client sends it again after the
    restart and every member, and the other recipient, gets exactly one copy. (With the
    list part written first, as before, the members got the post twice.)"""
    lab = ListLab(tmp_path)
    mx_port = free_port("127.0.0.2")
    smtp_port = free_port()
    doc = lab.doc(mx_port, smtp_port=smtp_port)
    doc["auth"]["crypto_workers"] = 0
    doc["relay"]["trusted_networks"] = ["127.0.0.1/32", f"{AUTHOR_IP}/32"]
    doc["server"]["workers"] = 1  # the crash point kills the relay itself, not a worker
    cfg = tmp_path / "config.toml"
    cfg.write_text(dump_toml(doc))
    members = [f"m{i:02d}@one.test" for i in range(20)]
    assert cli(["list", "add", LIST, *members, "--config", str(cfg)]) == 0
    log = tmp_path / "relay.log"
    message = post("alice@author.test", LIST, subject="mixed")
    rcpts = [LIST, "other@one.test"]
    proc = _start(cfg, log, crash_at="lists_prepared")
    try:
        async with LabMta("127.0.0.2", mx_port, hostname="mx.one.test") as mx:
            await wait_listening(smtp_port)
            with pytest.raises((aiosmtplib.SMTPException, OSError)):
                await send(
                    "127.0.0.1", smtp_port, "alice@author.test", rcpts, message, source=AUTHOR_IP
                )
            assert await asyncio.to_thread(proc.wait, 20) == -signal.SIGKILL
            proc = _start(cfg, log)
            await wait_listening(smtp_port)
            # the client got no 250: it sends the message again
            await send(
                "127.0.0.1", smtp_port, "alice@author.test", rcpts, message, source=AUTHOR_IP
            )
            want = sorted([*members, "other@one.test"])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(mx.messages) < len(want):
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.5)  # nothing more may come
            got = sorted(r for m in mx.messages for r in m.rcpt_tos)
            assert got == want, (len(got), len(set(got)))
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lab.close()
