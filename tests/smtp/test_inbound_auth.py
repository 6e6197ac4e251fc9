"""AUTH on the submission listeners (RFC 4954, RFC 8314) over real loopback TLS:
offered only over TLS and only on submission listeners, MAIL needs AUTH, PLAIN and
LOGIN in every form, bad input answered, the lock-out and the sender check."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from argon2 import PasswordHasher

from relay.smtp.rules import RelayRules
from relay.smtp.server import SmtpServer
from relay.submission.service import Submission
from relay.submission.users import save
from tests.smtp.test_inbound_harness import MESSAGE, UNTRUSTED, RawClient, Recorder, make_config

FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
PASSWORD = "correct horse"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Sub:
    def __init__(self, server: SmtpServer, rec: Recorder) -> None:
        self.server = server
        self.rec = rec
        ports = [p for _, p in server.bound]
        self.smtp, self.submission, self.smtps = ports


@asynccontextmanager
async def running(tmp_path: Path, ca: trustme.CA, **submission: Any) -> AsyncIterator[Sub]:
    cert = ca.issue_cert("mx.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    save(
        tmp_path / "users",
        {"alice@example.org": FAST.hash(PASSWORD), "bob": FAST.hash("bob password")},
    )
    sub_cfg: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "implicit_tls_listen": ["127.0.0.1:0"],
        "users_file": str(tmp_path / "users"),
        "failure_delay": 0,
        "max_failures": 3,
        "users": {"bob": {"senders": ["*@example.com", "<>"]}},
        **submission,
    }
    pem = str(tmp_path / "cert.pem")
    config = make_config(tmp_path, server={"tls_cert": pem, "tls_key": pem}, submission=sub_cfg)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    rec = Recorder()
    server = SmtpServer(
        config,
        rec,
        RelayRules(config),
        ssl_context=ctx,
        free_space=lambda: 10**12,
        submission=Submission(config.submission),
    )
    await server.start()
    try:
        yield Sub(server, rec)
    finally:
        await server.stop(grace=0.5)


async def tls_client(
    port: int, ctx: ssl.SSLContext, source: str = UNTRUSTED, implicit: bool = False
) -> RawClient:
    c = await RawClient.connect(port, source)
    if implicit:
        c.reader, c.writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0), ssl=ctx, server_hostname="mx.test"
        )
    assert (await c.reply()).startswith("220 ")
    if not implicit:
        ehlo = await c.cmd("EHLO client.test")
        assert "STARTTLS" in ehlo and "AUTH" not in ehlo, ehlo
        assert (await c.cmd("STARTTLS")).startswith("220 ")
        await c.writer.start_tls(ctx, server_hostname="mx.test")
    ehlo = await c.cmd("EHLO client.test")
    assert "250 AUTH PLAIN LOGIN" in ehlo and "STARTTLS" not in ehlo, ehlo
    return c


async def test_587_offers_auth_only_after_starttls(
    tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext
) -> None:
    async with running(tmp_path, ca) as s:
        c = await RawClient.connect(s.submission, UNTRUSTED)
        await c.reply()
        ehlo = await c.cmd("EHLO client.test")
        assert "STARTTLS" in ehlo and "AUTH" not in ehlo
        assert "AUTH" not in await c.cmd("HELP")
        plain = b64(f"\0alice@example.org\0{PASSWORD}")
        assert (await c.cmd(f"AUTH PLAIN {plain}")).startswith("538 5.7.11 ")
        assert (await c.cmd("MAIL FROM:<alice@example.org>")) == (
            "530 5.7.0 Must issue a STARTTLS command first"
        )
        assert (await c.cmd("STARTTLS")).startswith("220 ")
        await c.writer.start_tls(client_ctx, server_hostname="mx.test")
        assert "250 AUTH PLAIN LOGIN" in await c.cmd("EHLO client.test")
        assert "AUTH" in await c.cmd("HELP")
        assert (await c.cmd("MAIL FROM:<alice@example.org>")) == (
            "530 5.7.0 Authentication required"
        )
        assert (await c.cmd(f"AUTH PLAIN {plain}")) == "235 2.7.0 Authentication successful"
        assert (await c.cmd(f"AUTH PLAIN {plain}")).startswith("503 5.5.1")  # once only
        # an untrusted address, yet relaying is allowed: the session is authenticated
        await c.start_mail(rcpt="bob@remote.test", sender="alice@example.org")
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")
        conn, env, _ = s.rec.calls[0]
        assert conn.auth_user == "alice@example.org" and not conn.trusted
        assert conn.tls_version in ("TLSv1.2", "TLSv1.3")
        assert env.rcpt_tos == ("bob@remote.test",)
        await c.close()


async def test_port_25_never_offers_auth(
    tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext
) -> None:
    async with running(tmp_path, ca) as s:
        c = await RawClient.connect(s.smtp, UNTRUSTED)
        await c.reply()
        await c.cmd("EHLO client.test")
        assert (await c.cmd("STARTTLS")).startswith("220 ")
        await c.writer.start_tls(client_ctx, server_hostname="mx.test")
        assert "AUTH" not in await c.cmd("EHLO client.test")
        plain = b64(f"\0alice@example.org\0{PASSWORD}")
        assert (await c.cmd(f"AUTH PLAIN {plain}")).startswith("503 5.5.1")
        # and an untrusted client still may not relay there
        assert (await c.cmd("MAIL FROM:<alice@example.org>")).startswith("250 ")
        assert (await c.cmd("RCPT TO:<bob@remote.test>")).startswith("554 5.7.1")
        await c.close()


async def test_plain_and_login_forms(
    tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext
) -> None:
    async with running(tmp_path, ca) as s:
        # PLAIN without an initial response: an empty 334 challenge
        c = await tls_client(s.submission, client_ctx)
        assert (await c.cmd("AUTH PLAIN")) == "334 "
        assert (await c.cmd(b64(f"\0alice@example.org\0{PASSWORD}"))).startswith("235 ")
        await c.close()
        # PLAIN with authzid equal to the authcid; user names are case-insensitive
        c = await tls_client(s.submission, client_ctx)
        resp = b64(f"alice@example.org\0Alice@Example.org\0{PASSWORD}")
        assert (await c.cmd(f"AUTH plain {resp}")).startswith("235 ")
        await c.close()
        # LOGIN, both challenges
        c = await tls_client(s.submission, client_ctx)
        assert (await c.cmd("AUTH LOGIN")) == "334 VXNlcm5hbWU6"
        assert (await c.cmd(b64("bob"))) == "334 UGFzc3dvcmQ6"
        assert (await c.cmd(b64("bob password"))).startswith("235 ")
        await c.close()
        # LOGIN with the user name as initial response
        c = await tls_client(s.submission, client_ctx)
        assert (await c.cmd(f"AUTH LOGIN {b64('bob')}")) == "334 UGFzc3dvcmQ6"
        assert (await c.cmd(b64("bob password"))).startswith("235 ")
        await c.close()


async def test_bad_exchanges_get_clear_replies(
    tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext
) -> None:
    async with running(tmp_path, ca, max_failures=50) as s:
        c = await tls_client(s.submission, client_ctx)
        assert (await c.cmd("AUTH CRAM-MD5")).startswith("504 5.5.4")
        assert (await c.cmd("AUTH PLAIN !!!")).startswith("501 5.5.2")
        assert (await c.cmd("AUTH PLAIN =")).startswith("501 5.5.2")  # empty: malformed
        assert (await c.cmd("AUTH PLAIN")) == "334 "
        assert (await c.cmd("*")) == "501 5.7.0 Authentication cancelled"
        assert (await c.cmd("AUTH LOGIN")).startswith("334 ")
        assert (await c.cmd("not-base64")).startswith("501 5.5.2")
        # acting as someone else (authzid) is not offered
        other = b64(f"bob\0alice@example.org\0{PASSWORD}")
        assert (await c.cmd(f"AUTH PLAIN {other}")).startswith("535 5.7.8")
        # AUTH inside a transaction
        bob = b64("\0bob\0bob password")
        assert (await c.cmd(f"AUTH PLAIN {bob}")).startswith("235 ")
        await c.close()
        c = await tls_client(s.submission, client_ctx)
        await c.cmd("AUTH PLAIN " + bob)
        assert (await c.cmd("MAIL FROM:<x@example.com>")).startswith("250 ")
        assert (await c.cmd("AUTH PLAIN " + bob)).startswith("503 5.5.1")
        await c.close()


async def test_wrong_password_then_lockout(
    tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext
) -> None:
    async with running(tmp_path, ca, max_failures=3, lockout=60, failure_delay=0.2) as s:
        c = await tls_client(s.submission, client_ctx)
        wrong = b64("\0alice@example.org\0wrong password")
        t0 = time.monotonic()
        assert (await c.cmd(f"AUTH PLAIN {wrong}")) == "535 5.7.8 Error: authentication failed"
        assert time.monotonic() - t0 >= 0.2  # the back-off before the answer
        unknown = b64("\0nobody@example.org\0whatever")
        assert (await c.cmd(f"AUTH PLAIN {unknown}")).startswith("535 5.7.8")  # same reply
        assert (await c.cmd(f"AUTH PLAIN {wrong}")).startswith("535 5.7.8")
        right = b64(f"\0alice@example.org\0{PASSWORD}")
        # the IP is locked now: even the right password is refused, temporarily
        reply = await c.cmd(f"AUTH PLAIN {right}")
        assert reply == "454 4.7.0 Too many failed attempts, try later"
        await c.close()
        # so is the user from another address (it had 2 failures; one more locks it)
        c = await tls_client(s.submission, client_ctx, source="127.0.0.3")
        assert (await c.cmd(f"AUTH PLAIN {wrong}")).startswith("535 ")
        await c.close()
        c = await tls_client(s.submission, client_ctx, source="127.0.0.4")
        assert (await c.cmd(f"AUTH PLAIN {right}")).startswith("454 4.7.0")
        # another user from a clean address is not affected
        assert (await c.cmd("AUTH PLAIN " + b64("\0bob\0bob password"))).startswith("235 ")
        await c.close()


async def test_sender_must_belong_to_the_user(
    tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext
) -> None:
    async with running(tmp_path, ca) as s:
        c = await tls_client(s.submission, client_ctx)
        await c.cmd("AUTH PLAIN " + b64(f"\0alice@example.org\0{PASSWORD}"))
        assert (await c.cmd("MAIL FROM:<mallory@example.org>")) == (
            "553 5.7.1 <mallory@example.org>: Sender address rejected: "
            "not owned by user alice@example.org"
        )
        assert (await c.cmd("MAIL FROM:<>")).startswith("553 5.7.1")  # no "<>" for alice
        assert (await c.cmd("MAIL FROM:<ALICE@example.org> AUTH=<>")).startswith("250 ")
        await c.close()
        c = await tls_client(s.submission, client_ctx)
        await c.cmd("AUTH PLAIN " + b64("\0bob\0bob password"))
        assert (await c.cmd("MAIL FROM:<bob@example.org>")).startswith("553 5.7.1")
        assert (await c.cmd("MAIL FROM:<anyone@example.com>")).startswith("250 ")
        await c.cmd("RSET")
        assert (await c.cmd("MAIL FROM:<>")).startswith("250 ")
        await c.close()


async def test_implicit_tls_with_aiosmtplib(
    tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext
) -> None:
    async with running(tmp_path, ca) as s:
        c = await tls_client(s.smtps, client_ctx, implicit=True)
        assert (await c.cmd("STARTTLS")).startswith("502 ")  # TLS already, not offered
        await c.close()
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=s.smtps,
            use_tls=True,
            tls_context=client_ctx,
            source_address=(UNTRUSTED, 0),
        )
        async with client:
            await client.login("alice@example.org", PASSWORD)
            errors, reply = await client.sendmail(
                "alice@example.org", ["carol@remote.test"], MESSAGE
            )
        assert errors == {} and reply.startswith("2.0.0")
        conn, _, _ = s.rec.calls[0]
        assert conn.auth_user == "alice@example.org" and conn.tls_version is not None
        # and over STARTTLS on the submission port with aiosmtplib's LOGIN
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=s.submission, start_tls=True, tls_context=client_ctx
        )
        async with client:
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as e:
                await client.auth_login("bob", "not it")
            assert e.value.code == 535


async def test_a_hundred_bad_attempts(
    tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext
) -> None:
    """Threats row 12: 100 bad AUTHs from one address over several connections. Only
    the first max_failures are checked (535); every later one is 454 at once; and one
    connection is closed by the error limit (421) long before 100."""
    async with running(tmp_path, ca, max_failures=5) as s:
        replies: list[str] = []
        closed = 0
        while len(replies) < 100:
            c = await tls_client(s.submission, client_ctx)
            while len(replies) < 100:
                r = await c.cmd("AUTH PLAIN " + b64(f"\0user{len(replies)}\0guess"))
                if r.startswith("421 4.7.0"):
                    closed += 1
                    break
                replies.append(r[:3])
            await c.close()
        assert replies[:5] == ["535"] * 5 and set(replies[5:]) == {"454"}
        assert closed >= 4  # max_junk_commands (20) errors per connection at most
        # the right password is refused too while the address is locked
        c = await tls_client(s.submission, client_ctx)
        assert (await c.cmd("AUTH PLAIN " + b64("\0bob\0bob password"))).startswith("454 ")
        await c.close()
