"""DKIM and ARC verdicts are independent (issue 10): an ARC set the verifier cannot read
leaves the DKIM results as verified, and an AMS whose i= tag stands last is a valid set.
The seal takes its i= from the highest readable instance, never i=1 beside junk."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto
import pytest
from dkim.canonicalization import CanonicalizationPolicy

from relay.auth.arc import ArcSealer, validate_arc
from relay.auth.dkim import DkimSigner
from relay.auth.fastrsa import FastARC, canonical_body, load_signing_key
from relay.auth.pipeline import Authenticator
from relay.auth.types import ArcCv, ArcResult
from relay.commands.keygen import generate
from relay.config import Config, ServerConfig
from relay.dns import StaticResolver
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope

ID = "relay.example.net"
MESSAGE = (
    b"From: Ann <ann@example.com>\r\nTo: team@lists.test\r\nSubject: plan\r\n"
    b"Message-ID: <p@example.com>\r\n\r\nThe plan.\r\n"
)
FWD_CONN = ConnInfo(peer_ip="198.51.100.7", peer_port=1, helo="mx.fwd.test")
FWD_ENV = Envelope(mail_from="bounces@fwd.test", rcpt_tos=("bob@example.net",))


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"dkim": generate("rsa"), "fwd": generate("rsa"), "ours": generate("rsa")}


def _resolver(keys: dict[str, Any]) -> StaticResolver:
    r = StaticResolver()
    r.add("example.com", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    r.add("_dmarc.example.com", "TXT", ["v=DMARC1; p=reject"])
    r.add("s1._domainkey.example.com", "TXT", [keys["dkim"].record()])
    r.add("fwd.test", "TXT", ["v=spf1 ip4:198.51.100.7 -all"])
    r.add("arc._domainkey.fwd.test", "TXT", [keys["fwd"].record()])
    return r


def _config() -> Config:
    return Config(path=Path("/nonexistent/config.toml"), server=ServerConfig(hostname=ID))


def seal_with_i_last(message: bytes, pem: bytes, ar: str, *, length: bool = False) -> bytes:
    """An i=1 ARC set as a sealer that writes the AMS's i= tag last would (RFC 8617
    allows any tag order): relaxed/relaxed, rsa-sha256, made with dkimpy's steps."""
    key = load_signing_key(pem)
    signer = FastARC(message)
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    signer.signature_algorithm = b"rsa-sha256"
    signer.hasher = dkim.crypto.HASH_ALGORITHMS[b"rsa-sha256"]
    aar = b"i=1; " + ar.encode() + b"\r\n"
    arc_headers: list[tuple[bytes, bytes]] = [(b"ARC-Authentication-Results", aar)]
    signer.headers = [*arc_headers, *signer.headers]
    include = [b"from", b"to", b"subject", b"message-id"]
    body = canonical_body(canon, signer.body)
    bodyhash = base64.b64encode(signer.hasher(body).digest())
    ams_fields = [
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", b"fwd.test"),
        (b"s", b"arc"),
        (b"t", b"1700000000"),
        (b"h", b":".join(include)),
        (b"bh", bodyhash),
        (b"b", b"0" * 60),
        (b"i", b"1"),
    ]
    if length:  # l=: the signed body length (RFC 6376 section 3.5)
        ams_fields.insert(-2, (b"l", str(len(body)).encode()))
    ams = signer.gen_header(ams_fields, include, canon, b"ARC-Message-Signature", key)
    arc_headers.insert(0, (b"ARC-Message-Signature", ams))
    signer.headers = [arc_headers[0], *signer.headers]
    as_fields = [
        (b"i", b"1"),
        (b"cv", b"none"),
        (b"a", b"rsa-sha256"),
        (b"d", b"fwd.test"),
        (b"s", b"arc"),
        (b"t", b"1700000000"),
        (b"b", b"0" * 60),
    ]
    as_include = [x[0].lower() for x in reversed(arc_headers)]
    seal = signer.gen_header(as_fields, as_include, canon, b"ARC-Seal", key)
    return (
        b"ARC-Seal: "
        + seal
        + b"ARC-Message-Signature: "
        + ams
        + b"ARC-Authentication-Results: "
        + aar
        + message
    )


def _signed(keys: dict[str, Any]) -> bytes:
    return DkimSigner("example.com", "s1", keys["dkim"].private_pem).sign(MESSAGE)


def _dnsfunc(keys: dict[str, Any]) -> Any:
    records = {b"arc._domainkey.fwd.test.": keys["fwd"].record().encode()}

    def get(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name if name.endswith(b".") else name + b".", b"")

    return get


async def test_ams_with_i_last_validates_and_dkim_passes(keys: dict[str, Any]) -> None:
    forwarded = seal_with_i_last(_signed(keys), keys["fwd"].private_pem, "fwd.test; dkim=pass")
    assert b"; i=1\r\n" in forwarded or b"i=1\r\n" in forwarded  # the tag really is last
    # (dkimpy 1.1.8's own ARC.verify_instance raises IndexError on this set: it looks
    # for " i=1;" in the raw AMS, the selection bug FastARC.verify_instance replaces)
    with pytest.raises(IndexError):
        dkim.arc_verify(forwarded, dnsfunc=_dnsfunc(keys))
    chain = await validate_arc(_resolver(keys), forwarded)
    assert chain.cv is ArcCv.PASS, chain.reason
    v = await Authenticator(_config(), _resolver(keys)).evaluate(FWD_CONN, FWD_ENV, forwarded)
    assert v.results.spf is not None and v.results.spf.domain == "fwd.test"  # not aligned
    assert [d.result for d in v.results.dkim] == ["pass"]
    assert v.results.dmarc is not None and v.results.dmarc.result == "pass"
    assert v.results.dmarc.aligned_dkim and not v.results.dmarc.aligned_spf
    assert v.action == "accept" and v.reply is None
    auth = Authenticator(_config(), _resolver(keys))
    judged = await auth.judge(FWD_CONN, FWD_ENV, ParsedMessage.parse(forwarded))  # no 550
    assert judged.chain.cv is ArcCv.PASS


JUNK_SETS = [
    # a complete set whose AMS writes "i = 1 ;" (spaces): readable, but no valid signature
    b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=fwd.test; s=arc; b=AAAA\r\n"
    b"ARC-Message-Signature: i = 1 ; a=rsa-sha256; c=relaxed/relaxed; d=fwd.test;\r\n"
    b" s=arc; h=from:to; bh=AAAA; b=AAAA\r\n"
    b"ARC-Authentication-Results: i=1; fwd.test; dkim=pass\r\n",
    # fields with no i= at all
    b"ARC-Seal: junk\r\nARC-Message-Signature: more junk\r\n",
    # an AMS whose tag list does not parse
    b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=fwd.test; s=arc; b=AAAA\r\n"
    b"ARC-Message-Signature: i=1; a=rsa-sha256; d; x==; h=from; bh=AA; b=AA\r\n"
    b"ARC-Authentication-Results: i=1; fwd.test; dkim=pass\r\n",
]


@pytest.mark.parametrize("junk", JUNK_SETS)
async def test_junk_arc_headers_leave_dkim_pass_and_dmarc_pass(
    keys: dict[str, Any], junk: bytes
) -> None:
    message = junk + _signed(keys)
    v = await Authenticator(_config(), _resolver(keys)).evaluate(FWD_CONN, FWD_ENV, message)
    assert [d.result for d in v.results.dkim] == ["pass"]
    assert v.results.arc is not None and v.results.arc.cv is ArcCv.FAIL
    assert v.results.dmarc is not None and v.results.dmarc.result == "pass"
    assert v.action == "accept" and v.reply is None
    auth = Authenticator(_config(), _resolver(keys))
    judged = await auth.judge(FWD_CONN, FWD_ENV, ParsedMessage.parse(message))  # no 550
    assert judged.chain.cv is ArcCv.FAIL


async def test_arc_check_error_keeps_injected_dkim_results(keys: dict[str, Any]) -> None:
    """An ARC check that raises gives arc=fail; the DKIM check beside it stands."""

    async def broken_arc(message: object) -> ArcResult:
        raise ValueError("unreadable ARC set")

    auth = Authenticator(_config(), _resolver(keys), arc_check=broken_arc)
    v = await auth.evaluate(FWD_CONN, FWD_ENV, _signed(keys))
    assert [d.result for d in v.results.dkim] == ["pass"]
    assert v.results.arc is not None and v.results.arc.cv is ArcCv.FAIL
    assert v.action == "accept"


def _sealer(keys: dict[str, Any]) -> ArcSealer:
    return ArcSealer("relay.example.net", "seal", keys["ours"].private_pem, ID)


def test_no_seal_beside_arc_fields_with_no_readable_instance(keys: dict[str, Any]) -> None:
    """Sealing i=1 (cv=none) beside ARC fields would claim a fresh chain over a broken
    one; an AAR whose i= is not at its start names no instance (RFC 8617 4.1.1)."""
    for junk in (
        b"ARC-Seal: junk\r\n",
        b"ARC-Authentication-Results: x.test; spf=pass; i=5\r\n",
    ):
        chain = ArcResult(ArcCv.FAIL, reason="broken")
        assert _sealer(keys).seal_headers(junk + MESSAGE, f"{ID}; none", chain) == ()


def test_seal_follows_the_highest_readable_instance(keys: dict[str, Any]) -> None:
    junk = (
        b"ARC-Seal: i=2; cv=pass; a=rsa-sha256; d=fwd.test; s=arc; b=AAAA\r\n"
        b"ARC-Seal: no instance here\r\n"
        b"ARC-Message-Signature: a=rsa-sha256; d=fwd.test; s=arc; h=from; bh=AA; b=AA; i=2\r\n"
    )
    chain = ArcResult(ArcCv.FAIL, instances=2, reason="broken")
    lines = _sealer(keys).seal_headers(junk + MESSAGE, f"{ID}; none", chain)
    assert lines[0].startswith(b"ARC-Seal: i=3; cv=fail;")
    assert lines[2].startswith(b"ARC-Authentication-Results: i=3;")
