"""[storage]: exactly one of path (SQLite) and url (PostgreSQL); never a password in the
URL; the password from RELAY_DB_PASSWORD, else the passfile, read when asked and never in
the config's repr. [server] node_id defaults to the host name."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from relay.config import StorageConfig, parse_config
from relay.errors import ConfigError


def storage(tmp_path: Path, **st: object) -> StorageConfig:
    return parse_config({"storage": st}, tmp_path / "config.toml").storage


def test_sqlite_stays_the_default(tmp_path: Path) -> None:
    st = storage(tmp_path)
    assert not st.postgresql and st.url == "" and st.path == tmp_path / "var/relay.sqlite3"


def test_url_selects_postgresql(tmp_path: Path) -> None:
    st = storage(tmp_path, url="postgresql://relay@db.example.net/relay")
    assert st.postgresql and st.url == "postgresql://relay@db.example.net/relay"


def test_poll_interval_on_both_stores(tmp_path: Path) -> None:
    assert storage(tmp_path).poll_interval == 1.0
    assert storage(tmp_path, poll_interval=10).poll_interval == 10.0
    st = storage(tmp_path, url="postgresql://relay@db/relay", poll_interval=0.5)
    assert st.poll_interval == 0.5


def test_pool_size_only_on_postgresql(tmp_path: Path) -> None:
    assert storage(tmp_path, url="postgresql://relay@db/relay").pool_size == 16
    assert storage(tmp_path, url="postgresql://relay@db/relay", pool_size=40).pool_size == 40


def test_pgbouncer_and_listen_url(tmp_path: Path) -> None:
    st = storage(tmp_path, url="postgresql://relay@pgb/relay")
    assert (st.pgbouncer, st.listen_url) == (False, "")
    st = storage(
        tmp_path,
        url="postgresql://relay@pgb:6432/relay",
        pgbouncer=True,
        listen_url="postgresql://relay@db/relay",
    )
    assert (st.pgbouncer, st.listen_url) == (True, "postgresql://relay@db/relay")


@pytest.mark.parametrize(
    ("st", "problem"),
    [
        ({"url": "postgresql://relay@db/relay", "path": "q.sqlite3"}, "exactly one"),
        ({"url": "postgresql://relay:secret@db/relay"}, "password"),
        ({"url": "postgresql://relay@db/relay?password=secret"}, "password"),
        ({"url": "mysql://relay@db/relay"}, "postgresql://"),
        ({"url": "postgresql://relay@db"}, "database"),
        ({"url": ""}, "empty"),
        ({"passfile": "pw"}, "only with storage.url"),
        ({"poll_interval": 0.01}, "poll_interval.*>= 0.05"),
        ({"poll_interval": 61}, "poll_interval.*at most 60"),
        ({"pool_size": 8}, "pool_size.*only with storage.url"),
        ({"pgbouncer": True}, "pgbouncer.*only with storage.url"),
        ({"listen_url": "postgresql://relay@db/relay"}, "listen_url.*only with storage.url"),
        (
            {"url": "postgresql://relay@db/relay", "listen_url": "postgresql://r:secret@db/r"},
            "listen_url.*password",
        ),
        ({"url": "postgresql://relay@db/relay", "pgbouncer": "yes"}, "pgbouncer"),
        ({"url": "postgresql://relay@db/relay", "pool_size": 3}, "pool_size.*>= 4"),
        ({"url": "postgresql://relay@db/relay", "pool_size": 1001}, "pool_size.*at most 1000"),
    ],
)
def test_storage_errors(tmp_path: Path, st: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        storage(tmp_path, **st)
    assert "secret" not in str(err.value)


def test_password_from_env_then_passfile_never_in_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    st = storage(tmp_path, url="postgresql://relay@db/relay", passfile="pw")
    monkeypatch.delenv("RELAY_DB_PASSWORD", raising=False)
    assert st.password() == "from-file"
    monkeypatch.setenv("RELAY_DB_PASSWORD", "from-env")
    assert st.password() == "from-env"
    assert "from-env" not in repr(st) and "from-file" not in repr(st)
    monkeypatch.delenv("RELAY_DB_PASSWORD")
    (tmp_path / "pw").unlink()
    with pytest.raises(ConfigError, match="passfile"):
        st.password()


def test_node_id(tmp_path: Path) -> None:
    cfg = parse_config({}, tmp_path / "config.toml")
    assert cfg.server.node_id == socket.gethostname()
    cfg = parse_config({"server": {"node_id": "mx-2.example"}}, tmp_path / "config.toml")
    assert cfg.server.node_id == "mx-2.example"
    for bad in ("a b", "a:b", "-x"):
        with pytest.raises(ConfigError, match="node_id"):
            parse_config({"server": {"node_id": bad}}, tmp_path / "config.toml")
