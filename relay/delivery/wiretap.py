"""The outbound SMTP transcript, for the lab (``relay lab run --html``): when a wire tap is
set in the context the relay's tasks run in (``WIRE_TAP``), every outbound session passes
each line it writes ("C") and reads ("S"), and what happened to TLS ("*"), to it, named by
the MX host the session is for. Unset (the default), nothing is recorded.

The message content is not copied: it shows as one line with its size.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

Tap = Callable[[str, str, str], None]  # (mx_host, "C" | "S" | "*", line)
WIRE_TAP: ContextVar[Tap | None] = ContextVar("relay_wire_tap", default=None)
# where the SessionTap sits on the protocol, for code that swaps data_received for a while
# (relay.delivery.client's pipelined reads)
TAP_ATTRIBUTE = "_relay_wiretap"


class SessionTap:
    """Wraps one aiosmtplib protocol's write and data_received (the lines, as sent and as
    received, TLS or not: the protocol sees the clear text either way)."""

    def __init__(self, tap: Tap, mx_host: str) -> None:
        self.tap = tap
        self.mx_host = mx_host
        self._data_sent = False  # DATA written; its 354 not yet seen
        self._content = False  # 354 seen: the next write is the content
        self._partial = b""

    def note(self, text: str) -> None:
        self.tap(self.mx_host, "*", text)

    def attach(self, protocol: Any) -> None:
        write, received = protocol.write, protocol.data_received

        def tapped_write(data: bytes) -> None:
            self.sent(data)
            write(data)

        def tapped_received(data: bytes) -> None:
            self.received(data)
            received(data)

        protocol.write = tapped_write
        protocol.data_received = tapped_received
        setattr(protocol, TAP_ATTRIBUTE, self)

    def sent(self, data: bytes) -> None:
        if self._content:
            self.tap(self.mx_host, "C", f"(message content, {len(data)} bytes)")
            self._content = self._data_sent = False
            return
        for line in data.split(b"\r\n"):
            if line:
                self.tap(self.mx_host, "C", line.decode("utf-8", "replace"))
        self._data_sent = data.endswith(b"DATA\r\n")

    def received(self, data: bytes) -> None:
        data = self._partial + data
        *lines, self._partial = data.split(b"\r\n")
        for line in lines:
            if self._data_sent and line.startswith(b"354"):
                self._content = True
            self.tap(self.mx_host, "S", line.decode("utf-8", "replace"))


def session_tap(mx_host: str) -> SessionTap | None:
    tap = WIRE_TAP.get()
    return SessionTap(tap, mx_host) if tap is not None else None
