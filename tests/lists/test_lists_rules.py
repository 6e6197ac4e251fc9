"""RCPT acceptance of list addresses: every address of a list from anyone; anything
else in a list domain 550 5.1.1; intake's split of list and other recipients."""

from __future__ import annotations

from pathlib import Path

from relay.config import parse_config
from relay.lists.service import ListService
from relay.lists.stage import ListsStage
from relay.model import ConnInfo
from relay.smtp.rules import RelayRules
from relay.store import Store

LIST = "dev@lists.example.org"


def test_list_addresses_at_rcpt(tmp_path: Path) -> None:
    config = parse_config(
        {
            "storage": {"path": str(tmp_path / "s.sqlite3")},
            "lists": {LIST: {"owners": ["o@example.org"]}},
            "lists_http": {"base_url": "https://lists.example.org"},
        },
        tmp_path / "config.toml",
    )
    store = Store(config.storage.path).open()
    try:
        svc = ListService(config, store)
        rules = RelayRules(config, list_check=svc.check_rcpt)
        stranger = ConnInfo(peer_ip="203.0.113.9", peer_port=1)
        token = "ab" * 16
        for a in (
            LIST,
            "DEV@lists.example.org",
            "dev-subscribe@lists.example.org",
            "dev-unsubscribe@lists.example.org",
            "dev-owner@lists.example.org",
            f"dev-bounces+{token}@lists.example.org",
            f"dev-confirm+{token}@lists.example.org",
        ):
            assert rules.check_rcpt(stranger, a) is None, a
        for a in ("other@lists.example.org", "dev+x@lists.example.org", "dev-x@lists.example.org"):
            reply = rules.check_rcpt(stranger, a)
            assert reply is not None and reply.code == 550, a
        ours, rest = ListsStage(svc).split((LIST, "x@else.test", "dev-owner@lists.example.org"))
        assert ours == (LIST, "dev-owner@lists.example.org") and rest == ("x@else.test",)
    finally:
        store.close()
