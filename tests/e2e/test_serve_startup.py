"""`relay serve` start-up over real processes: one store, one running relay; everything
checked in the parent before a worker starts; one line and exit 2 for each problem."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from relay.storelock import lock_path
from tests.e2e.test_crash import free_port, wait_listening
from tests.labutil import base_doc, write_config

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, name: str = "config.toml", **over: dict[str, Any]) -> Path:
    doc = base_doc(tmp_path, "127.0.0.1:53", 25)
    doc["server"].update({"listen": [f"127.0.0.1:{free_port()}"], "workers": 2})
    for k, v in over.items():
        doc.setdefault(k, {}).update(v)
    path = tmp_path / name
    write_config(path, doc)
    return path


def _listen(cfg: Path) -> str:
    with cfg.open("rb") as f:
        return str(tomllib.load(f)["server"]["listen"][0])


def _relay(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=timeout
    )


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("workers", [1, 2])
async def test_second_serve_on_the_same_store_exits_2_naming_store_and_pid(
    tmp_path: Path, workers: int
) -> None:
    first_cfg = _config(tmp_path, server={"workers": workers})
    # the second instance listens elsewhere but names the same store
    second_cfg = _config(tmp_path, "second.toml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(first_cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = int(_listen(first_cfg).rsplit(":", 1)[1])
        await wait_listening(port)
        store = tmp_path / "relay.sqlite3"
        assert lock_path(store).read_text().strip() == str(proc.pid)
        t0 = time.monotonic()
        second = _relay("serve", "--config", str(second_cfg))
        assert second.returncode == 2
        line = _one_line(second.stderr)
        assert str(store) in line and f"pid {proc.pid}" in line, line
        assert time.monotonic() - t0 < 10
        assert proc.poll() is None  # the first one is untouched
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_missing_arc_key_with_several_workers_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        arc={"enabled": True, "domain": "lab.test", "selector": "s1",
             "private_key": str(tmp_path / "keys" / "nope.pem")},
    )  # fmt: skip
    res = _relay("serve", "--config", str(cfg))
    assert res.returncode == 2
    line = _one_line(res.stderr)
    assert "arc.private_key" in line and "nope.pem" in line, line
    assert "relay keygen" in line
    assert not lock_path(tmp_path / "relay.sqlite3").exists() or not _locked(tmp_path)


def test_an_unreachable_database_is_one_line_exit_2_before_workers(tmp_path: Path) -> None:
    """storage.url with no server behind it (a socket directory with none): `relay serve`
    (two workers) and `relay config check` say so in one line and exit 2, at once —
    the parent opens the database before any worker would die of it, over and over."""
    url = f"postgresql://relay@/relay?host={tmp_path}/nowhere"
    (tmp_path / "nowhere").mkdir()
    doc = base_doc(tmp_path, "127.0.0.1:53", 25)
    doc["server"].update({"listen": [f"127.0.0.1:{free_port()}"], "workers": 2})
    doc["storage"] = {"url": url}
    cfg = tmp_path / "pg.toml"
    write_config(cfg, doc)
    for args in (("serve", "--config", str(cfg)), ("config", "check", "--config", str(cfg))):
        res = _relay(*args)
        assert res.returncode == 2, (args, res.stderr[-1000:])
        line = _one_line(res.stderr)
        assert "cannot open store" in line and "nowhere" in line, line


def _alive(pid: str) -> bool:
    """Running (a zombie holds no files any more)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _locked(tmp_path: Path) -> bool:
    import fcntl

    fd = os.open(lock_path(tmp_path / "relay.sqlite3"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_bad_tls_key_and_bad_source_ip_are_refused_before_workers(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("not a certificate\n")
    cfg = _config(tmp_path, server={"tls_cert": str(cert), "tls_key": str(cert)})
    res = _relay("serve", "--config", str(cfg))
    assert res.returncode == 2 and "server.tls_cert" in _one_line(res.stderr)
    cfg = _config(tmp_path, delivery={"source_ip": "192.0.2.77"})
    res = _relay("serve", "--config", str(cfg))
    assert res.returncode == 2 and "delivery.source_ip" in _one_line(res.stderr)


def test_listen_address_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = _config(tmp_path, server={"listen": [f"127.0.0.1:{port}"], "workers": 1})
        res = _relay("serve", "--config", str(cfg))
    assert res.returncode == 2
    line = _one_line(res.stderr)
    assert line == f"relay: cannot listen on 127.0.0.1:{port}: address already in use", line


@pytest.mark.parametrize("secret", ["change-me", ""])
def test_shipped_or_empty_srs_secret_is_refused(tmp_path: Path, secret: str) -> None:
    cfg = _config(tmp_path, srs={"enabled": True, "domain": "fwd.lab.test", "secret": secret})
    res = _relay("serve", "--config", str(cfg))
    assert res.returncode == 2
    line = _one_line(res.stderr)
    assert "srs.secret" in line, line


@pytest.mark.parametrize(
    "argv",
    [("queue", "list"), ("queue", "show", "X1"), ("queue", "flush"), ("queue", "delete", "X1"),
     ("sts", "cache")],
)  # fmt: skip
def test_commands_that_read_a_store_refuse_a_missing_one(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    cfg = tmp_path / "WRONG.toml"
    write_config(cfg, {"storage": {"path": str(tmp_path / "nothere" / "relay.sqlite3")}})
    res = _relay(*argv, "--config", str(cfg))
    assert res.returncode == 2
    line = _one_line(res.stderr)
    assert "does not exist" in line and "nothere" in line, line
    assert not (tmp_path / "nothere").exists()


async def test_a_killed_relay_leaves_no_lock_behind(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    port = int(_listen(cfg).rsplit(":", 1)[1])
    argv = [sys.executable, "-m", "relay", "serve", "--config", str(cfg)]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_listening(port)
        workers = subprocess.run(
            ["pgrep", "-P", str(first.pid)], capture_output=True, text=True
        ).stdout.split()
        first.kill()  # kill -9: no clean-up runs; the kernel drops the flock
        first.wait(10)
        # the workers hold the lock too (an orphan still delivering must block a new
        # relay); they die with the parent (PR_SET_PDEATHSIG)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "workers outlived the parent"
            await asyncio.sleep(0.05)
        assert lock_path(tmp_path / "relay.sqlite3").read_text().strip() == str(first.pid)
        second = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await wait_listening(port)
            assert lock_path(tmp_path / "relay.sqlite3").read_text().strip() == str(second.pid)
        finally:
            second.terminate()
            assert second.wait(20) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
