"""One daemon serves both: `relay serve` with ``[policy_server] listen`` answers Postfix
from the very PolicyManager its delivery uses; the config keys are validated; the
standalone command refuses a listen address in use (one line, exit 2)."""

from __future__ import annotations

import asyncio
import socket
import tomllib
from pathlib import Path

import pytest

from relay import cli
from relay.app import RelayApp
from relay.config import parse_config
from relay.errors import ConfigError
from relay.model import StsMode
from relay.policyserver.netstring import NetstringReader, encode
from tests.labutil import base_doc, write_config
from tests.mtasts.conftest import StsLab

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"


async def _ask(host: str, port: int, request: str) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(encode(request.encode()))
        frames = NetstringReader(100_000)
        while True:
            data = await asyncio.wait_for(reader.read(4096), 10)
            assert data
            got = frames.feed(data)
            if got:
                return got[0].decode()
    finally:
        writer.close()


async def test_relay_serve_runs_the_policy_server_on_the_delivery_cache(
    lab: StsLab, tmp_path: Path
) -> None:
    lab.publish("example.com", ENFORCE, "e1")
    doc = base_doc(
        tmp_path,
        lab.dns.address,
        25,
        mta_sts={"enabled": True, "https_port": lab.https.port, "fetch_timeout": 5},
        http={"allow_private_addresses": True},
        policy_server={"listen": ["127.0.0.1:0"]},
    )
    doc["delivery"]["ca_file"] = str(lab.ca_file)
    doc["dns"]["cache_max_ttl"] = 0
    app = RelayApp(write_config(tmp_path / "config.toml", doc), poll_interval=0.05)
    await app.start()
    try:
        host, port = app.policy_server.bound[0]
        reply = await _ask(host, port, "postfix example.com")
        assert reply == "OK secure match=mx.example.com servername=hostname protocols=>=TLSv1.2"
        # what delivery asks (the courier's policy_lookup) is answered from the same cache
        hits = app.policy_manager.counters.cache_hits
        policy = await app.policy_manager.get_policy("example.com")
        assert policy.mode is StsMode.ENFORCE
        assert app.policy_manager.counters.cache_hits == hits + 1
        assert lab.fetches("example.com") == 1
    finally:
        await app.stop(grace=1)
    with pytest.raises(OSError):
        await asyncio.open_connection(host, port)


def _doc(tmp_path: Path, **ps: object) -> str:
    body = "".join(f"{k} = {v}\n" for k, v in ps.items())
    return f'[storage]\npath = "{tmp_path / "r.sqlite3"}"\n[policy_server]\n{body}'


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"map_name": '"two words"'}, "policy_server.map_name"),
        ({"map_name": '""'}, "policy_server.map_name"),
        ({"lookup_timeout": 100}, "under Postfix's 100 s socketmap timeout"),
        ({"lookup_timeout": 0}, "policy_server.lookup_timeout"),
        ({"listen": '["nowhere"]'}, "policy_server.listen"),
        ({"port": 1}, "policy_server.port: unknown key"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, keys: dict[str, object], problem: str) -> None:
    path = tmp_path / "config.toml"
    with pytest.raises(ConfigError) as exc:
        parse_config(tomllib.loads(_doc(tmp_path, **keys)), path)
    assert problem in str(exc.value)


def test_defaults(tmp_path: Path) -> None:
    cfg = parse_config(tomllib.loads(_doc(tmp_path)), tmp_path / "config.toml")
    assert cfg.policy_server.listen == ()
    assert cfg.policy_server.map_name == "postfix"
    assert cfg.policy_server.lookup_timeout == 30.0


def test_listen_address_in_use_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(_doc(tmp_path))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = cli.main(["policy-server", "--config", str(path), "--listen", f"127.0.0.1:{port}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"relay: cannot listen on 127.0.0.1:{port}: address already in use"
