"""Intake parses a message once: the production stages (build_auth's verdict and seal,
the router, the spool) read the one ParsedMessage, and the header block is never parsed
again on the way (issue 10, "One typed path for the message")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from relay.auth import fastrsa
from relay.auth.arc import validate_arc
from relay.auth.dkim import DkimSigner
from relay.auth.types import ArcCv
from relay.auth.wiring import build_auth
from relay.commands.keygen import generate
from relay.config import ArcConfig, AuthConfig, Config, ServerConfig, SrsConfig
from relay.dns import StaticResolver
from relay.intake import Intake, Router
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope
from relay.queue.spool import Spool
from relay.store import Store

ID = "relay.example.net"
MESSAGE = (
    b"From: Ann <ann@example.com>\r\nTo: bob@example.net\r\nSubject: once\r\n"
    b"Message-ID: <once@example.com>\r\n\r\nParsed once.\r\n"
)
CONN = ConnInfo(peer_ip="192.0.2.1", peer_port=1, helo="mail.example.com", trusted=True)
ENV = Envelope(mail_from="ann@example.com", rcpt_tos=("bob@example.net",))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "q.sqlite3").open()
    yield s
    s.close()


async def test_one_parse_from_data_to_the_spool(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender, ours = generate("rsa"), generate("rsa")
    (tmp_path / "arc.pem").write_bytes(ours.private_pem)
    resolver = StaticResolver()
    resolver.add("example.com", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    resolver.add("_dmarc.example.com", "TXT", ["v=DMARC1; p=reject"])
    resolver.add("s1._domainkey.example.com", "TXT", [sender.record()])
    resolver.add("arc._domainkey.relay.example.net", "TXT", [ours.record()])
    config = Config(
        path=tmp_path / "config.toml",
        server=ServerConfig(hostname=ID),
        auth=AuthConfig(crypto_workers=0),
        arc=ArcConfig(domain=ID, selector="arc", private_key=tmp_path / "arc.pem"),
        srs=SrsConfig(enabled=False),
    )
    wiring = build_auth(config, resolver)
    assert wiring.executor is None  # inline: a process pool would parse its copy again
    intake = Intake(
        config, Spool(store), verdict=wiring.verdict, router=Router(), sealer=wiring.sealer
    )
    signed = DkimSigner("example.com", "s1", sender.private_pem).sign(MESSAGE)
    parses: list[int] = []
    original = ParsedMessage.parse.__func__  # type: ignore[attr-defined]

    def counting(cls: type[ParsedMessage], raw: bytes) -> ParsedMessage:
        parses.append(len(raw))
        return original(cls, raw)  # type: ignore[no-any-return]

    def forbidden(*_: Any) -> Any:
        raise AssertionError("the header block was parsed again")

    monkeypatch.setattr(ParsedMessage, "parse", classmethod(counting))
    monkeypatch.setattr(fastrsa, "parse_head", forbidden)
    monkeypatch.setattr(fastrsa.dkim, "rfc822_parse", forbidden)
    reply = await intake.submit(CONN, ENV, signed)
    assert parses == [len(signed)]  # once, at the end of DATA
    monkeypatch.undo()
    qid = reply.rsplit(" ", 1)[1]
    loaded = await Spool(store).load(qid)
    assert loaded is not None
    stored = loaded[1]
    # what was queued is what the stages made of it: Received, our A-R, our ARC set
    assert stored.endswith(signed)
    assert stored.startswith(b"ARC-Seal: i=1; cv=none;")
    assert b"dkim=pass header.d=example.com" in stored
    assert (await validate_arc(resolver, stored)).cv is ArcCv.PASS
    assert dkim.verify(stored, dnsfunc=lambda *_a, **_k: sender.record().encode())
