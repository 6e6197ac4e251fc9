"""A validating unbound on loopback in front of the lab's signed zones.

``ValidatingResolver`` writes an unbound.conf in a temporary directory (its own trust
anchors, the lab zones as stub zones pointing at a SignedAuthServer, no root anchor, so
names outside the signed zones are insecure), starts ``unbound -d`` on a free loopback
port, waits until it answers, and stops it (SIGTERM, then SIGKILL) on exit. The relay,
``relay dane check`` and Postfix all point at ``.address``.

Needs Debian's ``unbound`` package (``UNBOUND_PACKAGE``); ``missing()`` says so.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from relay.lab.signedzone import SignedAuthServer, SignedZone

UNBOUND = "/usr/sbin/unbound"
UNBOUND_PACKAGE = "unbound"


def missing() -> str:
    """ "" when unbound is installed, else the Debian package to install."""
    return "" if (shutil.which("unbound") or Path(UNBOUND).exists()) else UNBOUND_PACKAGE


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind((host, 0))
        port = int(u.getsockname()[1])
    return port


class ValidatingResolver:
    """unbound validating the lab zones (served by a SignedAuthServer it starts)."""

    def __init__(self, zones: Sequence[SignedZone], host: str = "127.0.0.1", port: int = 0) -> None:
        self.zones = list(zones)
        for z in self.zones:
            if z.zone is None:
                z.build()
        self.host = host
        self.auth = SignedAuthServer(self.zones, host)
        self.fixed_port = port  # 0: a free one
        self.port = port
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def config_text(self, directory: Path) -> str:
        lines = [
            "server:",
            f"  interface: {self.host}",
            f"  port: {self.port}",
            "  do-daemonize: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{directory}"',
            f'  pidfile: "{directory}/unbound.pid"',
            "  use-syslog: no",
            f'  logfile: "{directory}/unbound.log"',
            "  verbosity: 1",
            "  val-log-level: 2",
            "  do-ip6: no",
            "  do-not-query-localhost: no",  # the stub zones are on loopback
            "  qname-minimisation: no",
            '  module-config: "validator iterator"',
            "  ede: yes",  # RFC 8914 extended errors: relay tells bogus from SERVFAIL
            "  access-control: 127.0.0.0/8 allow",
            "  num-threads: 1",
            "  so-reuseport: no",
            '  local-zone: "test." nodefault',  # RFC 6761 names are the lab's
        ]
        lines += [f'  trust-anchor: "{z.trust_anchor}"' for z in self.zones if z.signed]
        lines += ["remote-control:", "  control-enable: no"]
        for z in self.zones:
            lines += [
                "stub-zone:",
                f'  name: "{z.origin}"',
                f"  stub-addr: {self.host}@{self.auth.port}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> ValidatingResolver:
        if missing():
            raise RuntimeError(f"unbound is not installed (apt-get install {UNBOUND_PACKAGE})")
        self.auth.start()
        self._tmp = tempfile.TemporaryDirectory(prefix="relay-unbound-")
        directory = Path(self._tmp.name)
        last = ""
        for _attempt in range(5):
            self.port = self.fixed_port or _free_port(self.host)
            conf = directory / "unbound.conf"
            conf.write_text(self.config_text(directory))
            self._proc = subprocess.Popen(
                [UNBOUND, "-d", "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if self._answers():
                    return self
                time.sleep(0.05)
            last = self._log(directory)
            self._kill()
        self.stop()
        raise RuntimeError(f"unbound did not start: {last[-2000:]}")

    def _log(self, directory: Path) -> str:
        err = b""
        if (
            self._proc is not None
            and self._proc.stderr is not None
            and self._proc.poll() is not None
        ):
            err = self._proc.stderr.read() or b""
        log = directory / "unbound.log"
        return err.decode(errors="replace") + (
            log.read_text(errors="replace") if log.exists() else ""
        )

    def _answers(self) -> bool:
        origin = self.zones[0].origin if self.zones else "."
        try:
            q = dns.message.make_query(origin.rstrip(".") + ".", "SOA")
            r = dns.query.udp(q, self.host, port=self.port, timeout=0.3)
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return r.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL)

    def log_text(self) -> str:
        if self._tmp is None:
            return ""
        log = Path(self._tmp.name) / "unbound.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        if proc.stderr is not None:
            proc.stderr.close()

    def stop(self) -> None:
        self._kill()
        try:
            self.auth.stop()
        except Exception:  # noqa: BLE001 - stopped already
            pass
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ValidatingResolver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
