"""Base of the lab's small TCP servers (stripping proxy, injecting MX, policy host): listen
on loopback, track each connection's task, and end them all on stop()."""

from __future__ import annotations

import asyncio
from typing import Any, Self


class LabServer:
    """Subclasses implement ``_handle(reader, writer)``; ``_server_options`` adds
    keyword arguments for ``asyncio.start_server`` (e.g. ``ssl``)."""

    def __init__(self, listen: tuple[str, int]) -> None:
        self.listen = listen
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return self.listen[0]

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.listen[1]
        return int(self._server.sockets[0].getsockname()[1])

    def _server_options(self) -> dict[str, Any]:
        return {}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def start(self) -> Self:
        self._server = await asyncio.start_server(
            self._connection, self.listen[0], self.listen[1], **self._server_options()
        )
        self.listen = (self.listen[0], self.port)
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
