"""ARC replay guard (relay.auth.replay): a trusted seal earns a DMARC override for a bounded
number of recipients, a trusted sealer for a bounded number of overrides an hour, counted
in the store so that relay processes share the count. Real seals, real store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.auth.arc import ArcSealer
from relay.auth.dkim import DkimSigner
from relay.auth.pipeline import Authenticator
from relay.auth.replay import ArcReplayGuard, ReplayLimits, seal_fingerprint
from relay.auth.types import ArcCv, ArcResult
from relay.commands.keygen import generate
from relay.config import ArcConfig, Config, ServerConfig
from relay.errors import SmtpReplyError
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope
from relay.store import Store
from tests.auth.test_pipeline_real import _resolver

ID = "relay.example.net"
MESSAGE = (
    b"From: Ann <ann@example.com>\r\nTo: team@lists.test\r\nSubject: plan\r\n"
    b"Message-ID: <p@example.com>\r\n\r\nThe plan.\r\n"
)
LIST_CONN = ConnInfo(peer_ip="198.51.100.7", peer_port=1, helo="mx.lists.test")


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"dkim": generate("rsa"), "list": generate("rsa"), "ours": generate("rsa")}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "relay.sqlite3")
    s.open()
    yield s
    s.close()


def _list_copy(keys: dict[str, Any], subject: bytes = b"plan") -> bytes:
    """Signed by example.com, footer added by the list (DKIM breaks), sealed by lists.test."""
    msg = MESSAGE.replace(b"Subject: plan", b"Subject: " + subject)
    signed = DkimSigner("example.com", "s1", keys["dkim"].private_pem).sign(msg)
    sealer = ArcSealer("lists.test", "arc", keys["list"].private_pem, "lists.test")
    ar = "lists.test; dkim=pass header.d=example.com; dmarc=pass header.from=example.com"
    return sealer.seal(signed + b"-- \r\nfooter\r\n", ar, ArcResult(ArcCv.NONE))


def _env(n: int) -> Envelope:
    return Envelope("team-bounces@lists.test", tuple(f"u{i}@example.net" for i in range(n)))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _auth(keys: dict[str, Any], store: Store, limits: ReplayLimits, clock: Clock) -> Authenticator:
    config = Config(
        path=Path("/nonexistent/config.toml"),
        server=ServerConfig(hostname=ID),
        arc=ArcConfig(trusted_sealers=("lists.test",)),
    )
    guard = ArcReplayGuard(store, limits)
    return Authenticator(config, _resolver(keys), replay_guard=guard, clock=clock)


def test_fingerprint_names_the_seal_and_ignores_folding(keys: dict[str, Any]) -> None:
    copy = _list_copy(keys)
    fp = seal_fingerprint(copy, 1)
    assert len(fp) == 64
    assert seal_fingerprint(copy, 2) == ""
    assert seal_fingerprint(MESSAGE, 1) == ""
    # refolding the seal's b= (a hop that rewraps headers) gives the same fingerprint
    head, _, body = copy.partition(b"\r\n\r\n")
    refolded = head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    assert seal_fingerprint(refolded + b"\r\n\r\n" + body, 1) == fp
    assert seal_fingerprint(_list_copy(keys, b"other"), 1) != fp


async def test_replayed_seal_loses_the_override_past_the_recipient_limit(
    keys: dict[str, Any], store: Store
) -> None:
    clock = Clock()
    auth = _auth(keys, store, ReplayLimits(max_recipients=5), clock)
    copy = _list_copy(keys)
    first = await auth.evaluate(LIST_CONN, _env(3), copy)
    assert first.action == "accept" and first.results.dmarc_override == "lists.test"
    second = await auth.evaluate(LIST_CONN, _env(2), copy)  # 3 + 2 = 5: still within
    assert second.action == "accept" and second.results.dmarc_override == "lists.test"
    third = await auth.evaluate(LIST_CONN, _env(1), copy)
    assert third.action == "reject" and third.results.dmarc_override == ""
    assert third.reply is not None and third.reply.startswith("550 5.7.1")
    assert "ARC override refused" in third.reply and "replay" in third.reply
    assert "policy.override" not in third.header
    with pytest.raises(SmtpReplyError) as exc:
        await auth.judge(LIST_CONN, _env(1), ParsedMessage.parse(copy))
    assert exc.value.code == 550
    # a refused replay is not counted; another message sealed by the same list is its own
    other = await auth.evaluate(LIST_CONN, _env(5), _list_copy(keys, b"another post"))
    assert other.action == "accept" and other.results.dmarc_override == "lists.test"
    # after the window the seal may carry mail again
    clock.now += ReplayLimits().window + 1
    later = await auth.evaluate(LIST_CONN, _env(1), copy)
    assert later.action == "accept"


async def test_one_transaction_over_the_limit_is_refused_outright(
    keys: dict[str, Any], store: Store
) -> None:
    auth = _auth(keys, store, ReplayLimits(max_recipients=50), Clock())
    v = await auth.evaluate(LIST_CONN, _env(100), _list_copy(keys))
    assert v.action == "reject"
    assert v.reply is not None and "100 recipients exceed the 50" in v.reply


async def test_sealer_hourly_limit(keys: dict[str, Any], store: Store) -> None:
    clock = Clock()
    auth = _auth(keys, store, ReplayLimits(max_recipients=0, per_sealer_hour=2), clock)
    copies = [_list_copy(keys, b"post %d" % i) for i in range(3)]
    assert (await auth.evaluate(LIST_CONN, _env(1), copies[0])).action == "accept"
    assert (await auth.evaluate(LIST_CONN, _env(1), copies[1])).action == "accept"
    v = await auth.evaluate(LIST_CONN, _env(1), copies[2])
    assert v.action == "reject" and v.reply is not None
    assert "lists.test reached its 2 overrides this hour" in v.reply
    clock.now += 3600
    assert (await auth.evaluate(LIST_CONN, _env(1), copies[2])).action == "accept"


async def test_count_is_shared_through_the_store_file(keys: dict[str, Any], tmp_path: Path) -> None:
    """Two Store handles on one file, as two relay worker processes have."""
    path = tmp_path / "shared.sqlite3"
    a, b = Store(path), Store(path)
    a.open()
    b.open()
    try:
        limits = ReplayLimits(max_recipients=4)
        guard_a, guard_b = ArcReplayGuard(a, limits), ArcReplayGuard(b, limits)
        now = 1_800_000_000.0
        assert await guard_a.admit("lists.test", "f" * 64, 3, now) == ""
        assert "already carried 3 recipients" in await guard_b.admit("lists.test", "f" * 64, 2, now)
        assert await guard_b.admit("lists.test", "f" * 64, 1, now) == ""
        assert await guard_a.admit("lists.test", "f" * 64, 1, now) != ""
    finally:
        a.close()
        b.close()
