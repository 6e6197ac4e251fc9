"""The socketmap listener: netstrings over TCP, many requests per connection, one reply
per request in order (Postfix sends one and waits).

A request over ``REQUEST_LIMIT`` bytes, or bytes that are not netstrings, get one PERM
reply naming the problem and the connection is closed (the stream cannot be
resynchronised). A connection idle for ``IDLE_TIMEOUT`` is closed (Postfix closes its
own after 10 s idle and reconnects when it needs to).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import structlog

from relay.config import HostPort
from relay.errors import StartupError
from relay.policyserver.answer import perm
from relay.policyserver.netstring import NetstringReader, encode
from relay.policyserver.service import PolicyService

log = structlog.get_logger("relay.policyserver")

REQUEST_LIMIT = 10_000  # bytes of one request: a map name, a space and a domain
IDLE_TIMEOUT = 120.0
READ_CHUNK = 4096


class PolicyServer:
    def __init__(self, service: PolicyService, listen: tuple[HostPort, ...]) -> None:
        self.service = service
        self.listen = listen
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task[None]] = set()
        self.bound: list[tuple[str, int]] = []

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen on ``listen``, or on sockets bound already (relay.preflight)."""
        for sock in sockets or []:
            self._servers.append(await asyncio.start_server(self._handle, sock=sock))
        for hp in self.listen if sockets is None else ():
            try:
                server = await asyncio.start_server(self._handle, hp.host, hp.port)
            except OSError as exc:
                await self.stop()
                raise StartupError(
                    f"policy server cannot listen on {hp}: {exc.strerror or exc}"
                ) from None
            self._servers.append(server)
        for server in self._servers:
            for s in server.sockets:
                host, port = s.getsockname()[:2]
                self.bound.append((str(host), int(port)))
        log.info("policy_server_started", listen=[f"{h}:{p}" for h, p in self.bound])

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        peer = writer.get_extra_info("peername")
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the top of a connection handler
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            log.debug("policy_connection_closed", peer=str(peer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = NetstringReader(REQUEST_LIMIT)
        while True:
            data = await asyncio.wait_for(reader.read(READ_CHUNK), IDLE_TIMEOUT)
            if not data:
                return
            for payload in frames.feed(data):
                reply = await self.service.answer(payload)
                writer.write(encode(reply.wire()))
                await writer.drain()
            if frames.error is not None:
                log.warning("policy_bad_request", error=str(frames.error))
                writer.write(encode(perm(f"bad request: {frames.error}").wire()))
                await writer.drain()
                return
