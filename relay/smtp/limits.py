"""Inbound resource limits: connection caps (Postfix anvil), session caps and free disk space.

* ``ConnectionLimits``: global and per-client-address concurrency caps, checked when a
  connection arrives; over a cap the client gets ``421 4.7.0`` and is disconnected.
  Clients in ``exempt`` networks (by default ``[relay] trusted_networks``, as Postfix's
  ``smtpd_client_event_limit_exceptions = $mynetworks``) skip the per-address cap, not
  the global one. Counts are per process: with N worker processes the caps are per worker.
* ``SessionLimits``: the per-session numbers the server enforces (idle timeout, total
  session time, junk commands, recipients, sizes, Received count), from ``[server]``.
* ``disk_free``: free bytes where the store lives; MAIL is refused with 452 4.3.1 when
  it falls below ``min_free_space`` (default 1.5 x max_message_size, as Postfix).
"""

from __future__ import annotations

import ipaddress
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from relay.config import Config, ServerConfig
from relay.model import SmtpReply

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TOO_MANY_TOTAL = SmtpReply(421, "4.7.0 Error: too many connections, try again later")
TOO_MANY_FROM_YOU = SmtpReply(421, "4.7.0 Error: too many connections from your address")


def normalise_ip(ip: str) -> str:
    """IPv4-mapped IPv6 (``::ffff:192.0.2.1``) -> ``192.0.2.1``; scope ids dropped."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(normalise_ip(ip))
    except ValueError:
        return False
    return any(addr in net for net in networks if net.version == addr.version)


class ConnectionLimits:
    """Concurrent connection counts, globally and per client address."""

    def __init__(
        self, max_connections: int, max_per_ip: int, *, exempt: Iterable[Network] = ()
    ) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self._exempt = tuple(exempt)
        self._per_ip: dict[str, int] = {}
        self._total = 0

    @classmethod
    def from_config(cls, config: Config) -> ConnectionLimits:
        return cls(
            config.server.max_connections,
            config.server.max_connections_per_ip,
            exempt=config.relay.trusted_networks,
        )

    @property
    def active(self) -> int:
        return self._total

    def count(self, ip: str) -> int:
        return self._per_ip.get(normalise_ip(ip), 0)

    def acquire(self, ip: str) -> SmtpReply | None:
        """Count a new connection; a 421 reply (and no count) when over a cap."""
        ip = normalise_ip(ip)
        if self._total >= self.max_connections:
            return TOO_MANY_TOTAL
        n = self._per_ip.get(ip, 0)
        if n >= self.max_per_ip and not in_networks(ip, self._exempt):
            return TOO_MANY_FROM_YOU
        self._per_ip[ip] = n + 1
        self._total += 1
        return None

    def release(self, ip: str) -> None:
        ip = normalise_ip(ip)
        n = self._per_ip.get(ip, 0)
        if n <= 0:
            return
        if n == 1:
            del self._per_ip[ip]
        else:
            self._per_ip[ip] = n - 1
        self._total -= 1


@dataclass(frozen=True, slots=True)
class SessionLimits:
    idle_timeout: float = 300.0  # no complete line from the client for this long -> 421
    max_session_time: float = 1800.0  # whole connection -> 421
    max_junk_commands: int = 20  # NOOP/RSET/HELP/VRFY/unknown/errors; reset after a message
    max_recipients: int = 100
    max_message_size: int = 26214400
    max_header_size: int = 102400
    max_received_headers: int = 50
    min_free_space: int = 0

    @classmethod
    def from_config(cls, server: ServerConfig) -> SessionLimits:
        return cls(
            idle_timeout=server.session_timeout,
            max_session_time=server.max_session_time,
            max_junk_commands=server.max_junk_commands,
            max_recipients=server.max_recipients,
            max_message_size=server.max_message_size,
            max_header_size=server.max_header_size,
            max_received_headers=server.max_received_headers,
            min_free_space=server.min_free_space or (server.max_message_size * 3) // 2,
        )


def disk_free(path: Path) -> int:
    """Free bytes (for unprivileged users) on the file system holding ``path``."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


class CachedDiskFree:
    """``disk_free(path)`` looked up at most once per ``ttl`` seconds, not at every MAIL
    (a stat and a statvfs each time showed in the benchmark profile). The answer may be a
    second old; a store write that fails for want of space still answers 451, so nothing
    accepted is lost."""

    def __init__(
        self,
        path: Path,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        lookup: Callable[[Path], int] | None = None,
    ) -> None:
        self.path = path
        self.lookup = lookup or disk_free
        self.ttl = ttl
        self.clock = clock
        self._at = -float("inf")
        self._free = 0

    def __call__(self) -> int:
        now = self.clock()
        if now - self._at >= self.ttl:
            self._free = self.lookup(self.path)
            self._at = now
        return self._free
