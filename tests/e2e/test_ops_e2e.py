"""The operator's commands against a running relay (issue 15): a message the relay accepted
and sealed, deferred by the next hop, diagnosed from the queue with its stored envelope
(the relay's own seal, whose key is not in DNS, reported as such), held, requeued,
delivered, and its history still shown by `relay queue log` after it left the queue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main
from relay.logs import setup
from tests.e2e.test_auth_e2e import SENDER_IP, AuthLab
from tests.labutil import send


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[AuthLab]:
    setup("warning", "json")  # the in-process relay logs on stderr, not in stdout
    lab = AuthLab(tmp_path)
    yield lab
    await lab.close()


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = await asyncio.to_thread(main, list(argv))
    return code, capsys.readouterr().out


async def _recipients(capsys: pytest.CaptureFixture[str], cfg: str) -> list[dict[str, Any]]:
    code, out = await _cli(capsys, "queue", "list", "--json", "--config", cfg)
    assert code == 0
    return [r for m in json.loads(out) for r in m["recipients"]]


def _raw(cfg: str, qid: str) -> bytes:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "relay", "queue", "show", qid, "--raw", "--config", cfg],
        check=True,
        capture_output=True,
    ).stdout


async def _until(capsys: pytest.CaptureFixture[str], cfg: str, state: str) -> None:
    for _ in range(200):
        if [r["state"] for r in await _recipients(capsys, cfg)] == [state]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"recipient never {state}: {await _recipients(capsys, cfg)}")


async def test_queued_message_diagnosed_steered_and_logged(
    lab: AuthLab, capsys: pytest.CaptureFixture[str]
) -> None:
    mx = await lab.mta("127.0.0.2")
    mx.refuse_rcpt("bob@dest.test", "451 4.2.0 mailbox busy, try later")
    app = await lab.relay(
        "relay1", "127.0.0.1:0", aliases={"info@lists.lab.test": ["bob@dest.test"]}
    )
    lab.zone.remove("arc._domainkey.relay1.lab.test")  # the seal's key is not published
    cfg = str(app.config.path)
    host, port = app.bound[0]
    data = lab.signed(frm="alice@sender.test", to="info@lists.lab.test")
    errors, reply = await send(
        host, port, "alice@sender.test", ["info@lists.lab.test"], data, source=SENDER_IP
    )
    assert errors == {}
    qid = reply.rsplit(" ", 1)[1]
    await _until(capsys, cfg, "deferred")

    # diagnose the queued copy with the envelope it arrived with: it passes, and the
    # relay's own seal is named, its missing key reported, not called an ARC failure
    code, out = await _cli(capsys, "diagnose", "--queue-id", qid, "--config", cfg, "--json")
    verdict = json.loads(out)
    assert code == 0, verdict
    assert verdict["spf"]["result"] == "pass"  # the stored client IP and MAIL FROM
    assert verdict["dmarc"]["result"] == "pass"
    assert verdict["arc"] == {"cv": "none", "instances": 0}  # as the relay received it
    assert verdict["own_seal"] == {
        "instance": 1,
        "domain": "relay1.lab.test",
        "selector": "arc",
        "key_in_dns": False,
    }
    code, text = await _cli(capsys, "diagnose", "--queue-id", qid, "--config", cfg)
    assert code == 0 and "The relay would accept this message." in text
    assert "own seal" in text and "not in DNS at arc._domainkey.relay1.lab.test" in text
    assert "ARC fail (" not in text
    # the same bytes as a file (queue show --raw): no envelope, still our seal set aside
    raw = Path(cfg).parent / "queued.eml"
    code, _ = await _cli(capsys, "queue", "show", qid, "--raw", "--config", cfg)
    assert code == 0
    raw.write_bytes(await asyncio.to_thread(_raw, cfg, qid))
    code, out = await _cli(capsys, "diagnose", str(raw), "--config", cfg, "--json")
    assert code == 0 and json.loads(out)["own_seal"]["key_in_dns"] is False
    assert json.loads(out)["spf"]["result"] == "none"  # no client IP without --queue-id
    code, _ = await _cli(capsys, "diagnose", "--queue-id", "NOSUCH", "--config", cfg)
    assert code == 2

    # hold: a flush does not send it; requeue: it goes now and is delivered
    mx.script.rcpt_replies.clear()
    assert (await _cli(capsys, "queue", "hold", qid, "--config", cfg))[0] == 0
    assert (await _cli(capsys, "queue", "flush", "--config", cfg))[0] == 0
    await asyncio.sleep(0.5)
    assert mx.messages == [] and [r["state"] for r in await _recipients(capsys, cfg)] == [
        "deferred"
    ]
    assert (await _cli(capsys, "queue", "requeue", qid, "--config", cfg))[0] == 0
    [got] = await mx.wait_for(1)
    assert got.rcpt_tos == ("bob@dest.test",)
    for _ in range(100):
        if not await _recipients(capsys, cfg):
            break
        await asyncio.sleep(0.05)
    assert await _recipients(capsys, cfg) == []  # delivered and gone from the queue

    code, out = await _cli(capsys, "queue", "log", qid, "--config", cfg, "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["event"] for r in rows] == [
        "received",
        "deferred",
        "held",
        "requeued",
        "delivered",
        "removed",
    ]
    assert (
        f"client=[{SENDER_IP}]" in rows[0]["reply"]
        and "from=<alice@sender.test>" in rows[0]["reply"]
    )
    assert rows[1]["recipient"] == "bob@dest.test" and "451 4.2.0" in rows[1]["reply"]
    assert rows[4]["mx_host"] and rows[4]["reply"].startswith("250")
    assert rows[4]["tls"] == "none"  # the lab MX offers no STARTTLS
