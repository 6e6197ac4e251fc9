"""SMTP load generator for the benchmark: C concurrent clients send N messages to one
server and time each transaction. The same generator drives the relay and Postfix.

A minimal asyncio SMTP client (no TLS, no pipelining, like Postfix's smtp-source) so the
generator costs little CPU. Each client opens a connection, says EHLO, sends
``--per-conn`` messages (MAIL, RCPT, DATA, the dot-stuffed message, ".") and QUITs, then
opens the next connection, until N messages have been handed out or the time is up.

Latency of a message: from sending MAIL FROM until the 250 after "." (``latency``), and
from sending "." until that 250 (``commit``: the server's durable write).

    python bench/loadgen.py --host H --port P --messages DIR [--clients 20] [--count 5000]

prints one JSON object on stdout. Times are time.monotonic() (CLOCK_MONOTONIC, the same
in every process), so the caller can line them up with its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path


def dot_stuff(raw: bytes) -> bytes:
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
    return out + b"\r\n.\r\n"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100.0 * (len(s) - 1))))
    return s[k]


class Stats:
    def __init__(self, count: int, deadline: float) -> None:
        self.count = count
        self.deadline = deadline
        self.handed = 0
        self.ok = 0
        self.failed = 0
        self.latency: list[float] = []
        self.commit: list[float] = []
        self.errors: Counter[str] = Counter()
        self.first_ok = 0.0
        self.last_ok = 0.0

    def take(self) -> int | None:
        if self.handed >= self.count or time.monotonic() >= self.deadline:
            return None
        self.handed += 1
        return self.handed - 1


class ReplyError(Exception):
    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage = stage
        self.code = code
        self.text = text


async def reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    text = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        text.append(line[4:].decode(errors="replace").strip())
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), " ".join(text)


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, want: int, stage: str
) -> None:
    writer.write(line)
    code, text = await reply(reader)
    if code != want:
        raise ReplyError(stage, code, text)


async def client(args: argparse.Namespace, stats: Stats, messages: list[bytes], port: int) -> None:
    mail = f"MAIL FROM:<{args.mail_from}>\r\n".encode()
    rcpt = f"RCPT TO:<{args.rcpt_to}>\r\n".encode()
    while True:
        first = stats.take()
        if first is None:
            return
        todo = [first]
        try:
            reader, writer = await asyncio.open_connection(args.host, port)
        except OSError as exc:
            stats.failed += 1
            stats.errors[f"connect: {exc}"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            code, text = await reply(reader)
            if code != 220:
                raise ReplyError("banner", code, text)
            await command(reader, writer, f"EHLO {args.helo}\r\n".encode(), 250, "EHLO")
            sent_here = 0
            while todo:
                i = todo.pop()
                t0 = time.monotonic()
                await command(reader, writer, mail, 250, "MAIL")
                await command(reader, writer, rcpt, 250, "RCPT")
                await command(reader, writer, b"DATA\r\n", 354, "DATA")
                writer.write(messages[i % len(messages)])
                t1 = time.monotonic()
                code, text = await reply(reader)
                t2 = time.monotonic()
                if code != 250:
                    raise ReplyError("end of data", code, text)
                stats.ok += 1
                stats.latency.append(t2 - t0)
                stats.commit.append(t2 - t1)
                stats.first_ok = stats.first_ok or t2
                stats.last_ok = t2
                sent_here += 1
                if sent_here < args.per_conn:
                    nxt = stats.take()
                    if nxt is not None:
                        todo.append(nxt)
            writer.write(b"QUIT\r\n")
            await writer.drain()
            try:
                await asyncio.wait_for(reply(reader), 5)
            except (TimeoutError, ConnectionError):
                pass
        except ReplyError as exc:
            stats.failed += 1 + len(todo)
            stats.errors[f"{exc.stage}: {exc.code} {exc.text[:60]}"] += 1
        except (ConnectionError, OSError) as exc:
            stats.failed += 1 + len(todo)
            stats.errors[f"connection: {exc}"] += 1
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


async def run(args: argparse.Namespace, messages: list[bytes]) -> dict[str, object]:
    t_start = time.monotonic()
    stats = Stats(args.count, t_start + args.duration)
    ports = [args.port, *args.also_port]  # clients spread over the ports (several nodes)
    await asyncio.gather(
        *(client(args, stats, messages, ports[i % len(ports)]) for i in range(args.clients))
    )
    t_end = time.monotonic()
    ru = resource.getrusage(resource.RUSAGE_SELF)

    def ms(values: list[float]) -> dict[str, float]:
        return {
            "p50": round(percentile(values, 50) * 1000, 2),
            "p90": round(percentile(values, 90) * 1000, 2),
            "p99": round(percentile(values, 99) * 1000, 2),
            "max": round(max(values, default=0.0) * 1000, 2),
        }

    return {
        "ok": stats.ok,
        "failed": stats.failed,
        "errors": dict(stats.errors.most_common(5)),
        "t_start": t_start,
        "t_end": t_end,
        "t_last_ok": stats.last_ok,
        "latency_ms": ms(stats.latency),
        "commit_ms": ms(stats.commit),
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "clients": args.clients,
        "message_bytes": sum(len(m) for m in messages) // len(messages),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--also-port", type=int, action="append", default=[], help="another node's port")
    p.add_argument("--messages", required=True, help="directory of *.eml files, used in turn")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--per-conn", type=int, default=1, help="messages per connection")
    p.add_argument("--duration", type=float, default=120.0, help="stop handing out after this")
    p.add_argument("--mail-from", default="bench@sender.test")
    p.add_argument("--rcpt-to", default="user@sink.test")
    p.add_argument("--helo", default="loadgen.sender.test")
    args = p.parse_args(argv)
    files = sorted(Path(args.messages).glob("*.eml"))
    if not files:
        raise SystemExit(f"no *.eml in {args.messages}")
    result = asyncio.run(run(args, [dot_stuff(f.read_bytes()) for f in files]))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
