"""Relay access decisions and alias expansion (RelayRules), without a network."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import parse_config
from relay.errors import ConfigError
from relay.model import ConnInfo, SmtpReply
from relay.smtp.rules import RelayRules

TRUSTED = ConnInfo(peer_ip="127.0.0.1", peer_port=1, trusted=True)
STRANGER = ConnInfo(peer_ip="192.0.2.9", peer_port=1, trusted=False)


def rules(tmp_path: Path, aliases: dict[str, list[str]] | None = None, **kw: object) -> RelayRules:
    doc = {
        "relay": {"local_domains": ["example.org", "lists.example.org"]},
        "aliases": aliases
        if aliases is not None
        else {
            "info@example.org": ["alice@Example.COM", "team@example.org"],
            "team@example.org": ["bob@example.net", "alice@example.com"],
            "a@example.org": ["b@example.org"],
            "b@example.org": ["a@example.org"],
            "c@example.org": ["a@example.org", "carol@example.com"],
        },
    }
    return RelayRules(parse_config(doc, tmp_path / "config.toml"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address, stranger, trusted",
    [
        ("info@example.org", None, None),
        ("INFO@Example.Org", None, None),
        ("nobody@example.org", 550, 550),
        ("v@ext.test", 554, None),
        ("v%ext.test@example.org", 554, 550),
        ("ext.test!v@example.org", 554, 550),
        ("@example.org:v@ext.test", 554, None),
        ('"v@ext.test"@example.org', 554, 550),
        ("v@[192.0.2.1]", 554, None),
        ("a@example.org", 550, 550),  # an alias loop with no way out
        ("x@lists.example.org", 550, 550),
        ("not an address", 501, 501),
    ],
)
def test_check_rcpt(
    tmp_path: Path, address: str, stranger: int | None, trusted: int | None
) -> None:
    r = rules(tmp_path)
    got_s = r.check_rcpt(STRANGER, address)
    got_t = r.check_rcpt(TRUSTED, address)
    assert (got_s.code if got_s else None) == stranger, got_s
    assert (got_t.code if got_t else None) == trusted, got_t
    if got_s is not None and got_s.code == 554:
        assert got_s.message.startswith("5.7.1 ")


def test_expand_recursive_dedup_and_loops(tmp_path: Path) -> None:
    r = rules(tmp_path)
    assert r.expand("info@example.org") == (
        "alice@example.com",
        "bob@example.net",
    )
    assert r.expand("Info@EXAMPLE.org") == r.expand("info@example.org")
    assert r.expand("a@example.org") == ()
    assert r.expand("c@example.org") == ("carol@example.com",)
    assert r.expand("someone@ext.test") == ("someone@ext.test",)
    assert r.expand("Someone@EXT.test") == ("Someone@EXT.test",)


def test_extra_local_check_hook(tmp_path: Path) -> None:
    seen: list[str] = []

    def srs(address: str) -> SmtpReply | None:
        seen.append(address)
        if not address.lower().startswith("srs0="):
            return None
        if address.startswith("SRS0=good"):
            return SmtpReply(250, "2.1.5 Ok")
        return SmtpReply(550, "5.7.1 Error: bad SRS signature")

    r = rules(tmp_path, extra_local_check=srs)
    assert r.check_rcpt(STRANGER, "SRS0=good=TT=b.test=u@srs.example.net") is None
    bad = r.check_rcpt(STRANGER, "SRS0=bad=TT=b.test=u@srs.example.net")
    assert bad is not None and bad.code == 550 and "SRS" in bad.message
    # addresses the hook does not claim follow the normal rules
    denied = r.check_rcpt(STRANGER, "v@ext.test")
    assert denied is not None and denied.code == 554
    assert r.check_rcpt(STRANGER, "info@example.org") is None
    # routing tricks are refused before the hook sees them
    assert r.check_rcpt(STRANGER, "@x.test:SRS0=good@srs.example.net") is not None
    assert "@x.test:SRS0=good@srs.example.net" not in seen
    assert r.expand("SRS0=good=TT=b.test=u@srs.example.net") == (
        "SRS0=good=TT=b.test=u@srs.example.net",
    )


def test_bad_alias_target_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        rules(tmp_path, {"info@example.org": ["ok@example.com", "bad@@example.com"]})
    assert exc.value.key == "aliases.info@example.org"
    assert "bad@@example.com" in exc.value.problem
