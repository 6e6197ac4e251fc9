"""`relay db copy --from sqlite:PATH --to postgresql://...`: a SQLite queue of 1,000
messages in every state (queued, deferred, in flight, held, failed with its DSN owed,
delivered ones gone with their history kept; DSN parameters and stored envelopes), the
lists and the ARC replay counters copied into PostgreSQL; `relay queue list --json`
(all, and `--state held`) and `relay queue log --json` the same on both sides, except the
leases: a recipient in flight is queued again, due now, as the SQLite relay's own start
does. Refused, in one line (exit 2), while a relay holds the SQLite store, while a node
of the target has a recent heartbeat, and when the target already holds data (unless
--force, which replaces it); a row that cannot be copied rolls back the whole copy (the
target stays empty)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main as cli_main
from relay.lists import members as lists_db
from relay.lists.tx import lists_db as lists_store
from relay.model import RecipientState
from relay.pgstore import PgStore
from relay.queue.spool import NewMessage, RecipientUpdate, Spool
from relay.store import Store
from relay.storelock import StoreLock
from tests.pg.pgcluster import PASSWORD

N = 1000
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def msg(i: int) -> NewMessage:
    data = (
        f"From: a@sender.test\r\nMessage-ID: <m{i}@sender.test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n"
    )
    rcpts = (f"r{i}a@dest.test", f"r{i}b@other.test")
    return NewMessage(
        "a@sender.test",
        rcpts,
        data.encode(),
        rcpts,
        client_ip="192.0.2.7",
        helo="client.test",
        env_from="a@sender.test",
        notify=("SUCCESS,FAILURE", ""),
        orcpts=(f"rfc822;r{i}a@dest.test", ""),
        ret="HDRS",
        envid=f"env{i}",
    )


async def build_store(path: Path) -> dict[str, int]:
    """The SQLite store of the test; returns how many messages of each kind it holds."""
    clock = Clock()
    store = Store(path).open()
    try:
        spool = Spool(store, clock, owner="node-sqlite:1:x")
        ids = [await spool.enqueue(msg(i), f"Q{i:04d}") for i in range(N)]
        kinds = {"queued": 0, "deferred": 0, "inflight": 0, "held": 0, "failed": 0, "gone": 0}
        clock.t += 10
        for i, qid in enumerate(ids):
            r = msg(i).recipients
            kind = ("queued", "deferred", "inflight", "held", "failed", "gone")[i % 6]
            kinds[kind] += 1
            if kind == "queued":
                continue
            if kind == "held":
                await spool.hold([qid])
                continue
            assert await spool.claim(qid, r) == r
            if kind == "inflight":
                continue
            if kind == "deferred":
                ups = [
                    RecipientUpdate(a, RecipientState.DEFERRED, "451 later", T0 + 600) for a in r
                ]
            elif kind == "failed":
                ups = [
                    RecipientUpdate(r[0], RecipientState.FAILED, "550 no such user", mx_host="mx"),
                    RecipientUpdate(r[1], RecipientState.DEFERRED, "421 busy", T0 + 300),
                ]
            else:
                ups = [
                    RecipientUpdate(a, RecipientState.DELIVERED, "250 ok", tls="TLSv1.3") for a in r
                ]
            await spool.record(qid, ups)
        # the lists and the ARC replay counters
        ldb = lists_store(store)
        lists_db.open_tables(store)
        await ldb.write(lambda c: lists_db.add_member(c, "dev@lists.test", "m1@one.test", T0))
        await ldb.write(lambda c: lists_db.archive(c, "dev@lists.test", "a@x", b"post", T0))
        await ldb.write(lambda c: lists_db.archive(c, "dev@lists.test", "a@x", b"two", T0, "P2"))
        from relay.auth import replay

        store.migrate("arc_replay", replay.MIGRATIONS)
        store.write_sync(
            lambda c: c.execute(
                "INSERT INTO arc_replay_sealer(sealer, hour, overrides) VALUES('fwd.test', 7, 3)"
            )
        )
    finally:
        store.close()
    return kinds


def write_configs(tmp_path: Path, db: Path, url: str) -> tuple[str, str]:
    sq, pg = tmp_path / "sqlite.toml", tmp_path / "pg.toml"
    sq.write_text(f'[storage]\npath = "{db}"\n')
    pg.write_text(f'[storage]\nurl = "{url}"\n')
    return str(sq), str(pg)


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = await asyncio.to_thread(cli_main, list(argv))
    got = capsys.readouterr()
    return rc, got.out, got.err


def without_leases(listing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The SQLite listing as it reads after the copy: a recipient in flight queued again
    (due now), no lease on any row."""
    for m in listing:
        for r in m["recipients"]:
            if r["state"] == "inflight":
                r["state"], r["next_attempt"] = "queued", None
            r["lease_owner"], r["lease_expiry"] = "", None
    return listing


async def node_alive(url: str, node_id: str, owner: str) -> None:
    """A node of the database with a heartbeat now (a running relay, to the copy)."""
    async with PgStore(url, PASSWORD, pool_size=1) as store:
        await store.write(
            lambda c: c.execute(
                "INSERT INTO relay_nodes(owner, node_id, started, heartbeat)"
                " VALUES($1, $2, $3, $3)",
                owner,
                node_id,
                time.time(),
            )
        )


async def count(url: str, table: str) -> int:
    async with PgStore(url, PASSWORD, pool_size=1) as store:
        if await store.schema_version("queue") == 0:
            return 0
        return int(await store.read(lambda c: c.fetchval(f"SELECT count(*) FROM {table}")))


async def test_a_queue_in_every_state_is_copied_without_loss(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.sqlite3"
    kinds = await build_store(db)
    sq, pg = write_configs(tmp_path, db, pg_url)
    src, dst = f"sqlite:{db}", pg_url

    # a row PostgreSQL cannot take (a damaged history line): nothing at all is copied
    bad = tmp_path / "bad.sqlite3"
    shutil.copy(db, bad)
    with sqlite3.connect(bad) as conn:
        conn.execute(
            "UPDATE queue_log SET at='yesterday' WHERE rowid=(SELECT max(rowid) FROM queue_log)"
        )
    rc, out, err = await run(capsys, "db", "copy", "--from", f"sqlite:{bad}", "--to", dst)
    assert rc == 2 and err.count("\n") == 1, err
    assert "queue_log row" in err and "nothing was copied" in err
    assert await count(pg_url, "queue_messages") == 0  # copied before the log: rolled back

    # a relay holds the SQLite store: refused
    lock = StoreLock(db).acquire()
    try:
        rc, out, err = await run(capsys, "db", "copy", "--from", src, "--to", dst)
    finally:
        lock.release()
    assert rc == 2 and err.count("\n") == 1 and "in use by another relay" in err, err

    started = time.monotonic()
    rc, out, err = await run(capsys, "db", "copy", "--from", src, "--to", dst)
    elapsed = time.monotonic() - started
    assert rc == 0, err
    assert f"queue_messages: {N - kinds['gone']} rows" in out
    assert (
        "queue_log:" in out and "list_members: 1 rows" in out and "arc_replay_sealer: 1 rows" in out
    )
    assert out.splitlines()[-1].startswith(
        f"copied sqlite:{db} to {pg_url}: {N - kinds['gone']} messages"
    )
    with capsys.disabled():  # the figure in the report (-s shows it)
        print(f"\n{out}relay db copy took {elapsed:.2f} s")

    rc, sq_out, err = await run(capsys, "queue", "list", "--json", "--config", sq)
    assert rc == 0, err
    rc, pg_out, err = await run(capsys, "queue", "list", "--json", "--config", pg)
    assert rc == 0, err
    sq_list, pg_list = without_leases(json.loads(sq_out)), json.loads(pg_out)
    assert len(pg_list) == N - kinds["gone"]
    assert pg_list == sq_list
    states = {r["state"] for m in pg_list for r in m["recipients"]}
    assert states == {"queued", "deferred", "failed"}
    assert sum(r["dsn_owed"] for m in pg_list for r in m["recipients"]) == kinds["failed"]
    for args in (["--state", "held"], ["--domain", "other.test"]):
        rc, a, _ = await run(capsys, "queue", "list", "--json", *args, "--config", sq)
        rc, b, _ = await run(capsys, "queue", "list", "--json", *args, "--config", pg)
        assert json.loads(b) and without_leases(json.loads(a)) == json.loads(b)
    for qid in ("Q0004", "Q0005", "Q0002"):  # failed, gone (history only), in flight
        rc, a, _ = await run(capsys, "queue", "log", qid, "--json", "--config", sq)
        rc2, b, _ = await run(capsys, "queue", "log", qid, "--json", "--config", pg)
        assert rc == rc2 == 0 and json.loads(a) == json.loads(b) and json.loads(a)
    rc, a, _ = await run(capsys, "queue", "show", "Q0003", "--json", "--config", sq)
    rc, b, _ = await run(capsys, "queue", "show", "Q0003", "--json", "--config", pg)
    assert json.loads(a)["held"] is True and without_leases([json.loads(a)]) == [json.loads(b)]
    async with PgStore(pg_url, PASSWORD, pool_size=1) as store:
        ldb = lists_store(store)
        assert [
            m.address for m in await ldb.read(lambda c: lists_db.members(c, "dev@lists.test"))
        ] == ["m1@one.test"]
        page, total = await ldb.read(lambda c: lists_db.archive_page(c, "dev@lists.test", 10, 0))
        assert total == 2 and [p.id for p in page] == ["P2", "a1"]
        # the archive's sequence continues after the copied rows
        await ldb.write(lambda c: lists_db.archive(c, "dev@lists.test", "a@x", b"3", T0))
        page, _ = await ldb.read(lambda c: lists_db.archive_page(c, "dev@lists.test", 1, 0))
        assert page[0].id == "a3"

    # the target holds mail now: refused; --force replaces it with the same rows
    rc, out, err = await run(capsys, "db", "copy", "--from", src, "--to", dst)
    assert rc == 2 and err.count("\n") == 1 and "already holds data" in err and "--force" in err
    rc, out, err = await run(capsys, "db", "copy", "--from", src, "--to", dst, "--force")
    assert rc == 0 and "rows replaced (--force)" in out, err
    rc, pg_again, _ = await run(capsys, "queue", "list", "--json", "--config", pg)
    assert json.loads(pg_again) == pg_list

    # a node of the target is alive (a recent heartbeat): refused, even with --force
    await node_alive(pg_url, "b", "b:1:x")
    rc, out, err = await run(capsys, "db", "copy", "--from", src, "--to", dst, "--force")
    assert rc == 2 and err.count("\n") == 1 and "a relay runs on" in err and "b (b:1:x)" in err


async def test_a_postgresql_store_is_copied_back_to_sqlite(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """From several nodes back to one: SQLite → PostgreSQL → a new SQLite store reads
    the same (`queue list`, `--state held`, `queue log`, `queue show`, the lists, the ARC
    counters), a recipient in flight queued again; refused while a node runs, onto an
    existing file without --force, and a failure leaves no file behind."""
    db = tmp_path / "relay.sqlite3"
    kinds = await build_store(db)
    sq, _pg = write_configs(tmp_path, db, pg_url)
    rc, _out, err = await run(capsys, "db", "copy", "--from", f"sqlite:{db}", "--to", pg_url)
    assert rc == 0, err
    # a dead node's lease on the recipients of Q0002 (in flight in the SQLite original)
    async with PgStore(pg_url, PASSWORD, pool_size=1) as store:
        status = await store.write(
            lambda c: c.execute(
                "UPDATE queue_recipients SET state='inflight', lease_owner='dead:1:x',"
                " lease_expiry=$1, next_attempt=$1 WHERE qid='Q0002'",
                time.time() + 600,
            )
        )
        assert status != "UPDATE 0"
    back = tmp_path / "back.sqlite3"
    bq = tmp_path / "back.toml"
    bq.write_text(f'[storage]\npath = "{back}"\n')

    rc, out, err = await run(capsys, "db", "copy", "--from", pg_url, "--to", f"sqlite:{back}")
    assert rc == 0, err
    assert f"queue_messages: {N - kinds['gone']} rows" in out and "list_members: 1 rows" in out
    assert out.splitlines()[-1] == (
        f"copied {pg_url} to sqlite:{back}: {N - kinds['gone']} messages"
    )
    assert sorted(p.name for p in tmp_path.glob(".back*")) == []  # no temporary left
    for args in ([], ["--state", "held"], ["--domain", "other.test"]):
        rc, a, _ = await run(capsys, "queue", "list", "--json", *args, "--config", sq)
        rc2, b, err = await run(capsys, "queue", "list", "--json", *args, "--config", str(bq))
        assert rc == rc2 == 0, err
        assert json.loads(b) and without_leases(json.loads(a)) == json.loads(b)
    for qid in ("Q0004", "Q0005", "Q0002"):
        rc, a, _ = await run(capsys, "queue", "log", qid, "--json", "--config", sq)
        rc2, b, _ = await run(capsys, "queue", "log", qid, "--json", "--config", str(bq))
        assert rc == rc2 == 0 and json.loads(a) == json.loads(b) and json.loads(a)
    rc, a, _ = await run(capsys, "queue", "show", "Q0003", "--raw", "--config", sq)
    rc2, b, _ = await run(capsys, "queue", "show", "Q0003", "--raw", "--config", str(bq))
    assert rc == rc2 == 0 and a == b and a
    with sqlite3.connect(back) as conn:
        assert conn.execute("SELECT count(*) FROM arc_replay_sealer").fetchone() == (1,)
        assert conn.execute("SELECT address FROM list_members").fetchall() == [("m1@one.test",)]
        assert conn.execute("SELECT count(*) FROM list_archive").fetchone() == (2,)
        versions = dict(conn.execute("SELECT component, version FROM schema_version"))
    assert {"queue", "lists", "arc_replay", "mtasts", "tlsrpt"} <= set(versions)

    # the file exists now: refused; --force replaces it
    rc, out, err = await run(capsys, "db", "copy", "--from", pg_url, "--to", f"sqlite:{back}")
    assert rc == 2 and err.count("\n") == 1 and "exists" in err and "--force" in err, err
    rc, out, err = await run(
        capsys, "db", "copy", "--from", pg_url, "--to", f"sqlite:{back}", "--force"
    )
    assert rc == 0, err
    # a node of the source is alive: refused, and no file is made
    await node_alive(pg_url, "b", "b:1:x")
    fresh = tmp_path / "fresh.sqlite3"
    rc, out, err = await run(capsys, "db", "copy", "--from", pg_url, "--to", f"sqlite:{fresh}")
    assert rc == 2 and err.count("\n") == 1 and "a relay runs on" in err, err
    assert not fresh.exists() and list(tmp_path.glob(".fresh*")) == []


async def test_bad_arguments_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "none.sqlite3"
    for argv, said in (
        (["--from", f"sqlite:{db}", "--to", "postgresql://u@h/d"], "does not exist"),
        (["--from", str(db), "--to", "postgresql://u@h/d"], "--from must be sqlite:PATH"),
    ):
        rc, _, err = await run(capsys, "db", "copy", *argv)
        assert rc == 2 and err.count("\n") == 1 and said in err, err
    db.write_bytes(b"")
    rc, _, err = await run(
        capsys, "db", "copy", "--from", f"sqlite:{db}", "--to", "postgresql://u:pw@h/d"
    )
    assert rc == 2 and "must not hold a password" in err and "pw" not in err.replace("password", "")
