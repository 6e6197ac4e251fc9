"""The socketmap protocol over real loopback TCP: the policy server in front of the real
PolicyManager (lab DNS, HTTPS policy host, SQLite store), asked by a raw client and by
Postfix's own socketmap client (``postmap -q``).

Edge cases: many requests on one connection (split and coalesced writes), a wrong map
name (PERM, the connection stays), an oversized or malformed netstring (PERM, closed), an
unknown domain (NOTFOUND), an unreadable cache (TEMP, never NOTFOUND), a policy fetch
slower than the lookup timeout (TEMP at once, the policy cached for the next query).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import HostPort, PolicyServerConfig
from relay.mtasts.cache import PolicyCache
from relay.mtasts.manager import PolicyManager
from relay.policyserver.netstring import NetstringReader, encode
from relay.policyserver.server import REQUEST_LIMIT, PolicyServer
from relay.policyserver.service import PolicyService
from relay.store import Store
from tests.mtasts.conftest import StsLab
from tests.mtasts.sts_https_server import Answer
from tests.mtasts.test_sts_fail_closed import FaultyStore

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400\n"
TESTING = "version: STSv1\nmode: testing\nmx: mx.testing.example\nmax_age: 86400\n"
SECURE = "OK secure match=mx1.example.com:.example.net servername=hostname protocols=>=TLSv1.2"


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = NetstringReader(200_000)
        self.got: list[bytes] = []

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def reply(self, timeout: float = 10) -> str:
        while not self.got:
            data = await asyncio.wait_for(self.reader.read(4096), timeout)
            assert data, "connection closed before a reply"
            self.got.extend(self.frames.feed(data))
        return self.got.pop(0).decode()

    async def ask(self, request: str) -> str:
        await self.send(encode(request.encode()))
        return await self.reply()

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""


async def _start(lab: StsLab, st: Store, **ps: Any) -> tuple[PolicyServer, PolicyManager]:
    manager = lab.manager(st)
    cfg = lab.config()
    cfg = dataclasses.replace(cfg, policy_server=PolicyServerConfig(**ps))
    server = PolicyServer(
        PolicyService(cfg, manager.get_policy, lab.resolver()), (HostPort("127.0.0.1", 0),)
    )
    await server.start()
    return server, manager


@pytest.fixture
async def served(lab: StsLab, store: Store) -> AsyncIterator[tuple[PolicyServer, PolicyManager]]:
    lab.publish("example.com", ENFORCE, "e1")
    lab.publish("testing.example", TESTING, "t1")
    server, manager = await _start(lab, store)
    yield server, manager
    await server.stop()


async def _client(server: PolicyServer) -> Client:
    return Client(*await asyncio.open_connection(*server.bound[0]))


async def test_many_requests_on_one_connection(
    served: tuple[PolicyServer, PolicyManager], lab: StsLab
) -> None:
    server, manager = served
    c = await _client(server)
    assert await c.ask("postfix example.com") == SECURE
    assert await c.ask("postfix testing.example") == "NOTFOUND "  # RFC 8461 5: delivered
    assert await c.ask("postfix unknown.example") == "NOTFOUND "  # no TXT record
    assert await c.ask("postfix [mx1.example.com]:25") == "NOTFOUND "
    assert await c.ask("postfix .example.com") == "NOTFOUND "
    # one request split over three writes, then two in one write
    framed = encode(b"postfix Example.COM")
    for part in (framed[:2], framed[2:9], framed[9:]):
        await c.send(part)
        await asyncio.sleep(0.02)
    assert await c.reply() == SECURE
    await c.send(encode(b"postfix example.com") + encode(b"postfix testing.example"))
    assert [await c.reply(), await c.reply()] == [SECURE, "NOTFOUND "]
    # the policy came from the shared MTA-STS cache: fetched once, cached in the store
    assert lab.fetches("example.com") == 1
    cached = await PolicyCache(manager.cache.store).get("example.com")
    assert cached is not None and cached.policy_id == "e1"
    c.writer.close()


async def test_wrong_map_name_is_perm_and_the_connection_stays(
    served: tuple[PolicyServer, PolicyManager],
) -> None:
    c = await _client(served[0])
    reply = await c.ask("other example.com")
    assert reply.startswith("PERM unknown map name 'other'"), reply
    assert await c.ask("postfix") == "PERM request is not 'name key'"
    assert (await c.ask("postfix exa mple.com")).startswith("PERM invalid domain")
    assert await c.ask("postfix example.com") == SECURE
    c.writer.close()


async def test_oversized_netstring_is_perm_and_closed(
    served: tuple[PolicyServer, PolicyManager],
) -> None:
    c = await _client(served[0])
    assert await c.ask("postfix example.com") == SECURE
    await c.send(b"%d:postfix " % (REQUEST_LIMIT + 1))  # the length alone is enough
    reply = await c.reply()
    assert reply == (
        f"PERM bad request: netstring of {REQUEST_LIMIT + 1} bytes is over the limit of "
        f"{REQUEST_LIMIT}"
    )
    assert await c.closed()


async def test_malformed_netstring_is_perm_and_closed(
    served: tuple[PolicyServer, PolicyManager],
) -> None:
    c = await _client(served[0])
    await c.send(b"19:postfix example.com;")
    assert await c.reply() == "PERM bad request: netstring of 19 bytes not followed by ','"
    assert await c.closed()


async def test_unreadable_cache_is_temp_never_notfound(lab: StsLab, tmp_path: Path) -> None:
    faulty = FaultyStore(tmp_path / "faulty.sqlite3").open()
    lab.publish("example.com", ENFORCE, "e1")
    server, _ = await _start(lab, faulty)
    try:
        c = await _client(server)
        assert await c.ask("postfix example.com") == SECURE  # cached now
        # a DNS attacker hides the TXT record while the cache cannot be read
        lab.zone.remove("_mta-sts.example.com")
        faulty.fail_reads = True
        assert (
            await c.ask("postfix example.com") == "TEMP MTA-STS policy of example.com unavailable"
        )
        faulty.fail_reads = False
        assert await c.ask("postfix example.com") == SECURE  # the cached policy holds
    finally:
        await server.stop()
        faulty.close()


async def test_slow_fetch_is_temp_before_the_timeout_then_cached(lab: StsLab, store: Store) -> None:
    body = ENFORCE.encode()
    lab.publish("slow.example", None, "s1", answer=Answer(200, body, "text/plain", delay=1.5))
    server, _ = await _start(lab, store, lookup_timeout=0.5)
    try:
        c = await _client(server)
        t0 = asyncio.get_running_loop().time()
        reply = await c.ask("postfix slow.example")
        assert reply == "TEMP policy lookup for slow.example took over 0.5 s"
        assert asyncio.get_running_loop().time() - t0 < 1.4
        await asyncio.sleep(1.5)  # the fetch went on in the background
        assert await c.ask("postfix slow.example") == SECURE
        assert lab.fetches("slow.example") == 1
    finally:
        await server.stop()


async def test_postfix_postmap_reads_the_map(
    served: tuple[PolicyServer, PolicyManager], tmp_path: Path
) -> None:
    """Postfix's own socketmap client (postmap -q) gets the replies."""
    cfg = tmp_path / "pf"
    cfg.mkdir()
    (cfg / "main.cf").write_text("compatibility_level = 3.6\n")
    host, port = served[0].bound[0]
    table = f"socketmap:inet:{host}:{port}:postfix"

    def postmap(key: str, table: str = table) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        return subprocess.run(
            ["postmap", "-c", str(cfg), "-q", key, table],
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip

    found, missing, wrong = await asyncio.gather(
        asyncio.to_thread(postmap, "example.com"),
        asyncio.to_thread(postmap, "unknown.example"),
        asyncio.to_thread(postmap, "example.com", f"socketmap:inet:{host}:{port}:other"),
    )
    assert found.returncode == 0 and found.stdout.strip() == SECURE.removeprefix("OK "), found
    assert missing.returncode == 1 and missing.stdout == "", missing
    assert wrong.returncode != 0 and "unknown map name" in wrong.stderr, wrong
