"""Netstrings (http://cr.yp.to/proto/netstrings.txt), the framing of Postfix's socketmap
protocol (socketmap_table(5)): ``<length>:<bytes>,`` with the length in decimal ASCII.

``encode(payload)`` frames one payload. ``NetstringReader(limit).feed(data)`` takes bytes
as they arrive and returns the payloads completed so far. A length over ``limit`` (seen
as soon as its digits say so, before the payload is read), a length that is not decimal
digits (or has a leading zero), or a payload not followed by ``,`` sets ``error`` (a
``NetstringError``) after the payloads completed before it: the stream cannot be
resynchronised after that, every later feed returns nothing, and the caller closes it.
Pure: no I/O.
"""

from __future__ import annotations


class NetstringError(ValueError):
    """The byte stream is not a sequence of netstrings (or one is over the limit)."""


class NetstringTooLong(NetstringError):
    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(f"netstring of {length} bytes is over the limit of {limit}")


def encode(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class NetstringReader:
    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self._digits = len(str(limit))  # a longer length field is over the limit
        self._buf = bytearray()
        self.error: NetstringError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not complete a netstring yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            return []
        self._buf += data
        out: list[bytes] = []
        try:
            self._frames(out)
        except NetstringError as exc:
            self.error = exc
            self._buf.clear()
        return out

    def _frames(self, out: list[bytes]) -> None:
        while self._buf:
            colon = self._buf.find(b":", 0, self._digits + 1)
            head = bytes(self._buf[:colon] if colon >= 0 else self._buf[: self._digits + 1])
            if colon < 0:
                self._check_head(head, complete=False)
                break
            length = self._check_head(head, complete=True)
            end = colon + 1 + length
            if len(self._buf) <= end:
                break  # payload or the comma still to come
            if self._buf[end] != ord(","):
                raise NetstringError(f"netstring of {length} bytes not followed by ','")
            out.append(bytes(self._buf[colon + 1 : end]))
            del self._buf[: end + 1]

    def _check_head(self, head: bytes, *, complete: bool) -> int:
        """The length field so far: digits only, no leading zero, within the limit."""
        if not head:
            if complete:
                raise NetstringError("netstring without a length")
            return 0
        if not head.isdigit():
            bad = next(b for b in head if not 0x30 <= b <= 0x39)
            raise NetstringError(f"netstring length has the byte {bytes([bad])!r}")
        if len(head) > 1 and head[:1] == b"0":
            raise NetstringError("netstring length has a leading zero")
        length = int(head)
        if length > self.limit or len(head) > self._digits:
            raise NetstringTooLong(length, self.limit)
        return length
