"""Two worker processes share the listen socket and the store: every message accepted is
delivered exactly once (new mail is claimed in flight by the worker that accepted it; only
the leader loads from the store)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from relay.workers import Backoff, describe_exit
from tests.e2e.test_crash import free_port, wait_listening
from tests.labutil import base_doc, message, write_config

pytestmark = pytest.mark.slow


async def test_two_workers_deliver_each_message_once(tmp_path: Path) -> None:
    zone = Zone()
    zone.add("dest.test", "MX", (10, "mx.dest.test"))
    zone.add("mx.dest.test", "A", "127.0.0.2")
    with LabDnsServer(zone) as dns:
        async with LabMta("127.0.0.2", 0) as mx:
            doc = base_doc(tmp_path, dns.address, mx.port)
            port = free_port()
            doc["server"].update({"listen": [f"127.0.0.1:{port}"], "workers": 2})
            cfg = tmp_path / "config.toml"
            write_config(cfg, doc)
            proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                stdout=(tmp_path / "relay.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            try:
                await wait_listening(port)
                children = subprocess.run(
                    ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
                ).stdout.split()
                assert len(children) == 2  # two workers
                sem = asyncio.Semaphore(10)

                async def one(i: int) -> None:
                    async with sem:
                        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
                        async with client:
                            await client.sendmail(
                                "a@sender.test",
                                ["b@dest.test"],
                                message(msgid=f"<w{i}@sender.test>"),
                            )

                await asyncio.gather(*(one(i) for i in range(150)))
                await mx.wait_for(150, timeout=30)
                await asyncio.sleep(1.0)  # would a second copy still arrive?
                ids = collections.Counter(
                    m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in mx.messages
                )
                assert len(ids) == 150 and max(ids.values()) == 1
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


async def _wait_log(log: Path, text: str, count: int = 1, timeout: float = 20) -> list[str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        lines = [x for x in log.read_text(errors="replace").splitlines() if text in x]
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{text!r} x{count} not in log:\n{log.read_text(errors='replace')}")


async def _wait_children(pid: int, n: int, timeout: float = 20) -> list[int]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        kids = _children(pid)
        if len(kids) == n:
            return kids
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{n} workers did not start")


def _serve(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    doc = base_doc(tmp_path, "127.0.0.1:53", 25)
    port = free_port()
    doc["server"].update({"listen": [f"127.0.0.1:{port}"], "workers": 2})
    doc["logging"].update({"level": "info", "format": "json"})
    cfg = tmp_path / "config.toml"
    write_config(cfg, doc)
    log = tmp_path / "relay.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, log, port


async def test_sigterm_during_a_worker_restart_still_stops_the_relay(tmp_path: Path) -> None:
    proc, log, port = _serve(tmp_path)
    try:
        await wait_listening(port)
        kids = await _wait_children(proc.pid, 2)
        os.kill(kids[0], signal.SIGKILL)
        # the parent logs the death, stops the other worker, and waits before a restart
        await _wait_log(log, "worker_died")
        await _wait_children(proc.pid, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        for pid in kids:  # no worker is left running
            assert not Path(f"/proc/{pid}").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_restarts_back_off_and_say_why_a_worker_died(tmp_path: Path) -> None:
    proc, log, port = _serve(tmp_path)
    try:
        await wait_listening(port)
        for round_ in (1, 2):
            kids = await _wait_children(proc.pid, 2)
            await _wait_log(log, "workers_started", round_)
            os.kill(kids[1], signal.SIGKILL)
            await _wait_log(log, "workers_restart", round_)
        died = [json.loads(x) for x in await _wait_log(log, "worker_died", 2)]
        assert all(d["signal"] == "SIGKILL" and "pid" in d for d in died), died
        delays = [json.loads(x)["delay"] for x in await _wait_log(log, "workers_restart", 2)]
        assert delays == [1.0, 2.0]  # doubling, not once a second
        await wait_listening(port)  # and it does come back
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_each_worker_logs_one_started_line_with_its_id_and_pid(tmp_path: Path) -> None:
    proc, log, port = _serve(tmp_path)
    try:
        await wait_listening(port)
        kids = await _wait_children(proc.pid, 2)
        lines = await _wait_log(log, '"event": "started"', 2)
        started = [json.loads(x) for x in lines]
        assert sorted(s["worker"] for s in started) == [0, 1]
        assert sorted(s["pid"] for s in started) == sorted(kids)
        await asyncio.sleep(0.3)
        assert len(await _wait_log(log, '"event": "started"', 2)) == 2  # one per process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_backoff_doubles_caps_and_resets_after_a_stable_run() -> None:
    b = Backoff(initial=1.0, cap=30.0, stable=60.0)
    delays: list[float] = []
    d: float | None = None
    for _ in range(7):
        d = b.next(d, ran=0.5)
        delays.append(d)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.next(30.0, ran=61.0) == 1.0


def test_describe_exit_names_the_signal_or_the_code() -> None:
    assert describe_exit(-9) == {"signal": "SIGKILL"}
    assert describe_exit(3) == {"exit_code": 3}
