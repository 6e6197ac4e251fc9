"""Authenticator with the real SPF, DKIM and ARC modules (default checks) and a real seal.

DNS is a StaticResolver holding SPF, DKIM/ARC keys and DMARC records; messages are signed
with DkimSigner and sealed with ArcSealer. The sealed output must verify with dkimpy's
own ``arc_verify`` and carry our A-R in its AAR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim
import pytest

from relay.auth.arc import ArcSealer, SealerSpec
from relay.auth.dkim import DkimSigner
from relay.auth.pipeline import Authenticator
from relay.auth.types import ArcCv, ArcResult, SpfResultCode
from relay.auth.wiring import ArcSeal
from relay.commands.keygen import generate
from relay.config import ArcConfig, Config, ServerConfig
from relay.dns import StaticResolver
from relay.errors import SmtpReplyError
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope

ID = "relay.example.net"
MESSAGE = (
    b"From: Ann <ann@example.com>\r\nTo: team@lists.test\r\nSubject: plan\r\n"
    b"Message-ID: <p@example.com>\r\n\r\nThe plan.\r\n"
)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"dkim": generate("rsa"), "list": generate("rsa"), "ours": generate("rsa")}


def _resolver(keys: dict[str, Any]) -> StaticResolver:
    r = StaticResolver()
    r.add("example.com", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    r.add("_dmarc.example.com", "TXT", ["v=DMARC1; p=reject"])
    r.add("s1._domainkey.example.com", "TXT", [keys["dkim"].record()])
    r.add("lists.test", "TXT", ["v=spf1 ip4:198.51.100.7 -all"])
    r.add("arc._domainkey.lists.test", "TXT", [keys["list"].record()])
    r.add("seal._domainkey.relay.example.net", "TXT", [keys["ours"].record()])
    return r


def _config(trusted: tuple[str, ...]) -> Config:
    return Config(
        path=Path("/nonexistent/config.toml"),
        server=ServerConfig(hostname=ID),
        arc=ArcConfig(trusted_sealers=trusted),
    )


def _list_copy(keys: dict[str, Any]) -> bytes:
    """Signed by example.com, footer added by the list, sealed i=1 by lists.test."""
    signed = DkimSigner("example.com", "s1", keys["dkim"].private_pem).sign(MESSAGE)
    modified = signed + b"-- \r\nlists.test footer\r\n"
    sealer = ArcSealer("lists.test", "arc", keys["list"].private_pem, "lists.test")
    ar = "lists.test; dkim=pass header.d=example.com; dmarc=pass header.from=example.com"
    return sealer.seal(modified, ar, ArcResult(ArcCv.NONE))


LIST_CONN = ConnInfo(peer_ip="198.51.100.7", peer_port=1, helo="mx.lists.test")
LIST_ENV = Envelope(mail_from="team-bounces@lists.test", rcpt_tos=("bob@example.net",))


async def test_direct_signed_mail_passes(keys: dict[str, Any]) -> None:
    auth = Authenticator(_config(()), _resolver(keys))
    signed = DkimSigner("example.com", "s1", keys["dkim"].private_pem).sign(MESSAGE)
    conn = ConnInfo(peer_ip="192.0.2.1", peer_port=1, helo="mail.example.com")
    env = Envelope(mail_from="ann@example.com", rcpt_tos=("team@lists.test",))
    v = await auth.evaluate(conn, env, signed)
    assert v.action == "accept"
    assert v.results.spf is not None and v.results.spf.result is SpfResultCode.PASS
    assert [s.result for s in v.results.dkim] == ["pass"]
    assert v.results.dmarc is not None and v.results.dmarc.result == "pass"
    assert "dkim=pass header.d=example.com header.s=s1 header.b=" in v.header


async def test_spoof_is_refused(keys: dict[str, Any]) -> None:
    auth = Authenticator(_config(("lists.test",)), _resolver(keys))
    conn = ConnInfo(peer_ip="203.0.113.66", peer_port=1, helo="spoofer.test")
    env = Envelope(mail_from="ann@example.com", rcpt_tos=("x@example.net",))
    forged = b"Authentication-Results: relay.example.net; dmarc=pass\r\n" + MESSAGE
    with pytest.raises(SmtpReplyError) as exc:
        await auth.judge(conn, env, ParsedMessage.parse(forged))
    assert exc.value.reply.startswith("550 5.7.1")


async def test_trusted_list_chain_is_accepted_and_sealed(keys: dict[str, Any]) -> None:
    seal = ArcSeal(SealerSpec("relay.example.net", "seal", keys["ours"].private_pem, ID), None)
    auth = Authenticator(_config(("lists.test",)), _resolver(keys))
    incoming = _list_copy(keys)
    v = await auth.evaluate(LIST_CONN, LIST_ENV, incoming)
    assert v.results.arc is not None and v.results.arc.cv is ArcCv.PASS
    assert v.results.dkim[0].reason == "body hash mismatch"
    assert v.results.dmarc is not None and v.results.dmarc.result == "fail"
    assert v.action == "accept" and v.results.dmarc_override == "lists.test"
    judged = await auth.judge(LIST_CONN, LIST_ENV, ParsedMessage.parse(incoming))
    sealed = (await seal.seal(judged)).raw
    records = {
        b"arc._domainkey.lists.test.": keys["list"].record().encode(),
        b"seal._domainkey.relay.example.net.": keys["ours"].record().encode(),
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name if name.endswith(b".") else name + b".", b"")

    cv, _results, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc)
    assert cv == dkim.CV_Pass, reason
    aar2 = [
        line
        for line in sealed.split(b"\r\n")
        if line.startswith(b"ARC-Authentication-Results: i=2")
    ]
    assert aar2 and b"relay.example.net; spf=pass" in aar2[0]
    assert b"policy.override=trusted_forwarder" in sealed


async def test_untrusted_list_chain_is_refused(keys: dict[str, Any]) -> None:
    auth = Authenticator(_config(("other.test",)), _resolver(keys))
    v = await auth.evaluate(LIST_CONN, LIST_ENV, _list_copy(keys))
    assert v.results.arc is not None and v.results.arc.cv is ArcCv.PASS
    assert v.action == "reject" and v.results.dmarc_override == ""
