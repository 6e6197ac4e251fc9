"""Our relay under test: ``relay serve --config PATH`` as a subprocess with a bench config
(durable SQLite store with fsync, our own lab DNS, delivery to the sink's port)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.procstat import tree
from relay.commands.keygen import generate
from relay.lab.postfix import free_port, wait_port
from tests.labutil import write_config

ROOT = Path(__file__).resolve().parent.parent


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value as TOML-ish: int, float, true/false, else string)."""
    left, _, raw = text.partition("=")
    section, _, key = left.partition(".")
    if not section or not key or not _:
        raise SystemExit(f"--relay-set wants section.key=value, not {text!r}")
    value: Any = raw
    if raw in ("true", "false"):
        value = raw == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
    return section, key, value


class RelaySystem:
    name = "relay"

    def __init__(
        self,
        host: str,
        workdir: Path,
        dns: str,
        sink_port: int,
        *,
        workers: int | None,
        auth: bool,
        log_level: str,
        overrides: list[str],
        storage_url: str = "",
        node_id: str = "",
    ) -> None:
        """``storage_url``: the PostgreSQL store (bench/pgsys.py) instead of SQLite;
        ``node_id``: this node's name on it."""
        self.host = host
        self.port = free_port(host)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        doc: dict[str, dict[str, Any]] = {
            "server": {
                "listen": [f"{host}:{self.port}"],
                "hostname": "relay.bench.test",
                "max_connections_per_ip": 1000,
            },
            "relay": {"trusted_networks": ["127.0.0.0/8"], "local_domains": []},
            "storage": {"path": str(workdir / "relay.sqlite3")},
            "dns": {"nameservers": [dns], "timeout": 5},
            "delivery": {"port": sink_port, "retry_first": 5},
            "mta_sts": {"enabled": False},
            "tlsrpt": {"enabled": False},
            "auth": {"enabled": False},
            "arc": {"enabled": False},
            "srs": {"enabled": False},
            "logging": {"level": log_level, "format": "json"},
        }
        if workers is not None:
            doc["server"]["workers"] = workers
        if storage_url:
            doc["storage"] = {"url": storage_url}
        if node_id:
            doc["server"]["node_id"] = node_id
        self.arc_record = ""
        if auth:
            arc_key = generate("rsa", 2048)
            key_path = workdir / "arc.pem"
            key_path.write_bytes(arc_key.private_pem)
            key_path.chmod(0o600)
            self.arc_record = arc_key.record()
            doc["auth"] = {"enabled": True}
            doc["arc"] = {
                "enabled": True,
                "domain": "relay.bench.test",
                "selector": "arc",
                "private_key": str(key_path),
            }
        for item in overrides:
            section, key, value = parse_override(item)
            doc.setdefault(section, {})[key] = value
        self.config_path = workdir / "relay.toml"
        write_config(self.config_path, doc)
        self.log_path = workdir / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.workdir),
                env=env,
            )
        try:
            wait_port(self.host, self.port, timeout=30)
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in reversed(self.pids()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""
