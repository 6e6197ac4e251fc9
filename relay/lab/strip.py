"""A STARTTLS-stripping TCP proxy for the downgrade lab (threats row 6; RFC 8461 section 1).

It sits between an SMTP client and a real server and does what boxes in the wild do
(seen from "SMTP fixup" firewalls and on-path attackers): in the server's replies the
``STARTTLS`` keyword of the EHLO response becomes ``XXXXXXXA`` (same length, so nothing
else in the stream moves), and a ``STARTTLS`` command from the client is rewritten the
same way (the server then answers "unknown command"). Everything else passes unchanged;
message content (between DATA and the final dot) is never touched.

Use in tests as ``async with StripProxy(upstream=("127.0.0.2", 2525)) as proxy`` or from
the command line through ``serve(listen, upstream)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from relay.lab.tcpserver import LabServer

_EHLO_STARTTLS = re.compile(rb"^(250[ -])STARTTLS(\s*)$", re.IGNORECASE)
_CMD_STARTTLS = re.compile(rb"^STARTTLS(\s*)$", re.IGNORECASE)
REPLACEMENT = b"XXXXXXXA"
MAX_LINE = 65536
assert len(REPLACEMENT) == len(b"STARTTLS")


class StripProxy(LabServer):
    """Listen on (host, port), forward every connection to ``upstream``, strip STARTTLS."""

    def __init__(
        self,
        upstream: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(listen)
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.connections = 0
        self.stripped = 0  # STARTTLS occurrences rewritten, both directions

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        u_writer: asyncio.StreamWriter | None = None
        try:
            u_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), self.connect_timeout
            )
            u_writer = upstream_writer
            await asyncio.gather(
                self._pump(u_reader, c_writer, server_side=True),
                self._pump(c_reader, upstream_writer, server_side=False),
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the top of a connection handler, nothing above to tell
        finally:
            for w in (c_writer, u_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, server_side: bool
    ) -> None:
        in_data = False
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    line = await reader.read(MAX_LINE)
                except asyncio.IncompleteReadError as exc:
                    line = exc.partial
                    if line:
                        writer.write(line)
                    break
                if server_side:
                    m = _EHLO_STARTTLS.match(line)
                    if m:
                        line = m.group(1) + REPLACEMENT + m.group(2)
                        self.stripped += 1
                elif in_data:
                    if line in (b".\r\n", b".\n"):
                        in_data = False
                else:
                    stripped = line.strip().upper()
                    if stripped in (b"DATA",):
                        in_data = True
                    elif _CMD_STARTTLS.match(line):
                        line = REPLACEMENT + line[len(REPLACEMENT) :]
                        self.stripped += 1
                writer.write(line)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    """Run a StripProxy until cancelled (for ``relay lab strip --listen --upstream``)."""
    async with StripProxy(upstream, listen) as proxy:
        assert proxy._server is not None
        await proxy._server.serve_forever()
