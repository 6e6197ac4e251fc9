"""REQUIRETLS is stored with the message (RFC 8689 section 4.1) and reaches the delivery
job; with it, a "TLS-Required: No" header is ignored (RFC 8689 section 5)."""

from __future__ import annotations

from pathlib import Path

from relay.config import Config
from relay.intake import Intake
from relay.model import ConnInfo, Envelope
from relay.queue.spool import FLAG_NO_TLS_REQUIRED, FLAG_REQUIRETLS, Spool
from relay.store import Store

MSG = b"From: a@b.test\r\nTo: r@example.org\r\nSubject: s\r\n\r\nbody\r\n"
CONN = ConnInfo("127.0.0.1", 1234, "client.test", tls_version="TLSv1.3", trusted=True)


async def _flags(tmp_path: Path, env: Envelope, data: bytes) -> int:
    store = Store(tmp_path / "q.sqlite3").open()
    try:
        spool = Spool(store)
        reply = await Intake(Config(path=tmp_path / "c.toml"), spool).submit(CONN, env, data)
        qid = reply.rsplit(" ", 1)[-1]
        msg = await spool.get(qid)
        assert msg is not None
        return msg.flags
    finally:
        store.close()


async def test_requiretls_flag_is_stored(tmp_path: Path) -> None:
    env = Envelope("a@b.test", ("r@example.org",), requiretls=True)
    assert await _flags(tmp_path, env, MSG) & FLAG_REQUIRETLS


async def test_requiretls_wins_over_tls_required_no(tmp_path: Path) -> None:
    env = Envelope("a@b.test", ("r@example.org",), requiretls=True)
    flags = await _flags(tmp_path, env, b"TLS-Required: No\r\n" + MSG)
    assert flags & FLAG_REQUIRETLS and not flags & FLAG_NO_TLS_REQUIRED


async def test_plain_message_has_no_requiretls_flag(tmp_path: Path) -> None:
    env = Envelope("a@b.test", ("r@example.org",))
    assert not await _flags(tmp_path, env, MSG) & FLAG_REQUIRETLS


async def test_requiretls_job_and_its_dsn_carry_requiretls_headers_only(tmp_path: Path) -> None:
    """RFC 8689 section 5: the DSN of a REQUIRETLS message is sent with REQUIRETLS and
    holds no content beyond the original's headers."""
    import asyncio

    from relay.queue.spool import NewMessage
    from tests.queue.test_scheduler import MSG as SMSG
    from tests.queue.test_scheduler import Harness

    h = Harness(tmp_path, {"c@example.org": ["perm"]})
    task = asyncio.create_task(h.sched.run())
    try:
        body = SMSG + b"SECRET-BODY-LINE\r\n"
        await h.spool.enqueue(
            NewMessage("a@example.com", ("c@example.org",), body, (), FLAG_REQUIRETLS)
        )
        h.sched.wake()
        await h.settle()
        assert [j.requiretls for j in h.courier.jobs] == [True]
        [dsn] = h.courier.dsns
        assert dsn.requiretls is True
        assert b"SECRET-BODY-LINE" not in dsn.data and b"text/rfc822-headers" in dsn.data
    finally:
        await h.sched.stop()
        task.cancel()
        h.close()
