"""A small caching DNS forwarder: the local resolver rspamd is deployed with.

rspamd keeps no DNS answers of its own between messages and expects a caching resolver
on the host (its documentation asks for one); the relay caches answers in process
(relay/dns.py). Without one, rspamd would send every query (3 a message here) to the
bench's lab DNS server, which answers in Python in the bench's own process, on the same
two cores: a cost that counts for no system but slows whichever runs. This forwarder
runs as its own process, which the bench counts as part of the Postfix + rspamd system.

UDP: a query is looked up by its bytes after the 2-byte ID (flags, counts, question,
EDNS); a cached answer goes back with the client's ID, a miss is forwarded upstream
under an ID of our own and its answer cached (SERVFAIL answers are not). TCP (only used
after a truncated UDP answer) is passed through without a cache. Entries never expire: a
run is minutes long and each Postfix + rspamd start gets a fresh forwarder.

    python bench/dnscache.py --listen 127.0.0.15:5353 --upstream 127.0.0.1:53
"""

from __future__ import annotations

import argparse
import itertools
import select
import signal
import socket
import struct
import sys
import threading


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def serve_tcp(listener: socket.socket, upstream: tuple[str, int]) -> None:
    """Pass each TCP query through to the upstream server (no cache)."""
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_tcp_one, args=(conn, upstream), daemon=True).start()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _tcp_one(conn: socket.socket, upstream: tuple[str, int]) -> None:
    with conn:
        try:
            (length,) = struct.unpack("!H", _recv_exact(conn, 2))
            query = _recv_exact(conn, length)
            with socket.create_connection(upstream, timeout=5) as up:
                up.sendall(struct.pack("!H", len(query)) + query)
                (rlen,) = struct.unpack("!H", _recv_exact(up, 2))
                answer = _recv_exact(up, rlen)
            conn.sendall(struct.pack("!H", len(answer)) + answer)
        except (OSError, ConnectionError, struct.error):
            return


def serve_udp(sock: socket.socket, upstream: tuple[str, int]) -> None:
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.connect(upstream)
    cache: dict[bytes, bytes] = {}
    pending: dict[bytes, tuple[bytes, tuple[str, int], bytes]] = {}
    ids = itertools.cycle(range(1, 65536))
    while True:
        ready, _, _ = select.select([sock, up], [], [])
        if sock in ready:
            try:
                data, client = sock.recvfrom(4096)
            except OSError:
                data = b""
            if len(data) >= 12:
                key = data[2:]
                hit = cache.get(key)
                if hit is not None:
                    sock.sendto(data[:2] + hit, client)
                else:
                    uid = next(ids).to_bytes(2, "big")
                    pending[uid] = (key, client, data[:2])
                    up.send(uid + key)
        if up in ready:
            try:
                answer = up.recv(65535)
            except OSError:
                answer = b""
            if len(answer) >= 12:
                entry = pending.pop(answer[:2], None)
                if entry is not None:
                    key, client, cid = entry
                    if answer[3] & 0x0F != 2:  # RCODE 2 = SERVFAIL: ask again next time
                        cache[key] = answer[2:]
                    sock.sendto(cid + answer[2:], client)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="host:port (UDP and TCP)")
    p.add_argument("--upstream", required=True, help="host:port of the server to ask")
    args = p.parse_args(argv)
    listen, upstream = split_addr(args.listen), split_addr(args.upstream)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(listen)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(listen)
    tcp.listen(16)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=serve_tcp, args=(tcp, upstream), daemon=True).start()
    print("ready", flush=True)
    serve_udp(udp, upstream)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
