"""The commands that read the MTA-STS cache, the TLS-RPT ledger and the queue, on
``[storage] url``: ``relay sts cache``, ``relay tlsrpt preview``, ``relay diagnose
--queue-id`` read what the nodes wrote to PostgreSQL; a database without those tables is
named in one line."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from relay import pgschema
from relay.cli import main as cli_main
from relay.model import PolicyType, TlsOutcome
from relay.mtasts.cache import CachedPolicy, open_cache
from relay.mtasts.policy import parse_policy
from relay.pgstore import PgStore
from relay.queue.pgspool import PgSpool
from relay.queue.spool import NewMessage
from relay.tlsrpt.ledger import open_ledger

POLICY = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"


def config(tmp_path: Path, url: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n[server]\nhostname = "relay.lab.test"\n')
    return str(path)


async def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = await asyncio.to_thread(cli_main, argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


async def test_sts_cache_tlsrpt_preview_and_diagnose_read_postgresql(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(now - 86400))
    async with PgStore(pg_url, os.environ["RELAY_DB_PASSWORD"]) as pg:
        await pgschema.migrate_all(pg)
        cp = CachedPolicy("example.com", "v1", parse_policy(POLICY), now, now, now + 86400)
        await open_cache(pg).put(cp)
        ledger = open_ledger(pg, lambda: now - 86400, owner="node-a")
        for _ in range(4):
            ledger.record(TlsOutcome("dest.test", PolicyType.NO_POLICY_FOUND, "mx.dest.test",
                                     "192.0.2.1", sending_mta_ip="198.51.100.1"))  # fmt: skip
        await ledger.flush()
        spool = await PgSpool.open(pg, node_id="node-a")
        qid = await spool.enqueue(
            NewMessage("a@src.test", ("b@dest.test",), b"Subject: hi\r\n\r\nbody\r\n", ())
        )
    cfg = config(tmp_path, pg_url)

    rc, out, err = await run(["sts", "cache", "--config", cfg, "--json"], capsys)
    assert rc == 0, err
    [row] = json.loads(out)
    assert (row["domain"], row["id"], row["mode"], row["mx"]) == (
        "example.com",
        "v1",
        "enforce",
        ["mx.example.com"],
    )

    rc, out, err = await run(["tlsrpt", "preview", "--config", cfg, "--day", yesterday], capsys)
    assert rc == 0, err
    report = json.loads(out.splitlines()[0])
    [pol] = report["policies"]
    assert pol["policy"]["policy-domain"] == "dest.test"
    assert pol["summary"]["total-successful-session-count"] == 4

    rc, out, err = await run(["diagnose", "--queue-id", qid, "--config", cfg, "--json"], capsys)
    assert "no queued message" not in err and "does not exist" not in err, err
    assert json.loads(out)  # the stored message was found and diagnosed
    assert not list(tmp_path.rglob("*.sqlite3"))


async def test_a_database_without_the_tables_is_named_in_one_line(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, pg_url)  # a fresh database: `relay db migrate` never ran
    for argv, component in (
        (["sts", "cache"], "mtasts"),
        (["tlsrpt", "preview", "--day", "2026-01-01"], "tlsrpt"),
    ):
        rc, _out, err = await run([*argv, "--config", cfg], capsys)
        last = err.splitlines()[-1]  # (preview warns first that no DKIM key is configured)
        assert rc == 2, err
        assert last.startswith(f"relay: no {component} tables in postgresql://"), err
        assert "relay db migrate" in last
