"""SIGHUP on a running `relay serve` with two workers: aliases and trusted networks change
without a restart in every worker; an invalid new config is refused and the old one kept;
a key that needs a restart is named."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.test_crash import free_port, wait_listening
from tests.e2e.test_workers import _wait_children, _wait_log
from tests.labutil import base_doc, write_config

pytestmark = pytest.mark.slow


async def _rcpt(port: int, rcpt: str) -> int:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    async with client:
        await client.mail("a@sender.test")
        try:
            return (await client.rcpt(rcpt)).code
        except aiosmtplib.SMTPRecipientRefused as exc:
            return exc.code


async def test_sighup_reloads_aliases_keeps_the_old_config_when_invalid(tmp_path: Path) -> None:
    doc: dict[str, dict[str, Any]] = base_doc(tmp_path, "127.0.0.1:53", 25)
    port = free_port()
    doc["server"].update({"listen": [f"127.0.0.1:{port}"], "workers": 2})
    doc["logging"].update({"level": "info", "format": "json"})
    doc["aliases"] = {"old@lists.lab.test": ["bob@dest.test"]}
    cfg = tmp_path / "config.toml"
    write_config(cfg, doc)
    log = tmp_path / "relay.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_listening(port)
        kids = await _wait_children(proc.pid, 2)
        await _wait_log(log, '"event": "started"', 2)
        assert await _rcpt(port, "new@lists.lab.test") == 550
        doc["aliases"] = {"new@lists.lab.test": ["bob@dest.test"]}
        doc["server"]["max_recipients"] = 7  # needs a restart
        write_config(cfg, doc)
        proc.send_signal(signal.SIGHUP)
        done = [json.loads(x) for x in await _wait_log(log, '"event": "reloaded"', 2)]
        assert sorted(d["worker"] for d in done) == [0, 1]
        assert all(d["changed"] == ["aliases"] for d in done), done
        restart = [json.loads(x) for x in await _wait_log(log, "reload_needs_restart", 2)]
        assert all(r["keys"] == ["server.max_recipients"] for r in restart)
        for _ in range(4):  # whichever worker answers
            assert await _rcpt(port, "new@lists.lab.test") == 250
            assert await _rcpt(port, "old@lists.lab.test") == 550
        cfg.write_text("[server\nbroken")
        proc.send_signal(signal.SIGHUP)
        failed = [json.loads(x) for x in await _wait_log(log, "reload_failed", 2)]
        assert all("not valid TOML" in f["error"] for f in failed), failed
        await asyncio.sleep(0.2)
        assert proc.poll() is None and sorted(await _wait_children(proc.pid, 2)) == sorted(kids)
        for _ in range(4):
            assert await _rcpt(port, "new@lists.lab.test") == 250  # the old config kept
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_what_is_reloaded_and_what_needs_a_restart(tmp_path: Path) -> None:
    from relay.reload import differences, merged

    doc = base_doc(tmp_path, "127.0.0.1:53", 25)
    old = write_config(tmp_path / "a.toml", doc)
    doc["relay"]["trusted_networks"] = ["127.0.0.1/32", "10.0.0.0/8"]
    doc["delivery"]["retry_first"] = 60
    new = write_config(tmp_path / "a.toml", doc)
    changed, restart = differences(old, new)
    assert changed == ["relay.trusted_networks"] and restart == ["delivery.retry_first"]
    running = merged(old, new)
    assert running.relay == new.relay and running.delivery == old.delivery


def _list_signature(data: bytes) -> tuple[int, dict[bytes, bytes]]:
    """(index, tags) of the list domain's DKIM-Signature of a copy."""
    import email

    import dkim

    sigs = email.message_from_bytes(data).get_all("DKIM-Signature") or []
    tags = [dkim.util.parse_tag_value(s.encode()) for s in sigs]
    i = next(i for i, t in enumerate(tags) if t[b"d"] == b"lists.lab.test")
    return i, tags[i]


async def test_sighup_reloads_lists_and_dkim_keys_in_every_worker(tmp_path: Path) -> None:
    """A list added by SIGHUP is taken at RCPT by every worker; a new [[dkim.sign]] key
    (new file, new selector) signs the next list copies and they verify; a key file that
    cannot be read keeps the running config (one error line per process) and a worker
    restarted after that starts with the reloaded config, not the one of the start."""
    import dkim

    from relay.auth.dkim import DkimSigner
    from relay.cli import main as cli
    from relay.lab.mta import LabMta
    from tests.e2e.test_metrics import free_port as _free
    from tests.labutil import send
    from tests.lists.listlab import AUTHOR_IP, LIST, MEMBER_IPS, ListLab, post

    lab = ListLab(tmp_path)
    mtas: dict[str, LabMta] = {}
    mx_port = 0
    for dom, ip in MEMBER_IPS.items():
        mtas[dom] = await LabMta(ip, mx_port, hostname=f"mx.{dom}").start()
        mx_port = mtas[dom].port
    port = _free()
    doc = lab.doc(mx_port, smtp_port=port, http_port=_free())
    doc["server"]["workers"] = 2
    doc["logging"].update({"level": "info", "format": "json"})
    cfg = tmp_path / "config.toml"
    write_config(cfg, doc)
    members = ["b@one.test", "c@two.test", "d@three.test"]
    assert cli(["list", "add", LIST, *members, "--config", str(cfg)]) == 0
    log = tmp_path / "relay.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    author = DkimSigner("author.test", "s1", lab.author_key)

    async def copies(subject: str) -> list[bytes]:
        data = author.sign(post("alice@author.test", LIST, subject=subject))
        await send("127.0.0.1", port, "alice@author.test", [LIST], data, source=AUTHOR_IP)
        async with asyncio.timeout(30):
            while True:
                got = [
                    m.data
                    for mta in mtas.values()
                    for m in mta.messages
                    if f"Subject: [dev] {subject}".encode() in m.data
                ]
                if len(got) == 3:
                    return got
                await asyncio.sleep(0.05)

    try:
        await wait_listening(port)
        kids = await _wait_children(proc.pid, 2)
        await _wait_log(log, '"event": "started"', 2)
        assert await _rcpt(port, "new@lists.lab.test") == 550
        assert {_list_signature(c)[1][b"s"] for c in await copies("one")} == {b"s2026"}

        new_key = lab.publish("s2027", "lists.lab.test")
        (tmp_path / "list2027.pem").write_bytes(new_key)
        doc["lists"]["new@lists.lab.test"] = {"owners": ["owner@one.test"], "posting": "anyone"}
        doc["dkim"]["sign"][0].update(
            {"selector": "s2027", "private_key": str(tmp_path / "list2027.pem")}
        )
        write_config(cfg, doc)
        proc.send_signal(signal.SIGHUP)
        done = [json.loads(x) for x in await _wait_log(log, '"event": "reloaded"', 2)]
        assert sorted(d["worker"] for d in done) == [0, 1]
        for d in done:
            assert d["changed"] == ['lists."new@lists.lab.test"', "dkim.sign"], d
            assert d["keys"] == ["arc.private_key", "dkim.sign[0].private_key"], d
        for _ in range(4):  # whichever worker answers
            assert await _rcpt(port, "new@lists.lab.test") == 250
        for data in await copies("two"):
            i, tags = _list_signature(data)
            assert tags[b"s"] == b"s2027"
            assert dkim.DKIM(data).verify(idx=i, dnsfunc=lab.txt)

        # a key that cannot be loaded: the running config stays, one error line in each
        # process (a rotation gone wrong: the file cut short)
        (tmp_path / "broken.pem").write_bytes(new_key[:200])
        doc["dkim"]["sign"][0]["private_key"] = str(tmp_path / "broken.pem")
        doc["lists"]["other@lists.lab.test"] = {"owners": ["owner@one.test"]}
        write_config(cfg, doc)
        proc.send_signal(signal.SIGHUP)
        failed = [json.loads(x) for x in await _wait_log(log, "reload_failed", 2)]
        await asyncio.sleep(0.5)
        assert len([x for x in log.read_text().splitlines() if "reload_failed" in x]) == 2
        for f in failed:
            assert f["level"] == "error" and "dkim.sign[0].private_key" in f["error"], f
        assert await _rcpt(port, "other@lists.lab.test") == 550
        assert {_list_signature(c)[1][b"s"] for c in await copies("three")} == {b"s2027"}

        # a worker dies: the workers started again run the reloaded config
        os.kill(kids[0], signal.SIGKILL)
        await _wait_log(log, '"event": "started"', 4, timeout=30)
        await wait_listening(port)
        for _ in range(4):
            assert await _rcpt(port, "new@lists.lab.test") == 250
        assert {_list_signature(c)[1][b"s"] for c in await copies("four")} == {b"s2027"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for m in mtas.values():
            await m.stop()
        lab.close()


def test_lists_reload_only_where_the_list_service_runs(tmp_path: Path) -> None:
    """A changed or added list is reloaded where lists ran from the start; the first list
    of a relay started without any needs a restart, and its domain is not made local
    before then (mail for it is refused as before, not half taken)."""
    from relay.reload import differences, merged

    doc = base_doc(tmp_path, "127.0.0.1:53", 25)
    bare = write_config(tmp_path / "a.toml", doc)
    doc["lists"] = {"dev@lists.new.test": {"owners": ["o@x.test"]}}
    doc["lists_http"] = {"base_url": "https://lists.new.test"}
    listed = write_config(tmp_path / "a.toml", doc)
    changed, restart = differences(bare, listed, lists_live=False)
    assert changed == []
    assert restart == ["relay.local_domains", 'lists."dev@lists.new.test"', "lists_http.base_url"]
    running = merged(bare, listed, lists_live=False)
    assert running.lists == {} and running.relay.local_domains == bare.relay.local_domains
    doc["lists"]["ops@lists.new.test"] = {"owners": ["o@x.test"], "posting": "anyone"}
    doc["lists"]["dev@lists.new.test"]["posting"] = "moderated"
    more = write_config(tmp_path / "a.toml", doc)
    changed, restart = differences(listed, more)
    assert changed == ['lists."dev@lists.new.test"', 'lists."ops@lists.new.test"'] and not restart
    assert merged(listed, more).lists == more.lists
