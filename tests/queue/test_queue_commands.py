"""The operator's queue commands over a real store — each over both stores (SQLite, and
PostgreSQL on the throwaway cluster): hold/release/requeue, delete --all, flush --domain,
show --raw, list paged and filtered, the message history; on SQLite also the listing in
one query, space reclaimed as the queue drains, the default config path, --version and
config show/check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main
from relay.config import load_config, write_config
from relay.model import RecipientState
from relay.pgstore import PgStore
from relay.queue.base import QueueSpool
from relay.queue.pgspool import PgSpool
from relay.queue.spool import ListFilter, NewMessage, RecipientUpdate, Spool
from relay.store import Store


def _doc(tmp: Path, url: str = "") -> dict[str, dict[str, Any]]:
    return {
        "server": {"listen": ["127.0.0.1:0"], "hostname": "relay.lab.test"},
        "storage": {"url": url} if url else {"path": str(tmp / "relay.sqlite3")},
        "mta_sts": {"enabled": False},
        "tlsrpt": {"enabled": False},
        "arc": {"enabled": False},
        "srs": {"enabled": True, "domain": "srs.lab.test", "secret": "not-the-shipped-one"},
    }


def _msg(i: int, *rcpts: str) -> NewMessage:
    data = f"From: a@x.test\r\nMessage-ID: <{i}@x.test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n"
    return NewMessage(
        "a@x.test",
        rcpts,
        data.encode(),
        client_ip="192.0.2.9",
        helo="mail.x.test",
        env_from="A@x.test",
    )


@contextlib.asynccontextmanager
async def spool_of(cfg: Path) -> AsyncIterator[QueueSpool]:
    """The queue of the store the config names (as another process sees it)."""
    st = load_config(cfg).storage
    if st.postgresql:
        async with PgStore(st.url, st.password()) as pg:
            yield await PgSpool.open(pg)
        return
    async with Store(st.path) as store:
        yield Spool(store)


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, list[str]]:
    """A config and a store holding three messages (the middle one for two domains)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""
    write_config(tmp_path / "config.toml", _doc(tmp_path, url))

    async def fill() -> list[str]:
        async with spool_of(tmp_path / "config.toml") as spool:
            ids = []
            for i, rcpts in enumerate(
                (("bob@dest.test",), ("carol@dest.test", "dan@other.test"), ("erin@other.test",))
            ):
                ids.append(await spool.enqueue(_msg(i, *rcpts)))
                await asyncio.sleep(0.002)  # distinct arrival times: the listing's order
            return ids

    return tmp_path / "config.toml", asyncio.run(fill())


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys: pytest.CaptureFixture[str], cfg: Path, *argv: str) -> Any:
    code, out, _ = _cli(capsys, "queue", "list", "--json", "--config", str(cfg), *argv)
    assert code == 0
    return json.loads(out)


def test_list_is_one_query_paged_and_filtered(
    queue: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, ids = queue
    listed = _json(capsys, cfg)
    assert [m["id"] for m in listed] == ids
    m = listed[1]
    assert set(m) == {"id", "mail_from", "size", "message_id", "created", "recipients"}
    r = m["recipients"][0]
    # the old keys stay; lease and DSN state are added
    assert set(r) >= {"address", "state", "attempts", "next_attempt", "last_reply"}
    assert r["lease_owner"] == "" and r["lease_expiry"] is None and r["dsn_owed"] is False
    assert [m["id"] for m in _json(capsys, cfg, "--limit", "2")] == ids[:2]
    assert [m["id"] for m in _json(capsys, cfg, "--limit", "2", "--offset", "2")] == ids[2:]
    by_domain = _json(capsys, cfg, "--domain", "OTHER.test")
    assert [m["id"] for m in by_domain] == ids[1:]
    assert [r["address"] for r in by_domain[0]["recipients"]] == ["dan@other.test"]
    assert _json(capsys, cfg, "--state", "deferred") == []
    code, out, _ = _cli(capsys, "queue", "show", ids[1], "--json", "--config", str(cfg))
    shown = json.loads(out)
    assert shown["env_from"] == "A@x.test" and shown["client_ip"] == "192.0.2.9"
    assert shown["helo"] == "mail.x.test" and shown["held"] is False
    code, out, _ = _cli(capsys, "queue", "list", "--config", str(cfg), "--limit", "1")
    assert code == 0 and "more may follow: --offset 1" in out


def test_the_sqlite_listing_is_one_select(tmp_path: Path) -> None:
    write_config(tmp_path / "config.toml", _doc(tmp_path))
    cfg = tmp_path / "config.toml"

    # one SELECT for the whole listing, not one per message
    async def count() -> int:
        async with Store(cfg.parent / "relay.sqlite3") as store:
            for i in range(3):
                await Spool(store).enqueue(_msg(i, "bob@dest.test"))
            spool = Spool(store)
            statements: list[str] = []
            store.read_sync(lambda c: c.set_trace_callback(statements.append))
            await spool.list(ListFilter(domain="dest.test", limit=10))
            return sum(1 for s in statements if s.lstrip().upper().startswith("SELECT"))

    assert asyncio.run(count()) == 1


def test_hold_release_requeue_and_the_log(
    queue: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, ids = queue
    code, out, err = _cli(capsys, "queue", "hold", ids[0], "NOSUCHID", "--config", str(cfg))
    assert code == 1 and out == f"held {ids[0]}\n"
    assert err == "relay: no message NOSUCHID in the queue\n"
    assert [m["id"] for m in _json(capsys, cfg, "--state", "held")] == [ids[0]]

    async def due() -> list[str]:
        async with spool_of(cfg) as spool:
            claimed = await spool.claim(ids[0], ["bob@dest.test"])
            return [*await spool.due(1e12, 10, set()), *claimed]

    assert ids[0] not in asyncio.run(due())  # neither loaded nor claimable while held
    assert _cli(capsys, "queue", "release", ids[0], "--config", str(cfg))[:2] == (
        0,
        f"released {ids[0]}\n",
    )

    async def defer_then_requeue() -> tuple[float, float]:
        async with spool_of(cfg) as spool:
            await spool.claim(ids[0], ["bob@dest.test"])
            upd = RecipientUpdate(
                "bob@dest.test",
                RecipientState.DEFERRED,
                "451 4.7.1 try later",
                next_attempt=1e12,
                mx_host="mx.dest.test",
                tls="TLSv1.3",
            )
            await spool.record(ids[0], [upd])
            before = (await spool.get(ids[0])).recipients[0].next_attempt  # type: ignore[union-attr]
            await spool.hold([ids[0]])
            await spool.requeue([ids[0]])
            after = await spool.get(ids[0])
            assert after is not None and not after.held
            return before, after.recipients[0].next_attempt

    assert asyncio.run(defer_then_requeue()) == (1e12, 0.0)
    code, out, _ = _cli(capsys, "queue", "log", ids[0], "--config", str(cfg))
    events = [line.split()[2].rstrip(":") for line in out.splitlines()]
    assert code == 0
    assert events == ["received", "held", "released", "deferred", "held", "requeued"]
    assert "client=[192.0.2.9] helo=mail.x.test" in out and "from=<A@x.test>" in out
    assert "bob@dest.test via mx.dest.test tls=TLSv1.3: 451 4.7.1 try later" in out


def test_delivered_history_outlives_the_message_until_pruned(
    queue: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, ids = queue

    async def deliver() -> None:
        async with spool_of(cfg) as spool:
            await spool.claim(ids[2], ["erin@other.test"])
            ok = RecipientUpdate(
                "erin@other.test", RecipientState.DELIVERED, "250 2.0.0 Ok", 0.0, "mx.other.test"
            )
            removed, _ = await spool.record(ids[2], [ok])
            assert removed

    asyncio.run(deliver())
    assert _cli(capsys, "queue", "show", ids[2], "--config", str(cfg))[0] == 1  # gone
    code, out, _ = _cli(capsys, "queue", "log", ids[2], "--config", str(cfg), "--json")
    rows = json.loads(out)
    assert code == 0 and [r["event"] for r in rows] == ["received", "delivered", "removed"]
    assert rows[1]["mx_host"] == "mx.other.test" and rows[1]["reply"] == "250 2.0.0 Ok"

    async def prune(before: float) -> int:
        async with spool_of(cfg) as spool:
            return await spool.prune_log(before)

    assert asyncio.run(prune(0.0)) == 0  # not old enough yet
    assert asyncio.run(prune(1e12)) == 3  # only the removed message's history goes
    assert _cli(capsys, "queue", "log", ids[2], "--config", str(cfg))[0] == 1
    assert _cli(capsys, "queue", "log", ids[0], "--config", str(cfg))[0] == 0


def test_show_raw_flush_domain_and_delete_all(
    queue: tuple[Path, list[str]], capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cfg, ids = queue
    assert main(["queue", "show", ids[1], "--raw", "--config", str(cfg)]) == 0
    raw = capsysbinary.readouterr().out
    assert raw == _msg(1).data  # exactly the stored bytes, nothing else

    async def defer_all() -> None:
        async with spool_of(cfg) as spool:
            for m in await spool.list():
                addrs = [r.address for r in m.recipients]
                await spool.claim(m.id, addrs)
                await spool.record(
                    m.id, [RecipientUpdate(a, RecipientState.DEFERRED, "451", 1e12) for a in addrs]
                )

    async def due_now() -> list[str]:
        async with spool_of(cfg) as spool:
            return sorted(
                r.address for m in await spool.list() for r in m.recipients if r.next_attempt == 0
            )

    async def count() -> int:
        async with spool_of(cfg) as spool:
            return len(await spool.list())

    asyncio.run(defer_all())
    assert main(["queue", "flush", "--domain", "other.test", "--config", str(cfg)]) == 0
    assert capsysbinary.readouterr().out == b"2 recipient(s) due now for other.test\n"
    assert asyncio.run(due_now()) == ["dan@other.test", "erin@other.test"]

    assert main(["queue", "delete", "--all", "--config", str(cfg)]) == 2  # needs --yes
    assert b"add --yes" in capsysbinary.readouterr().err
    assert asyncio.run(count()) == 3
    assert main(["queue", "delete", "--all", "--yes", "--config", str(cfg)]) == 0
    assert capsysbinary.readouterr().out == b"deleted 3 message(s)\n"
    assert asyncio.run(count()) == 0
    assert main(["queue", "delete", ids[0], "--config", str(cfg)]) == 1


def test_space_is_reclaimed_as_the_queue_drains(tmp_path: Path) -> None:
    """A drained queue gives its pages back: the file shrinks to a fraction, with no
    VACUUM by hand (the writer's idle step, or reclaim after a bulk delete)."""
    path = tmp_path / "relay.sqlite3"

    async def run() -> tuple[int, int, int]:
        async with Store(path) as store:
            spool = Spool(store)
            body = b"x" * 20000
            qids = [
                await spool.enqueue(NewMessage("a@x.test", ("b@y.test",), body + bytes([i])))
                for i in range(200)
            ]
            store.write_raw(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
            full = path.stat().st_size
            for q in qids:
                await spool.delete(q)
            for _ in range(100):  # the writer gives pages back once idle
                await asyncio.sleep(0.05)
                if store.pages_reclaimed and path.stat().st_size < full / 4:
                    break
            mode = store.read_sync(lambda c: c.execute("PRAGMA auto_vacuum").fetchone()[0])
            return full, path.stat().st_size, mode

    full, drained, mode = asyncio.run(run())
    assert mode == 2  # incremental
    assert full > 4_000_000 and drained < full / 4, (full, drained)


def test_an_old_store_is_converted_to_incremental_auto_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite3"
    old = sqlite3.connect(path)  # made the way the relay made stores before
    old.execute("CREATE TABLE t (x BLOB)")
    old.executemany("INSERT INTO t VALUES (?)", [(b"y" * 4000,) for _ in range(100)])
    old.commit()
    assert old.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    old.close()
    store = Store(path).open()
    try:
        assert store.read_sync(lambda c: c.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
        assert store.read_sync(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 100
        store.write_sync(lambda c: c.execute("DELETE FROM t"))
        assert store.reclaim() > 50
    finally:
        store.close()


def test_default_config_path_version_and_config_commands(
    tmp_path: Path,
    queue: tuple[Path, list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, ids = queue
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("relay 0.")
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    code, out, err = _cli(capsys, "queue", "list")
    assert code == 2 and "/etc/relay/config.toml" in err and out == ""
    monkeypatch.setenv("RELAY_CONFIG", str(cfg))
    code, out, _ = _cli(capsys, "queue", "list")
    assert code == 0 and ids[0] in out and "-- 3 message(s)" in out
    # config show: the keys the file sets, effective values, the secret masked
    code, out, _ = _cli(capsys, "config", "show")
    assert code == 0
    assert 'secret = "********"' in out and "not-the-shipped-one" not in out
    assert 'hostname = "relay.lab.test"' in out and "max_recipients" not in out
    code, out, _ = _cli(capsys, "config", "show", "--all")
    assert code == 0 and "max_recipients = 100" in out and "log_retention = 604800.0" in out
    assert "not-the-shipped-one" not in out
    assert _cli(capsys, "config", "check")[:2] == (0, f"config OK: {cfg}\n")
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["127.0.0.1"]\n')
    code, out, err = _cli(capsys, "config", "check", "--config", str(bad))
    assert code == 2 and out == "" and "server.listen" in err and len(err.splitlines()) == 1
