"""Shared test helpers: write a config.toml, run a relay in-process, send mail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiosmtplib

from relay.config import Config, load_config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, doc: dict[str, dict[str, Any]]) -> Config:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        for k, v in table.items():
            key = json.dumps(k) if not k.replace("_", "").isalnum() else k
            lines.append(f"{key} = {_toml_value(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return load_config(path)


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
