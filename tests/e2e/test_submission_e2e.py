"""Authenticated submission end to end: a real ``relay serve`` (its own process) with
``[submission]`` listeners, users added with ``relay user add`` (password on stdin),
swaks (the Debian package) as the mail client over STARTTLS on the submission port and
over implicit TLS, the lab DNS server and a sink MX on 127.0.0.2 receiving what the
relay sends on. No address is trusted: relaying is granted by AUTH alone."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from relay.lab.dnsserver import LabDnsServer, Zone
from relay.lab.mta import LabMta
from tests.e2e.test_crash import free_port, wait_listening
from tests.labutil import base_doc, write_config

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-Pa55word"
ROOT = Path(__file__).parent.parent.parent


@dataclass
class Relay:
    tmp: Path
    config: Path
    log: Path
    smtp: int
    submission: int
    smtps: int
    mx: LabMta

    async def swaks(self, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            "swaks",
            "--server",
            "127.0.0.1",
            "--ehlo",
            "laptop.example.org",
            "--timeout",
            "20",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")

    def user(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay", "user", *args, "--config", str(self.config)],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )


@pytest.fixture
async def relay(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Relay]:
    workers = int(getattr(request, "param", 1))
    ca = trustme.CA()
    cert = ca.issue_cert("relay.lab.test", "127.0.0.1")
    pem = tmp_path / "relay.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    mx_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.remote.test").configure_cert(mx_ctx)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    zone = Zone()
    zone.add("remote.test", "MX", (10, "mx.remote.test"))
    zone.add("mx.remote.test", "A", "127.0.0.2")
    with LabDnsServer(zone) as dns:
        async with LabMta("127.0.0.2", 0, tls_context=mx_ctx, hostname="mx.remote.test") as mx:
            ports = [free_port() for _ in range(3)]
            doc = base_doc(tmp_path, dns.address, mx.port)
            doc["server"].update(
                {
                    "listen": [f"127.0.0.1:{ports[0]}"],
                    "tls_cert": str(pem),
                    "tls_key": str(pem),
                    "workers": workers,
                }
            )
            doc["relay"]["trusted_networks"] = ["192.0.2.0/24"]  # not us: AUTH or nothing
            doc["delivery"]["ca_file"] = str(tmp_path / "ca.pem")
            doc["logging"].update({"level": "info", "format": "json"})
            doc["submission"] = {
                "listen": [f"127.0.0.1:{ports[1]}"],
                "implicit_tls_listen": [f"127.0.0.1:{ports[2]}"],
                "max_failures": 3,
                "lockout": 120,
                "failure_delay": 0.1,
                "users": {
                    "alice@example.org": {"senders": ["alice@example.org", "*@dept.example.org"]}
                },
            }
            config = tmp_path / "config.toml"
            write_config(config, doc)
            log = tmp_path / "relay.log"
            r = Relay(tmp_path, config, log, *ports, mx=mx)
            added = r.user("add", "alice@example.org", stdin=PASSWORD + "\n")
            assert added.returncode == 0, added.stderr
            proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(config)],
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            try:
                await wait_listening(ports[1])
                yield r
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            assert PASSWORD not in log.read_text(errors="replace")  # never logged


def auth(user: str, password: str) -> list[str]:
    return ["--auth", "PLAIN", "--auth-user", user, "--auth-password", password]


def mail(frm: str = "alice@example.org", to: str = "bob@remote.test") -> list[str]:
    return ["--from", frm, "--to", to, "--header", "Subject: submitted"]


async def test_starttls_submission_reaches_the_sink_with_esmtpsa(relay: Relay) -> None:
    # before STARTTLS the EHLO does not list AUTH; after it, it does
    code, out = await relay.swaks("--port", str(relay.submission), "--quit-after", "EHLO")
    assert code == 0, out
    assert "<-  250 STARTTLS" in out and "AUTH" not in out, out
    code, out = await relay.swaks("--port", str(relay.submission), "--tls", "--quit-after", "EHLO")
    assert code == 0 and "250 AUTH PLAIN LOGIN" in out, out
    # AUTH in clear is refused by swaks itself: the server never offered it
    code, out = await relay.swaks(
        "--port", str(relay.submission), *auth("alice@example.org", PASSWORD), *mail()
    )
    assert code != 0 and " -> AUTH" not in out and "235" not in out, out
    assert "did not advertise" in out.lower() or "not advertise" in out.lower(), out
    code, out = await relay.swaks(
        "--port",
        str(relay.submission),
        "--tls",
        *auth("alice@example.org", PASSWORD),
        *mail(),
    )
    assert code == 0, out
    assert "<~  235 2.7.0 Authentication successful" in out, out
    [got] = await relay.mx.wait_for(1, timeout=20)
    assert got.rcpt_tos == ("bob@remote.test",) and got.mail_from == "alice@example.org"
    received = got.data.split(b"\r\n\t(using")[0].decode()
    assert received.startswith("Received: from laptop.example.org ([127.0.0.1])\r\n")
    assert "(authenticated user alice@example.org)" in received
    assert b"with ESMTPSA id " in got.data
    log = relay.log.read_text()
    assert '"event": "smtp_auth"' in log and '"result": "pass"' in log
    assert '"auth_user": "alice@example.org"' in log  # the queued line names the user


@pytest.mark.parametrize("relay", [1, 2], indirect=True, ids=["one-process", "two-workers"])
async def test_implicit_tls_submission(relay: Relay) -> None:
    """Also with two worker processes sharing the three listening sockets."""
    code, out = await relay.swaks(
        "--port",
        str(relay.smtps),
        "--tlsc",
        *auth("alice@example.org", PASSWORD),
        *mail(frm="team@dept.example.org", to="carol@remote.test"),
    )
    assert code == 0, out
    assert "STARTTLS" not in out and "250 AUTH PLAIN LOGIN" in out
    [got] = await relay.mx.wait_for(1, timeout=20)
    assert got.mail_from == "team@dept.example.org"
    assert b"(authenticated user alice@example.org)" in got.data
    assert b"with ESMTPSA id " in got.data


async def test_wrong_password_lockout_and_forbidden_sender(relay: Relay) -> None:
    port = ["--port", str(relay.submission), "--tls"]
    # a sender the user may not use: 553 at MAIL
    code, out = await relay.swaks(
        *port, *auth("alice@example.org", PASSWORD), *mail(frm="ceo@example.org")
    )
    assert code != 0 and "<~* 553 5.7.1 <ceo@example.org>: Sender address rejected" in out, out
    # wrong passwords: 535, then past the threshold 454 even with the right one
    for _ in range(3):
        code, out = await relay.swaks(*port, *auth("alice@example.org", "wrong"), *mail())
        assert code != 0 and "<~* 535 5.7.8 Error: authentication failed" in out, out
    code, out = await relay.swaks(*port, *auth("alice@example.org", PASSWORD), *mail())
    assert code != 0 and "<~* 454 4.7.0 Too many failed attempts, try later" in out, out
    # no message got through
    await asyncio.sleep(0.5)
    assert relay.mx.messages == []
    log = relay.log.read_text()
    assert '"result": "fail"' in log and "smtp_auth_locked" in log
    # port 25 offers no AUTH at all, even after STARTTLS
    code, out = await relay.swaks("--port", str(relay.smtp), "--tls", "--quit-after", "EHLO")
    assert code == 0 and "AUTH" not in out.split("STARTTLS", 1)[1], out


async def test_relay_user_commands(relay: Relay) -> None:
    listed = relay.user("list", "--json")
    assert listed.returncode == 0
    assert '"user": "alice@example.org"' in listed.stdout
    assert relay.user("add", "bob@example.org", stdin="short\n").returncode == 2
    assert relay.user("add", "bob@example.org", stdin="bob-long-password\n").returncode == 0
    users_file = relay.tmp / "submission-users"
    assert oct(users_file.stat().st_mode & 0o777) == "0o600"
    assert "bob-long-password" not in users_file.read_text()
    # the running relay reads the file again: bob can send at once, as himself
    code, out = await relay.swaks(
        "--port",
        str(relay.submission),
        "--tls",
        *auth("bob@example.org", "bob-long-password"),
        *mail(frm="bob@example.org", to="dave@remote.test"),
    )
    assert code == 0, out
    await relay.mx.wait_for(1, timeout=20)
    assert relay.user("remove", "bob@example.org").returncode == 0
    assert relay.user("remove", "bob@example.org").returncode == 1
    code, out = await relay.swaks(
        "--port",
        str(relay.submission),
        "--tls",
        *auth("bob@example.org", "bob-long-password"),
        *mail(frm="bob@example.org"),
    )
    assert "<~* 535 5.7.8" in out, out
