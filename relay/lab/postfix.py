"""A private Postfix instance (Debian's postfix package) for interop tests and the benchmark.

Everything lives in one temporary directory: ``etc/`` (main.cf, master.cf), ``queue/``
(queue_directory), ``data/`` (data_directory) and ``maillog`` (maillog_file, written by
the ``postlog`` service, Postfix >= 3.4). No system file is touched, no syslog is needed
and several instances run side by side. The instance listens with ``smtpd`` on one
loopback address and port and sends ALL mail (transport_maps ``static:``) to one next
hop ``[ip]:port`` over SMTP with DNS lookups disabled. Postfix fsyncs each queue file
before its 250 to DATA (its default); nothing here changes that.

Sandbox notes (why the config looks the way it does):
- ``chroot = n`` on every service: a chroot would need copies of /etc/services,
  resolv.conf and the libraries inside the queue directory.
- ``smtpd_peername_lookup = no`` and ``smtp_dns_support_level = disabled``: the machine
  has no reachable DNS server, and reverse lookups of 127.0.0.x would wait for timeouts.
- ``inet_protocols = ipv4``: there may be no IPv6 loopback.
- The temporary directory is made 0755 so that daemons running as ``mail_owner`` can
  reach the queue and data directories; the queue directory is owned by root, and
  ``postfix start`` (post-install create-missing) creates its subdirectories.
- Root is needed (``postfix start`` is a root command; the daemons drop to the
  ``postfix`` user and the ``postdrop`` group that the Debian package creates).
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"


class PostfixError(RuntimeError):
    """Postfix could not be configured, checked, started or stopped."""


def available() -> bool:
    """True when the Postfix binaries are installed and we can run them (root)."""
    return os.path.exists(POSTFIX) and os.path.exists(POSTCONF) and os.geteuid() == 0


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise PostfixError(f"nothing listening on {host}:{port} after {timeout}s: {last}")


@dataclass(frozen=True)
class PostfixSpec:
    """What one instance does: listen on ``listen``, relay everything to ``nexthop``."""

    listen: tuple[str, int]
    nexthop: tuple[str, int]
    hostname: str = "postfix.lab.test"
    relay_domains: tuple[str, ...] = ()  # besides mynetworks clients, who may relay
    mynetworks: tuple[str, ...] = ("127.0.0.0/8",)
    tls_cert: Path | None = None  # smtpd STARTTLS (PEM chain) when set
    tls_key: Path | None = None
    smtp_tls_security_level: str = "may"  # outbound: none | may | encrypt ...
    smtp_tls_ca_file: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)  # more main.cf settings
    # resolv.conf for the instance's own resolver (DANE interop: a lab unbound), put in
    # place with a private mount namespace around ``postfix start``; None: the system's
    resolv_conf: Path | None = None


_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """One private Postfix: ``start()`` / ``stop()`` (or a ``with`` block)."""

    def __init__(self, spec: PostfixSpec, base_dir: Path | None = None, name: str = "pf") -> None:
        self.spec = spec
        self.name = name
        self._own_base = base_dir is None
        self.base = Path(tempfile.mkdtemp(prefix=f"{name}-")) if base_dir is None else base_dir
        self.config_dir = self.base / "etc"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.maillog = self.base / "maillog"
        self.running = False

    # ------------------------------------------------------------ configuration

    def main_cf(self) -> dict[str, str]:
        s = self.spec
        host, port = s.nexthop
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": s.hostname,
            "mydomain": "lab.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": ", ".join(s.relay_domains),
            "mynetworks": ", ".join(s.mynetworks),
            # Postfix only accepts addresses of a real interface here, and lo has only
            # 127.0.0.1; master.cf binds smtpd to the chosen 127.0.0.x explicitly. This is
            # also the set of "own" addresses for the SMTP client's loop check, so a next
            # hop must not be 127.0.0.1.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "smtp_bind_address": "",
            "transport_maps": f"static:smtp:[{host}]:{port}",
            "relayhost": f"[{host}]:{port}",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": s.smtp_tls_security_level,
            "smtp_tls_loglevel": "1",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            "syslog_name": f"postfix-{self.name}",
            "biff": "no",
            "smtputf8_enable": "yes",
            "message_size_limit": "26214400",
            "smtpd_banner": "$myhostname ESMTP",
            "notify_classes": "",
            # A test or benchmark instance must not hold mail for minutes after one failed
            # attempt: retry soon.
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "30s",
        }
        if s.tls_cert is not None and s.tls_key is not None:
            cf["smtpd_tls_cert_file"] = str(s.tls_cert)
            cf["smtpd_tls_key_file"] = str(s.tls_key)
            cf["smtpd_tls_security_level"] = "may"
        else:
            cf["smtpd_tls_security_level"] = "none"
        if s.smtp_tls_ca_file is not None:
            cf["smtp_tls_CAfile"] = str(s.smtp_tls_ca_file)
        cf.update(s.extra)
        return cf

    def master_cf(self) -> str:
        host, port = self.spec.listen
        return f"{host}:{port}  inet  n       -       n       -       -       smtpd\n" + _SERVICES

    def write_config(self) -> None:
        os.chmod(self.base, 0o755)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.queue_dir, 0o755)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        os.chmod(self.data_dir, 0o700)
        lines = [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self.master_cf())
        self.maillog.touch()

    # ------------------------------------------------------------ life cycle

    def _postfix(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``postfix -c DIR ARGS``; return (exit code, what it printed).

        Postfix commands print their errors only when stderr is a terminal (else they go
        to syslog, which this sandbox lacks), so stderr is a pseudo-terminal here."""
        env = dict(os.environ)
        env.pop("MAIL_CONFIG", None)
        master, slave = pty.openpty()
        try:
            cmd = [POSTFIX, "-c", str(self.config_dir), *args]
            if args[:1] == ("start",) and self.spec.resolv_conf is not None:
                # master and its children live in this mount namespace, where
                # /etc/resolv.conf is the lab's; nothing outside sees it
                shell = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
                cmd = ["unshare", "-m", "sh", "-c", shell, str(self.spec.resolv_conf), *cmd]
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=slave,
                env=env,
                start_new_session=True,
            )
            os.close(slave)
            slave = -1
            chunks: list[bytes] = []
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    raise PostfixError(f"postfix {' '.join(args)}: no answer in {timeout}s")
                ready, _, _ = select.select([master], [], [], min(left, 0.5))
                if ready:
                    try:
                        data = os.read(master, 4096)
                    except OSError:  # EIO: every writer closed the terminal
                        data = b""
                    if not data:
                        break
                    chunks.append(data)
                elif proc.poll() is not None:
                    break
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").strip()
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)

    def check(self) -> None:
        """``postfix check``: fail loudly on a configuration or permission problem."""
        code, out = self._postfix("check")
        if code != 0:
            raise PostfixError(f"postfix check failed ({code}): {out}")

    def start(self, timeout: float = 20.0) -> PostfixInstance:
        """Write the configuration, check it, start master, wait for the smtpd port."""
        self.write_config()
        # check also creates the queue subdirectories (post-install create-missing).
        self.check()
        code, out = self._postfix("start")
        if code != 0:
            self._kill_leftovers()
            raise PostfixError(f"postfix start failed ({code}): {out}\n{self.log_text()}")
        self.running = True
        try:
            wait_port(self.spec.listen[0], self.spec.listen[1], timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """``postfix stop`` (master ends its children), then make sure nothing is left."""
        if not self.running:
            return
        self.running = False
        with contextlib.suppress(PostfixError):
            self._postfix("stop", timeout=30.0)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            for p in [*descendants(pid), pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, 9)

    def cleanup(self) -> None:
        """Stop and remove the temporary directory (when this object made it)."""
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------ inspection

    def master_pid(self) -> int | None:
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text().strip()
            return int(text)
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        """master and every process below it (smtpd, cleanup, qmgr, smtp, ...)."""
        pid = self.master_pid()
        if pid is None or not _alive(pid):
            return []
        return [pid, *descendants(pid)]

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def queue_count(self) -> int:
        """Queue files not yet delivered (incoming, active, deferred, hold, maildrop)."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            d = self.queue_dir / sub
            if d.is_dir():
                for _root, _dirs, files in os.walk(d):
                    n += len(files)
        return n


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process now (from /proc)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    kids = children_map()
    out: list[int] = []
    todo = list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out
