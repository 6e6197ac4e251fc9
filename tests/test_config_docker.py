"""The shipped container config relays for no network unless the operator names one
(RELAY_TRUSTED_NETWORKS or a mounted config): traffic through the Docker bridge gateway
must not be able to relay anywhere."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from relay.config import HostPort, StorageConfig, load_config
from relay.errors import ConfigError
from relay.smtp.limits import in_networks
from tests.smtp.test_inbound_harness import RawClient, running

DOCKER = Path(__file__).parent.parent / "docker"
BRIDGE_GATEWAYS = ["172.17.0.1", "172.18.0.1", "172.31.255.1", "192.168.65.1"]


def _entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_entrypoint", DOCKER / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["docker_entrypoint"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_shipped_docker_config_trusts_no_network() -> None:
    cfg = load_config(DOCKER / "config.toml")
    assert cfg.relay.trusted_networks == ()
    for ip in BRIDGE_GATEWAYS:
        assert not in_networks(ip, cfg.relay.trusted_networks), ip
    assert [str(h) for h in cfg.server.listen] == ["0.0.0.0:2525"]


async def test_docker_config_refuses_to_relay_for_a_client(tmp_path: Path) -> None:
    cfg = load_config(DOCKER / "config.toml")
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, listen=(HostPort("127.0.0.1", 0),)),
        storage=StorageConfig(tmp_path / "relay.sqlite3"),
    )
    async with running(cfg) as (_, rec, port):
        c = await RawClient.connect(port)
        await c.greet()
        assert (await c.cmd("MAIL FROM:<a@b.test>")).startswith("250 ")
        reply = await c.cmd("RCPT TO:<victim@elsewhere.test>")
        assert reply.startswith(("554 5.7.1", "550 5.7.1")), reply
        await c.close()
    assert rec.calls == []


def test_trusted_networks_from_the_environment(tmp_path: Path) -> None:
    out = _entrypoint().render(
        DOCKER / "config.toml", "192.0.2.0/24, 2001:db8::/64", tmp_path / "c.toml"
    )
    cfg = load_config(out)
    assert [str(n) for n in cfg.relay.trusted_networks] == ["192.0.2.0/24", "2001:db8::/64"]
    assert cfg.storage.path == Path("/var/lib/relay/relay.sqlite3")
    assert not in_networks("172.17.0.1", cfg.relay.trusted_networks)


def test_a_bad_network_from_the_environment_is_a_config_error(tmp_path: Path) -> None:
    out = _entrypoint().render(DOCKER / "config.toml", "10.0.0.0/33", tmp_path / "c.toml")
    with pytest.raises(ConfigError) as exc:
        load_config(out)
    assert exc.value.key == "relay.trusted_networks"
