"""A throwaway pgbouncer in front of the test cluster: Debian's ``pgbouncer`` package, run
as the cluster's user (it refuses root), in **transaction pooling** mode with a small
server pool (so consecutive transactions of one client land on different server
connections, as in production), a Unix socket in a temp dir only, SCRAM to the client and
to the server. ``pgb_urls`` gives a fresh database's URL through the pooler and its direct
URL. If pgbouncer cannot start, the test fails and says why (never a skip)."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pg.pgcluster import PASSWORD, SUPERUSER, PgCluster

SERVER_POOL = 3  # server connections per database and user: fewer than the clients


@dataclass
class Bouncer:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.root}&port={self.port}"

    def log_tail(self) -> str:
        try:
            return (self.root / "log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_bouncer(cluster: PgCluster) -> Bouncer:
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(exe):
        raise RuntimeError(
            "pgbouncer is not installed (scripts/debian-packages installs the Debian package)"
        )
    root = Path(tempfile.mkdtemp(prefix="relay-pgb-"))
    os.chmod(root, 0o755)
    port = random.randint(20000, 60000)  # names the socket only: no TCP listener
    (root / "users.txt").write_text(f'"{SUPERUSER}" "{PASSWORD}"\n')
    (root / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={cluster.sockdir} port={cluster.port}\n"
        "[pgbouncer]\n"
        "listen_addr =\n"
        f"listen_port = {port}\n"
        f"unix_socket_dir = {root}\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {root}/users.txt\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {SERVER_POOL}\n"
        "max_client_conn = 400\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {root}/log\n"
    )
    cmd = [exe, str(root / "pgbouncer.ini")]
    if cluster.user is not None:
        info = pwd.getpwnam(cluster.user)
        for p in (root, root / "users.txt", root / "pgbouncer.ini"):
            os.chown(p, info.pw_uid, info.pw_gid)
        cmd = ["runuser", "-u", cluster.user, "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bouncer = Bouncer(root, port, proc)
    deadline = time.monotonic() + 15
    while not (root / f".s.PGSQL.{port}").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            tail = bouncer.log_tail()
            bouncer.stop()
            raise RuntimeError(f"cannot start pgbouncer: {err.strip()} {tail}")
        time.sleep(0.05)
    return bouncer


@pytest.fixture(scope="session")
def pg_bouncer(pg_cluster: PgCluster) -> Iterator[Bouncer]:
    try:
        bouncer = start_bouncer(pg_cluster)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pgb_urls(
    pg_cluster: PgCluster, pg_bouncer: Bouncer, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """(through pgbouncer, direct) URLs of a fresh database; RELAY_DB_PASSWORD set."""
    monkeypatch.setenv("RELAY_DB_PASSWORD", PASSWORD)
    db = pg_cluster.create_database()
    return pg_bouncer.url(db), pg_cluster.url(db)
