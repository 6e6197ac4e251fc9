"""The peer a self-hoster deploys instead: Postfix with rspamd as its milter.

rspamd (Debian's package) runs from a private configuration written here, with its
runtime, database and log directories under one temporary directory; /etc/rspamd and any
system service are not touched (no systemd). One process tree: ``rspamd -f`` (main), its
``rspamd_proxy`` workers in milter mode with ``self_scan`` (they scan in process, no
separate normal worker) and the hs_helper. The work it does is the relay's ``--auth``
work and nothing else:

- ``spf``, ``dkim`` (verification; the C module) and ``dmarc``, checked for local and
  authenticated senders too (the load comes from 127.0.0.x, like the relay's);
- ``arc``: validation, and sealing of every message as ``d=rspamd.bench.test s=arc``
  with a fresh RSA-2048 key whose record the bench publishes in its lab DNS;
- ``milter_headers`` with the ``authentication-results`` routine (one A-R header);
- no other module (no regexp rules, no statistics, no RBLs: the relay does none of that),
  no redis (nothing configured needs it: no DMARC reports, no keys in redis, no history),
  and every action threshold out of reach (nothing is rejected, greylisted or tagged).

DNS goes through a caching forwarder (bench/dnscache.py, its own process: the local
resolver rspamd is deployed with; the relay caches in process) to the bench's lab DNS
server (``options { dns { nameserver } }``), so rspamd finds the same SPF, DKIM and DMARC
records as the relay does.

The Postfix under test is the bare baseline's instance (bench/postfix.py) with
``smtpd_milters = inet:ADDR`` and ``milter_default_action = tempfail``: a milter that
fails or times out shows as refused mail, not as mail that silently skipped the work.
CPU and memory are those of all three (Postfix's tree, rspamd's tree, the forwarder).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.postfix import PostfixSystem
from bench.procstat import tree
from relay.commands.keygen import generate
from relay.lab.postfix import PostfixError, free_port

RSPAMD = "/usr/bin/rspamd"
RSPAMD_USER = "_rspamd"
SEAL_DOMAIN = "rspamd.bench.test"
SEAL_SELECTOR = "arc"


def available() -> bool:
    """True when Debian's rspamd is installed (and its user exists)."""
    if not os.path.exists(RSPAMD):
        return False
    try:
        pwd.getpwnam(RSPAMD_USER)
    except KeyError:
        return False
    return True


def rspamd_conf(base: Path, bind: tuple[str, int], dns: str, key: Path, workers: int) -> str:
    """The whole rspamd.conf (UCL) of the bench instance."""
    host, port = bind
    return f"""\
# bench/rspamdsys.py: rspamd as Postfix's milter doing the relay's --auth work only.
options {{
  pidfile = "{base}/run/rspamd.pid";
  filters = "dkim";                 # C modules: DKIM verification only
  check_local = true;               # the bench's clients are on 127.0.0.x
  check_authed = true;
  local_addrs = [];
  dns {{
    nameserver = ["{dns}"];
    timeout = 2s;
    retransmits = 2;
  }}
  task_timeout = 20s;
  tempdir = "{base}/tmp";
  control_socket = "{base}/run/rspamd.sock mode=0600";
  hs_cache_dir = "{base}/db/";
  cache_file = "{base}/db/symbols.cache";
  explicit_modules = [];
}}
logging {{
  type = "file";
  filename = "{base}/log/rspamd.log";
  level = "warning";
}}
modules {{
  path = "${{PLUGINSDIR}}";
}}
# No reject, no greylist, no header tagging: thresholds nothing reaches.
actions {{
  reject = 100000;
  add_header = 99999;
  greylist = 99998;
}}
spf {{
  check_local = true;
  check_authed = true;
}}
dkim {{
  check_local = true;
  check_authed = true;
}}
dmarc {{
}}
arc {{
  sign_local = true;
  sign_inbound = true;
  sign_authenticated = true;
  allow_hdrfrom_mismatch = true;
  allow_envfrom_empty = true;
  use_domain = "{SEAL_DOMAIN}";
  use_esld = false;
  use_redis = false;
  selector = "{SEAL_SELECTOR}";
  path = "{key}";
}}
milter_headers {{
  use = ["authentication-results"];
  skip_local = false;               # else no header for mail from 127.0.0.x
  skip_authenticated = false;
}}
worker "rspamd_proxy" {{
  bind_socket = "{host}:{port}";
  milter = yes;
  timeout = 120s;
  count = {workers};
  upstream "local" {{
    default = yes;
    self_scan = yes;                # scan in the proxy itself, no normal worker
  }}
}}
"""


class DnsCache:
    """bench/dnscache.py as a subprocess on ``host`` (a free port), asking ``upstream``."""

    def __init__(self, host: str, upstream: str) -> None:
        self.host = host
        self.port = free_port(host)
        self.upstream = upstream
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        script = Path(__file__).resolve().parent / "dnscache.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--listen", self.address, "--upstream", self.upstream],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            self.stop()
            raise PostfixError(f"DNS cache did not start on {self.address}: {err[-1000:]}")

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Rspamd:
    """One private rspamd: ``start()`` waits until its milter port answers."""

    def __init__(self, host: str, dns: str, workers: int) -> None:
        self.host = host
        self.port = free_port(host)
        self.dns = dns
        self.workers = workers
        self.base = Path(tempfile.mkdtemp(prefix="bench-rspamd-"))
        self.base.chmod(0o755)
        arc_key = generate("rsa", 2048)
        self.key_path = self.base / "arc.key"
        self.key_path.write_bytes(arc_key.private_pem)
        self.arc_record = arc_key.record()
        self.conf = self.base / "rspamd.conf"
        self.log_path = self.base / "log" / "rspamd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self) -> None:
        for sub in ("run", "db", "log", "tmp"):
            d = self.base / sub
            d.mkdir(exist_ok=True)
            shutil.chown(d, RSPAMD_USER, RSPAMD_USER)
        shutil.chown(self.key_path, RSPAMD_USER, RSPAMD_USER)
        self.key_path.chmod(0o600)
        self.conf.write_text(
            rspamd_conf(self.base, (self.host, self.port), self.dns, self.key_path, self.workers)
        )

    def start(self, timeout: float = 90.0) -> None:
        """Start ``rspamd -f`` and wait for the proxy workers to listen (loading the
        language and TLD data takes 10-20 s on a busy 2-core machine)."""
        self.write()
        cmd = [RSPAMD, "-f", "-u", RSPAMD_USER, "-g", RSPAMD_USER, "-c", str(self.conf)]
        cmd += [f"--var={v}={self.base / d}" for v, d in (("DBDIR", "db"), ("RUNDIR", "run"))]
        cmd += [f"--var=LOGDIR={self.base / 'log'}"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "stderr.log", "wb"),  # noqa: SIM115 - closed with proc
            stdin=subprocess.DEVNULL,
            cwd=str(self.base),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PostfixError(f"rspamd exited {self.proc.returncode}:\n{self.log_tail()}")
            if self._listening():
                return
            time.sleep(0.2)
        self.stop()
        raise PostfixError(f"rspamd not listening on {self.host}:{self.port}:\n{self.log_tail()}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    for pid in reversed(self.pids()):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    self.proc.wait()
            self.proc = None
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, n: int = 3000) -> str:
        text = ""
        for path in (self.log_path, self.base / "stderr.log"):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return text[-n:]


class PostfixRspamdSystem:
    """Postfix (the baseline's instance) with rspamd as its only milter."""

    name = "postfix+rspamd"

    def __init__(
        self,
        host: str,
        milter_host: str,
        sink: tuple[str, int],
        dns: str,
        extra: dict[str, str],
        *,
        workers: int,
        probe: tuple[str, int] | None = None,
    ) -> None:
        self.dns_cache = DnsCache(milter_host, dns)
        self.rspamd = Rspamd(milter_host, self.dns_cache.address, workers)
        milter = {
            "smtpd_milters": f"inet:{milter_host}:{self.rspamd.port}",
            "non_smtpd_milters": "",
            "milter_protocol": "6",
            "milter_default_action": "tempfail",
            **extra,
        }
        self.postfix = PostfixSystem(host, sink, milter, probe=probe, name="bench-postfix-rspamd")
        self.host = host
        self.port = self.postfix.port
        self.arc_record = self.rspamd.arc_record

    def start(self) -> None:
        self.dns_cache.start()
        try:
            self.rspamd.start()
            self.postfix.start()
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return self.postfix.pids() + self.rspamd.pids() + self.dns_cache.pids()

    def parts(self) -> dict[str, list[int]]:
        """The parts apart (CPU per message of each, in the report)."""
        return {
            "postfix": self.postfix.pids(),
            "rspamd": self.rspamd.pids(),
            "dns cache": self.dns_cache.pids(),
        }

    def stop(self) -> None:
        try:
            self.postfix.stop()
        finally:
            try:
                self.rspamd.stop()
            finally:
                self.dns_cache.stop()

    def log_tail(self, n: int = 2000) -> str:
        return (
            "--- postfix\n" + self.postfix.log_tail(n) + "\n--- rspamd\n" + self.rspamd.log_tail(n)
        )
