"""A real DNS server (dnslib, UDP and TCP) on loopback, fed from an in-memory zone.

Tests and the lab point ``[dns] nameservers`` at it. Each name can also be made to
fail: ``SERVFAIL``, ``NXDOMAIN`` or ``DROP`` (no answer at all, so the client times out).
The zone can be changed while the server runs (``set``, ``remove``, ``fail``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


def _n(name: str) -> str:
    return name.rstrip(".").lower()


def _txt_chunks(value: str | list[str]) -> list[bytes]:
    if isinstance(value, list):
        return [s.encode() for s in value]
    raw = value.encode()
    return [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]


@dataclass
class Zone:
    """name -> list of (type, value). value: str for A/AAAA/CNAME/PTR, (pref, host) for MX,
    str or list[str] (explicit character-strings) for TXT."""

    records: dict[str, list[tuple[str, object]]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    queries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, rdtype: str, value: object) -> None:
        with self.lock:
            self.records.setdefault(_n(name), []).append((rdtype.upper(), value))

    def set(self, name: str, rdtype: str, values: Iterable[object]) -> None:
        with self.lock:
            recs = [r for r in self.records.get(_n(name), []) if r[0] != rdtype.upper()]
            recs.extend((rdtype.upper(), v) for v in values)
            self.records[_n(name)] = recs

    def remove(self, name: str, rdtype: str | None = None) -> None:
        with self.lock:
            if rdtype is None:
                self.records.pop(_n(name), None)
            else:
                self.records[_n(name)] = [
                    r for r in self.records.get(_n(name), []) if r[0] != rdtype.upper()
                ]

    def fail(self, name: str, mode: str | None, rdtype: str | None = None) -> None:
        """mode: SERVFAIL, NXDOMAIN, DROP, or None to clear; for every query of the name,
        or (rdtype given) only for queries of that type."""
        key = _n(name) if rdtype is None else f"{_n(name)}/{rdtype.upper()}"
        with self.lock:
            if mode is None:
                self.failures.pop(key, None)
            else:
                self.failures[key] = mode


class _Drop(Exception):
    """Raised by the resolver to send no answer at all."""


class _Handler(DNSHandler):  # type: ignore[misc]
    def handle(self) -> None:
        try:
            super().handle()
        except _Drop:
            pass


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: Zone) -> None:
        self.zone = zone

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        # from the raw labels: str() of a dnslib name escapes spaces and the like
        qname = ".".join(lab.decode("utf-8", "replace") for lab in request.q.qname.label).lower()
        qtype = QTYPE[request.q.qtype]
        with self.zone.lock:
            self.zone.queries.append((qname, qtype))
            mode = self.zone.failures.get(f"{qname}/{qtype}") or self.zone.failures.get(qname)
            if mode == "DROP":
                raise _Drop
            if mode == "SERVFAIL":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if mode == "NXDOMAIN":
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            name = qname
            for _hop in range(8):
                recs = self.zone.records.get(name)
                if recs is None:
                    if name == qname:
                        reply.header.rcode = RCODE.NXDOMAIN
                    return reply
                cnames = [v for t, v in recs if t == "CNAME"]
                if cnames and qtype != "CNAME":
                    target = _n(str(cnames[0]))
                    reply.add_answer(RR(name + ".", QTYPE.CNAME, rdata=CNAME(target + "."), ttl=60))
                    name = target
                    continue
                for t, v in recs:
                    if t != qtype:
                        continue
                    rdata: object
                    if t == "A":
                        rdata = A(str(v))
                    elif t == "AAAA":
                        rdata = AAAA(str(v))
                    elif t == "MX":
                        pref, host = cast(tuple[int, str], v)
                        rdata = MX((_n(str(host)) + ".") if host not in ("", ".") else ".", pref)
                    elif t == "TXT":
                        rdata = TXT(_txt_chunks(v))  # type: ignore[arg-type]
                    elif t == "PTR":
                        rdata = PTR(_n(str(v)) + ".")
                    elif t == "CNAME":
                        rdata = CNAME(_n(str(v)) + ".")
                    else:
                        continue
                    reply.add_answer(RR(name + ".", getattr(QTYPE, t), rdata=rdata, ttl=60))
                return reply
        reply.header.rcode = RCODE.SERVFAIL  # CNAME chain too long
        return reply


class _QuietLogger(DNSLogger):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)


class LabDnsServer:
    """UDP and TCP DNS server on host:port serving ``zone``. Use as a context manager."""

    def __init__(self, zone: Zone | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = zone or Zone()
        self.host = host
        self._resolver = _ZoneResolver(self.zone)
        # UDP and TCP on the same port: with an ephemeral port the TCP bind can collide
        # with another process; try again with a new port then.
        for attempt in range(20):
            udp = DNSServer(
                self._resolver, address=host, port=port, logger=_QuietLogger(), handler=_Handler
            )
            udp_port: int = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    self._resolver,
                    address=host,
                    port=udp_port,
                    tcp=True,
                    logger=_QuietLogger(),
                    handler=_Handler,
                )
            except OSError:
                udp.server.server_close()
                if port != 0 or attempt == 19:
                    raise
                continue
            break
        self._udp, self._tcp, self.port = udp, tcp, udp_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> LabDnsServer:
        for srv in (self._udp, self._tcp):
            # a short poll interval so that stop() returns quickly
            thread = threading.Thread(
                target=srv.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            srv.thread = thread
        return self

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            srv.server.shutdown()
            srv.server.server_close()

    def __enter__(self) -> LabDnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
