"""A throwaway PostgreSQL cluster for the tests: Debian's binaries, ``initdb`` into a temp
dir as an unprivileged user (``postgres`` when the tests run as root), ``pg_ctl`` on a Unix
socket in that dir, and TLS on a free TCP port of 127.0.0.1 with a test CA's certificate
(``tls_url``), password authentication (scram-sha-256) so the relay's password path is
the one used, stopped and removed at the end. If it cannot start, the test fails and
says why (never a skip)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

PASSWORD = "relay-test-" + secrets.token_hex(8)
SUPERUSER = "relay"


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb"
            " (scripts/debian-packages installs the Debian package postgresql)"
        )
    return Path(found[-1]).parent


@dataclass
class PgCluster:
    root: Path
    bindir: Path
    user: str | None  # run the server as this user (we are root), else as ourselves
    port: int = 5432  # the TCP port on 127.0.0.1 (TLS), which also names the Unix socket

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / "sock"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({res.returncode}): {res.stderr.strip()}"
                f" {res.stdout.strip()[-400:]}"
            )
        return res

    def start(self) -> None:
        self.sockdir.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        tls = self._write_tls()
        if self.user is not None:
            info = pwd.getpwnam(self.user)
            for p in (self.root, self.sockdir, pwfile, *tls):
                os.chown(p, info.pw_uid, info.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            "--pwfile",
            str(pwfile),
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",  # a throwaway cluster; the relay's own commits still fsync
        )
        opts = (
            f"-c listen_addresses='127.0.0.1' -c port={self.port}"
            f" -c unix_socket_directories='{self.sockdir}'"
            f" -c ssl=on -c ssl_cert_file='{tls[0]}' -c ssl_key_file='{tls[1]}'"
            " -c max_connections=100 -c fsync=on -c synchronous_commit=on"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "30",
            "start",
        )

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-m",
                "immediate",
                "-w",
                "stop",
            )

    def restart(self) -> None:
        """Stop the server the hard way (``-m immediate``: every connection cut, as a crash
        or a failover does) and start it again with the same options."""
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "log"),
            "-m",
            "immediate",
            "-w",
            "-t",
            "30",
            "restart",
        )

    def _write_tls(self) -> tuple[Path, Path]:
        """A test CA's certificate for 127.0.0.1 and localhost (trustme): the server's
        certificate and key; the CA's certificate in ca.pem, for ``tls_url``."""
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        crt, key = self.root / "server.crt", self.root / "server.key"
        cert.cert_chain_pems[0].write_to_path(str(crt))
        cert.private_key_pem.write_to_path(str(key))
        os.chmod(key, 0o600)
        ca.cert_pem.write_to_path(str(self.root / "ca.pem"))
        return crt, key

    def url(self, database: str = "postgres") -> str:
        """The relay's storage.url for a database of this cluster (password not in it):
        the Unix socket."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.sockdir}&port={self.port}"

    def tls_url(self, database: str, ca: Path | None = None) -> str:
        """The same database over TCP on 127.0.0.1 with TLS, the server's certificate
        verified against ``ca`` (default: the CA that issued it) and its name."""
        return (
            f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"
            f"?sslmode=verify-full&sslrootcert={ca or self.root / 'ca.pem'}"
        )

    def log_tail(self) -> str:
        try:
            return (self.root / "log").read_text()[-2000:]
        except OSError:
            return ""

    def psql(self, sql: str, database: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        res = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h",
                str(self.sockdir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-Atc",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"psql: {res.stderr.strip()}")
        return res.stdout

    def create_database(self) -> str:
        name = "t_" + secrets.token_hex(6)
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return name


def start_cluster() -> PgCluster:
    """Start a cluster; raise RuntimeError naming the reason when it cannot."""
    bindir = _bindir()
    user: str | None = None
    if os.geteuid() == 0:  # initdb refuses root: run the server as postgres (or nobody)
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            user = name
            break
        if user is None or shutil.which("runuser") is None:
            raise RuntimeError("running as root and no unprivileged user/runuser to run PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    os.chmod(root, 0o755)
    cluster = PgCluster(root, bindir, user, _free_port())
    try:
        cluster.start()
    except Exception as exc:
        tail = cluster.log_tail()
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"cannot start PostgreSQL: {exc} {tail}") from exc
    return cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remove_cluster(cluster: PgCluster) -> None:
    try:
        cluster.stop()
    finally:
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        cluster = start_cluster()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        remove_cluster(cluster)


@pytest.fixture
def pg_url(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database's storage.url, with RELAY_DB_PASSWORD set for it."""
    monkeypatch.setenv("RELAY_DB_PASSWORD", PASSWORD)
    return pg_cluster.url(pg_cluster.create_database())
