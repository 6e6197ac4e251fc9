"""SIGHUP on a running `relay serve` with two workers: aliases and trusted networks change
without a restart in every worker; an invalid new config is refused and the old one kept;
a key that needs a restart is named."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.test_crash import free_port, wait_listening
from tests.e2e.test_workers import _wait_children, _wait_log
from tests.labutil import base_doc, write_config

pytestmark = pytest.mark.slow


async def _rcpt(port: int, rcpt: str) -> int:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    async with client:
        await client.mail("a@sender.test")
        try:
            return (await client.rcpt(rcpt)).code
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code


async def test_sighup_reloads_aliases_keeps_the_old_config_when_invalid(tmp_path: Path) -> None:
    doc: dict[str, dict[str, Any]] = base_doc(tmp_path, "127.0.0.1:53", 25)
    port = free_port()
    doc["server"].update({"listen": [f"127.0.0.1:{port}"], "workers": 2})
    doc["logging"].update({"level": "info", "format": "json"})
    doc["aliases"] = {"old@lists.lab.test": ["bob@dest.test"]}
    cfg = tmp_path / "config.toml"
    write_config(cfg, doc)
    log = tmp_path / "relay.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_listening(port)
        kids = await _wait_children(proc.pid, 2)
        await _wait_log(log, '"event": "started"', 2)
        assert await _rcpt(port, "new@lists.lab.test") == 550
        doc["aliases"] = {"new@lists.lab.test": ["bob@dest.test"]}
        doc["server"]["max_recipients"] = 7  # needs a restart
        write_config(cfg, doc)
        proc.send_signal(signal.SIGHUP)
        done = [json.loads(x) for x in await _wait_log(log, '"event": "reloaded"', 2)]
        assert sorted(d["worker"] for d in done) == [0, 1]
        assert all(d["changed"] == ["aliases"] for d in done), done
        restart = [json.loads(x) for x in await _wait_log(log, "reload_needs_restart", 2)]
        assert all(r["keys"] == ["server.max_recipients"] for r in restart)
        for _ in range(4):  # whichever worker answers
            assert await _rcpt(port, "new@lists.lab.test") == 250
            assert await _rcpt(port, "old@lists.lab.test") == 550
        cfg.write_text("[server\nbroken")
        proc.send_signal(signal.SIGHUP)
        failed = [json.loads(x) for x in await _wait_log(log, "reload_failed", 2)]
        assert all("not valid TOML" in f["error"] for f in failed), failed
        await asyncio.sleep(0.2)
        assert proc.poll() is None and sorted(await _wait_children(proc.pid, 2)) == sorted(kids)
        for _ in range(4):
            assert await _rcpt(port, "new@lists.lab.test") == 250  # the old config kept
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_what_is_reloaded_and_what_needs_a_restart(tmp_path: Path) -> None:
    from relay.reload import differences, merged

    doc = base_doc(tmp_path, "127.0.0.1:53", 25)
    old = write_config(tmp_path / "a.toml", doc)
    doc["relay"]["trusted_networks"] = ["127.0.0.1/32", "10.0.0.0/8"]
    doc["delivery"]["retry_first"] = 60
    new = write_config(tmp_path / "a.toml", doc)
    changed, restart = differences(old, new)
    assert changed == ["relay.trusted_networks"] and restart == ["delivery.retry_first"]
    running = merged(old, new)
    assert running.relay == new.relay and running.delivery == old.delivery
