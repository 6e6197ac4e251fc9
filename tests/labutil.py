"""Shared test helpers: write a config.toml, run a relay in-process, send mail."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiosmtplib

from relay.config import write_config

__all__ = ["base_doc", "message", "send", "write_config"]


_GIVEN: set[int] = set()  # ports free_port has handed out in this test process


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, and never one handed out before in this process: nothing
    holds a port between two calls, so two calls in a row could otherwise give the same
    one (two nodes' configs then name one listen address and the second fails to start)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def base_doc(
    tmp: Path, dns: str, mx_port: int, **over: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    doc: dict[str, dict[str, Any]] = {
        "server": {"listen": ["127.0.0.1:0"], "hostname": "relay.lab.test"},
        "relay": {"trusted_networks": ["127.0.0.1/32"], "local_domains": ["lists.lab.test"]},
        "storage": {"path": str(tmp / "relay.sqlite3")},
        "dns": {"nameservers": [dns], "timeout": 2},
        "delivery": {
            "port": mx_port,
            "retry_first": 300,
            "connect_timeout": 5,
            "attempt_timeout": 20,
        },
        "mta_sts": {"enabled": False},
        "tlsrpt": {"enabled": False},
        "auth": {"enabled": False},
        "arc": {"enabled": False},
        "srs": {"enabled": False},
        "logging": {"level": "warning", "format": "json"},
    }
    for k, v in over.items():
        doc.setdefault(k, {}).update(v)
    return doc


async def send(
    host: str, port: int, mail_from: str, rcpts: list[str], data: bytes, source: str | None = None
) -> tuple[dict[str, Any], str]:
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        start_tls=False,
        timeout=10,
        source_address=(source, 0) if source else None,
    )
    async with client:
        errors, reply = await client.sendmail(mail_from, rcpts, data)
    return dict(errors), reply


def message(
    subject: str = "hello",
    body: str = "hi there",
    frm: str = "alice@sender.test",
    to: str = "bob@dest.test",
    msgid: str = "<m1@sender.test>",
) -> bytes:
    return (
        f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
        f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n"
    ).encode()
