"""[lists."addr"], [lists_http], [http_server] and [[dkim.sign]]: read, validated, one
error naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.config import parse_config
from relay.errors import ConfigError

P = Path("/tmp/cfg/config.toml")


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "lists": {"dev@Lists.Example.org": {"owners": ["owner@example.org"], "name": "Developers"}},
        "lists_http": {"base_url": "https://lists.example.org/"},
    }
    doc.update(over)
    return doc


def test_a_list_is_read_and_its_domain_is_local() -> None:
    c = parse_config(_doc(), P)
    lst = c.lists["dev@lists.example.org"]
    assert (lst.name, lst.posting, lst.dmarc_mitigation, lst.reply_to) == (
        "Developers",
        "members",
        "munge",
        "author",
    )
    assert lst.archive and lst.bounce_threshold == 5.0 and lst.max_message_size == 10485760
    assert "lists.example.org" in c.relay.local_domains
    assert c.lists_http.base_url == "https://lists.example.org"
    assert c.http_server.listen == ()


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        (_doc(lists={"dev@x.org": {"owners": []}}), "lists.dev@x.org.owners"),
        (_doc(lists={"dev@x.org": {"owners": ["o@x.org"], "posting": "all"}}), "posting"),
        (_doc(lists={"dev@x.org": {"owners": ["o@x.org"], "colour": 1}}), "colour"),
        (_doc(lists={"dev-owner@x.org": {"owners": ["o@x.org"]}}), "lists.dev-owner@x.org"),
        (_doc(lists={"nodomain": {"owners": ["o@x.org"]}}), "lists.nodomain"),
        (_doc(lists_http={}), "lists_http.base_url"),
        (_doc(lists_http={"base_url": "ftp://x"}), "lists_http.base_url"),
        ({"http_server": {"listen": ["127.0.0.1"]}}, "http_server.listen"),
        ({"http_server": {"tls_cert": "/nonexistent.pem"}}, "http_server.tls_key"),
        ({"dkim": {"sign": [{"domain": "x.org", "selector": "s"}]}}, "dkim.sign[0].private_key"),
        ({"dkim": {"sign": [{"domain": "x", "selector": "s"}]}}, "dkim.sign[0].domain"),
        ({"dkim": {"sign": {"domain": "x.org"}}}, "dkim.sign"),
        ({"dkim": {"verify": []}}, "dkim.verify"),
    ],
)
def test_bad_values_name_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc, P)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_dkim_sign_entries_and_the_tlsrpt_alias(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    c = parse_config(
        {
            "dkim": {
                "sign": [
                    {"domain": "Lists.Example.org", "selector": "s2026", "private_key": str(key)}
                ]
            },
            "tlsrpt": {
                "submitter": "example.net",
                "dkim_selector": "tlsrpt",
                "dkim_private_key": str(key),
            },
        },
        tmp_path / "config.toml",
    )
    assert [(e.domain, e.selector) for e in c.dkim_sign] == [
        ("lists.example.org", "s2026"),
        ("example.net", "tlsrpt"),
    ]


def test_http_server_listen() -> None:
    c = parse_config({"http_server": {"listen": ["127.0.0.1:8025", "[::1]:8026"]}}, P)
    assert [str(h) for h in c.http_server.listen] == ["127.0.0.1:8025", "[::1]:8026"]
