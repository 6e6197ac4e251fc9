"""`relay list ...` over a real store: add, members --json, show, remove, held,
approve/reject of an unknown id, archive as mbox (mboxrd quoting)."""

from __future__ import annotations

import asyncio
import json
import mailbox
from pathlib import Path

import pytest

from relay.cli import main
from relay.config import dump_toml, load_config
from relay.lists import members as db
from relay.lists.tx import lists_db
from relay.store import Store

LIST = "dev@lists.example.org"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "config.toml"
    doc = {
        "storage": {"path": str(tmp_path / "s.sqlite3")},
        "lists": {LIST: {"owners": ["owner@example.org"], "name": "Developers"}},
        "lists_http": {"base_url": "https://lists.example.org"},
        "arc": {"enabled": False},
    }
    p.write_text(dump_toml(doc))
    return p


def test_members_add_show_remove(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "add", LIST, "b@One.test", "c@two.test", "--config", str(cfg)]) == 0
    assert main(["list", "add", LIST, "nope", "--config", str(cfg)]) == 2
    capsys.readouterr()
    assert main(["list", "members", LIST, "--json", "--config", str(cfg)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["address"], r["state"], r["bounce_score"]) for r in rows] == [
        ("b@one.test", "active", 0.0),
        ("c@two.test", "active", 0.0),
    ]
    assert rows[0]["since"].endswith("Z")
    assert main(["list", "show", LIST, "--json", "--config", str(cfg)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["members"] == {"active": 2, "disabled": 0, "pending": 0}
    assert shown["name"] == "Developers" and shown["held"] == 0
    assert shown["fanouts"] == []
    assert main(["list", "remove", LIST, "b@one.test", "--config", str(cfg)]) == 0
    assert main(["list", "remove", LIST, "b@one.test", "--config", str(cfg)]) == 1
    assert main(["list", "held", LIST, "--json", "--config", str(cfg)]) == 0
    assert main(["list", "approve", LIST, "deadbeef", "--config", str(cfg)]) == 1
    assert main(["list", "reject", LIST, "deadbeef", "--config", str(cfg)]) == 1
    assert main(["list", "members", "other@lists.example.org", "--config", str(cfg)]) == 2


def test_archive_mbox(cfg: Path, tmp_path: Path) -> None:
    assert main(["list", "add", LIST, "b@one.test", "--config", str(cfg)]) == 0
    store = Store(load_config(cfg).storage.path).open()
    ldb = lists_db(store)

    async def put() -> None:
        body = b"From: A <a@x.test>\r\nSubject: one\r\n\r\nFrom here on\r\n>From quoted\r\n"
        await ldb.write(lambda c: db.archive(c, LIST, "a@x.test", body, 1.8e9))
        await ldb.write(
            lambda c: db.archive(c, LIST, "a@x.test", b"Subject: two\r\n\r\nx\r\n", 1.8e9)
        )

    try:
        asyncio.run(put())
    finally:
        store.close()
    out = tmp_path / "a.mbox"
    assert main(["list", "archive", LIST, "--out", str(out), "--config", str(cfg)]) == 0
    box = mailbox.mbox(str(out))
    msgs = list(box)
    assert [m["Subject"] for m in msgs] == ["one", "two"]
    assert b"\n>From here on\n>>From quoted\n" in out.read_bytes()
