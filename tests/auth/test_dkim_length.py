"""DKIM l= (RFC 6376 sections 3.5, 8.2): a signature whose signed length is shorter than
the body is no pass, neither for DMARC alignment nor for the ARC override."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim
import pytest

from relay.auth.pipeline import Authenticator
from relay.auth.types import ArcCv
from relay.commands.keygen import generate
from relay.config import ArcConfig, Config, ServerConfig
from relay.dns import StaticResolver
from relay.model import ConnInfo, Envelope
from tests.auth.test_arc_independent import seal_with_i_last

MESSAGE = (
    b"From: Ann <ann@example.com>\r\nTo: bob@example.net\r\nSubject: pay\r\n"
    b"Message-ID: <l@example.com>\r\n\r\nPlease pay invoice 1.\r\n"
)
APPENDED = b"\r\nActually, pay account 666 instead.\r\n"
CONN = ConnInfo(peer_ip="198.51.100.7", peer_port=1, helo="mx.fwd.test")
ENV = Envelope(mail_from="bounces@fwd.test", rcpt_tos=("bob@example.net",))


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"dkim": generate("rsa"), "fwd": generate("rsa")}


def _auth(keys: dict[str, Any], trusted: tuple[str, ...] = ()) -> Authenticator:
    r = StaticResolver()
    r.add("_dmarc.example.com", "TXT", ["v=DMARC1; p=reject"])
    r.add("s1._domainkey.example.com", "TXT", [keys["dkim"].record()])
    r.add("fwd.test", "TXT", ["v=spf1 ip4:198.51.100.7 -all"])
    r.add("arc._domainkey.fwd.test", "TXT", [keys["fwd"].record()])
    config = Config(
        path=Path("/nonexistent/config.toml"),
        server=ServerConfig(hostname="relay.example.net"),
        arc=ArcConfig(trusted_sealers=trusted),
    )
    return Authenticator(config, r)


def _signed_with_length(keys: dict[str, Any]) -> bytes:
    sig = dkim.sign(MESSAGE, b"s1", b"example.com", keys["dkim"].private_pem, length=True)
    assert b"l=" in sig
    return bytes(sig) + MESSAGE


async def test_l_covering_the_whole_body_passes(keys: dict[str, Any]) -> None:
    v = await _auth(keys).evaluate(CONN, ENV, _signed_with_length(keys))
    assert [d.result for d in v.results.dkim] == ["pass"]
    assert v.action == "accept"


async def test_appended_content_makes_l_signature_policy_and_dmarc_fail(
    keys: dict[str, Any],
) -> None:
    message = _signed_with_length(keys) + APPENDED
    # the signature still verifies over its l= octets (dkimpy says pass) ...
    assert dkim.verify(message, dnsfunc=lambda *_, **__: keys["dkim"].record().encode())
    v = await _auth(keys).evaluate(CONN, ENV, message)
    [d] = v.results.dkim
    total = len(MESSAGE.split(b"\r\n\r\n", 1)[1] + APPENDED)
    assert d.result == "policy" and d.reason.startswith("l= covers ")
    assert d.reason == f"l= covers {total - len(APPENDED)} of {total} body octets"
    # ... but it is no pass for DMARC: p=reject applies
    assert v.results.dmarc is not None and v.results.dmarc.result == "fail"
    assert v.action == "reject"
    assert "dkim=policy" in v.header and 'reason="l= covers' in v.header


async def test_ams_with_short_l_earns_no_override(keys: dict[str, Any]) -> None:
    ar = "fwd.test; dkim=pass header.d=example.com; dmarc=pass header.from=example.com"
    sealed = seal_with_i_last(MESSAGE, keys["fwd"].private_pem, ar, length=True)
    auth = _auth(keys, trusted=("fwd.test",))
    v = await auth.evaluate(CONN, ENV, sealed)
    assert v.results.arc is not None and v.results.arc.cv is ArcCv.PASS
    assert v.action == "accept" and v.results.dmarc_override == "fwd.test"
    v = await auth.evaluate(CONN, ENV, sealed + APPENDED)
    assert v.results.arc is not None and v.results.arc.cv is ArcCv.FAIL
    assert v.action == "reject" and v.results.dmarc_override == ""
