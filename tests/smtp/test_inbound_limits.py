"""Connection caps, idle and session time, junk commands, and graceful stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from relay.smtp.limits import ConnectionLimits
from tests.smtp.test_inbound_harness import (
    MESSAGE,
    UNTRUSTED,
    RawClient,
    Recorder,
    make_config,
    running,
)


async def _wait_sessions(server: object, n: int) -> None:
    for _ in range(200):
        if server.sessions == n:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"sessions never reached {n}")


async def test_per_ip_cap_for_untrusted_clients(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"max_connections_per_ip": 2})
    async with running(cfg) as (server, _, port):
        held = [await RawClient.connect(port, source=UNTRUSTED) for _ in range(2)]
        for c in held:
            assert (await c.reply()).startswith("220 ")
        extra = await RawClient.connect(port, source=UNTRUSTED)
        assert (await extra.reply()).startswith("421 4.7.0")
        assert await extra.closed()
        # the trusted address is exempt from the per-address cap
        trusted = [await RawClient.connect(port) for _ in range(3)]
        for c in trusted:
            assert (await c.reply()).startswith("220 ")
        await held[0].close()
        await _wait_sessions(server, 4)
        again = await RawClient.connect(port, source=UNTRUSTED)
        assert (await again.reply()).startswith("220 ")
        for c in [*held[1:], *trusted, again, extra]:
            await c.close()


async def test_global_cap(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"max_connections": 3})
    async with running(cfg) as (server, _, port):
        held = [await RawClient.connect(port) for _ in range(3)]
        for c in held:
            assert (await c.reply()).startswith("220 ")
        extra = await RawClient.connect(port, source=UNTRUSTED)
        assert (await extra.reply()).startswith("421 4.7.0")
        assert await extra.closed()
        assert server.limits.active == 3
        for c in held:
            await c.close()
        await _wait_sessions(server, 0)
        assert server.limits.active == 0


def test_connection_limits_counting() -> None:
    lim = ConnectionLimits(10, 2)
    assert lim.acquire("192.0.2.1") is None
    assert lim.acquire("::ffff:192.0.2.1") is None  # the same client
    refused = lim.acquire("192.0.2.1")
    assert refused is not None and refused.code == 421
    assert lim.count("192.0.2.1") == 2 and lim.active == 2
    lim.release("192.0.2.1")
    lim.release("192.0.2.1")
    lim.release("192.0.2.1")  # extra releases are ignored
    assert lim.active == 0 and lim.count("192.0.2.1") == 0


async def test_idle_timeout(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"session_timeout": 0.3})
    async with running(cfg) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        start = time.monotonic()
        reply = await c.reply(timeout=3)
        assert reply.startswith("421 4.4.2") and "timeout" in reply
        assert await c.closed()
        assert 0.25 < time.monotonic() - start < 1.5


async def test_slow_trickle_inside_a_line_times_out(tmp_path: Path) -> None:
    """Slowloris: bytes keep coming but no line is ever completed."""
    cfg = make_config(tmp_path, {"session_timeout": 0.4})
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        await c.start_mail()
        start = time.monotonic()
        reply = ""
        for _ in range(30):
            c.send(b"x")
            try:
                reply = await c.reply(timeout=0.1)
            except TimeoutError:
                continue
            break
        assert reply.startswith("421 4.4.2"), reply
        assert time.monotonic() - start < 1.5
        assert rec.calls == []


async def test_total_session_time(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path, {"session_timeout": 0.3, "max_session_time": 0.8, "max_junk_commands": 1000}
    )
    async with running(cfg) as (_, _, port):
        c = await RawClient.connect(port)
        await c.greet()
        start = time.monotonic()
        while True:
            reply = await c.cmd("NOOP")
            if not reply.startswith("250"):
                break
            await asyncio.sleep(0.1)
        assert reply.startswith("421 4.4.2") and "session time" in reply, reply
        assert 0.6 < time.monotonic() - start < 2.0


async def test_junk_command_cap_and_reset_after_a_message(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {"max_junk_commands": 3})
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("NOOP")).startswith("250 ")
        assert (await c.cmd("HELP")).startswith("214 ")
        assert (await c.cmd("VRFY info")).startswith("252 ")
        await c.start_mail()
        assert (await c.cmd(MESSAGE + b".")).startswith("250 ")  # resets the count
        assert (await c.cmd("RSET")).startswith("250 ")
        assert (await c.cmd("FOO")).startswith("500 ")
        assert (await c.cmd("NOOP")).startswith("250 ")
        reply = await c.cmd("NOOP")
        assert reply.startswith("421 4.7.0"), reply
        assert await c.closed()
        assert len(rec.calls) == 1


async def test_stop_lets_data_finish_and_closes_idle_sessions(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    gate = asyncio.Event()

    async def slow(_: bytes) -> str:
        await gate.wait()
        return "2.0.0 Ok: queued as SLOW"

    async with running(cfg, Recorder(slow)) as (server, rec, port):
        idle = await RawClient.connect(port)
        await idle.greet()
        busy = await RawClient.connect(port)
        await busy.greet()
        await busy.start_mail()
        busy.send(MESSAGE + b".\r\n")
        for _ in range(100):
            if rec.calls:
                break
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.stop(grace=5))
        assert (await idle.reply()).startswith("421 4.3.2")
        assert await idle.closed()
        # a new connection is refused once stop() began
        try:
            extra = await RawClient.connect(port)
        except ConnectionError:
            pass
        else:
            assert await extra.closed(timeout=1)
        gate.set()
        assert (await busy.reply()) == "250 2.0.0 Ok: queued as SLOW"
        assert (await busy.reply()).startswith("421 4.3.2")
        await stopping
        assert server.sessions == 0
