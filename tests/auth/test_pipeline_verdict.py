"""Authenticator: actions, the ARC override, forged A-R removal, concurrency (checks injected)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.auth.pipeline import Authenticator, arc_override
from relay.auth.results import parse_value, unfold
from relay.auth.types import ArcCv, ArcResult, DkimResult, SpfResult, SpfResultCode
from relay.config import ArcConfig, AuthConfig, Config, ServerConfig
from relay.dns import StaticResolver
from relay.errors import SmtpReplyError
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope

ID = "relay.example.net"
CONN = ConnInfo(peer_ip="192.0.2.10", peer_port=4000, helo="mx.lists.example.org")
ENV = Envelope(mail_from="bounces@lists.example.org", rcpt_tos=("u@example.net",))
DNS = StaticResolver(
    {
        ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"],
        ("_dmarc.quar.example", "TXT"): ["v=DMARC1; p=quarantine"],
        ("_dmarc.none.example", "TXT"): ["v=DMARC1; p=none"],
    }
)


def _config(**auth: str | bool) -> Config:
    return Config(
        path=Path("/nonexistent/config.toml"),
        server=ServerConfig(hostname=ID),
        auth=AuthConfig(**auth),  # type: ignore[arg-type]
        arc=ArcConfig(trusted_sealers=("lists.example.org",)),
    )


def _msg(from_domain: str = "example.com", extra: str = "") -> bytes:
    return (
        f"{extra}From: Ann <ann@{from_domain}>\r\nTo: u@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
    ).encode()


def _spf(result: SpfResultCode, domain: str = "lists.example.org"):  # type: ignore[no-untyped-def]
    async def check(ip: str, mail_from: str, helo: str) -> SpfResult:
        assert ip == CONN.peer_ip and mail_from == ENV.mail_from and helo == CONN.helo
        return SpfResult(result, domain, "mailfrom")

    return check


def _dkim(*sigs: DkimResult):  # type: ignore[no-untyped-def]
    async def check(message: ParsedMessage) -> tuple[DkimResult, ...]:
        return sigs

    return check


def _arc(result: ArcResult):  # type: ignore[no-untyped-def]
    async def check(message: ParsedMessage) -> ArcResult:
        return result

    return check


NO_ARC = ArcResult(ArcCv.NONE)
BROKEN_SIG = DkimResult("fail", "example.com", "s1", "abcdefgh", reason="body hash mismatch")


def _auth(config: Config | None = None, arc: ArcResult = NO_ARC, **kw: object) -> Authenticator:
    return Authenticator(
        config or _config(),
        DNS,
        spf_check=kw.get("spf", _spf(SpfResultCode.PASS)),  # type: ignore[arg-type]
        dkim_check=kw.get("dkim", _dkim(BROKEN_SIG)),  # type: ignore[arg-type]
        arc_check=_arc(arc),
        rng=lambda: 0.0,
    )


def _our_header(message: bytes) -> str:
    first = message.split(b"\r\n\r\n", 1)[0].decode()
    fields = [f for f in unfold(first + "\r\n").split("\r\n") if f]
    ours = [f for f in fields if f.lower().startswith("authentication-results:")]
    assert len(ours) == 1
    return ours[0].split(":", 1)[1]


async def test_dmarc_reject_failure_is_refused() -> None:
    v = await _auth().evaluate(CONN, ENV, _msg())
    assert v.action == "reject"
    assert v.reply is not None and v.reply.startswith("550 5.7.1 ")
    parsed = parse_value(_our_header(v.message))
    dmarc = [r for r in parsed.results if r.method == "dmarc"][0]
    assert dmarc.result == "fail" and dmarc.prop("header.from") == "example.com"
    assert "(p=reject dis=reject)" in v.header
    assert v.message.startswith(v.header.encode())
    with pytest.raises(SmtpReplyError) as exc:
        await _auth().judge(CONN, ENV, ParsedMessage.parse(_msg()))
    assert (exc.value.code, exc.value.enhanced) == (550, "5.7.1")


async def test_passing_dkim_is_accepted() -> None:
    ok = DkimResult("pass", "example.com", "s1", "abcdefgh")
    v = await _auth(dkim=_dkim(ok)).evaluate(CONN, ENV, _msg())
    assert (v.action, v.reply) == ("accept", None)
    assert v.results.dmarc is not None and v.results.dmarc.aligned_dkim
    assert "dmarc=pass (p=reject dis=none) header.from=example.com" in unfold(v.header)


AAR1_PASS = (
    "ARC-Authentication-Results: i=1; lists.example.org; spf=pass smtp.mailfrom=example.com;"
    "\r\n\tdkim=pass header.d=example.com; dmarc=pass (p=reject) header.from=example.com\r\n"
)


async def test_trusted_arc_chain_overrides_reject() -> None:
    chain = ArcResult(ArcCv.PASS, 1, 1, ("lists.example.org",))
    v = await _auth(arc=chain).evaluate(CONN, ENV, _msg(extra=AAR1_PASS))
    assert v.action == "accept"
    assert v.results.dmarc_override == "lists.example.org"
    text = unfold(v.header)
    assert "dmarc=fail (p=reject dis=none arc-sealer=lists.example.org)" in text
    assert "policy.override=trusted_forwarder" in text
    assert "arc=pass (i=1 oldest-pass=1 sealers=lists.example.org)" in text


async def test_untrusted_or_failing_chain_does_not_override() -> None:
    untrusted = ArcResult(ArcCv.PASS, 1, 1, ("evil.example",))
    assert (await _auth(arc=untrusted).evaluate(CONN, ENV, _msg(extra=AAR1_PASS))).action == (
        "reject"
    )
    failed = ArcResult(ArcCv.FAIL, 1, 0, ("lists.example.org",))
    assert (await _auth(arc=failed).evaluate(CONN, ENV, _msg(extra=AAR1_PASS))).action == "reject"
    aar_fail = AAR1_PASS.replace("dmarc=pass", "dmarc=fail")
    trusted = ArcResult(ArcCv.PASS, 1, 1, ("lists.example.org",))
    v = await _auth(arc=trusted).evaluate(CONN, ENV, _msg(extra=aar_fail))
    assert v.action == "reject"


def test_override_rule_needs_a_trusted_tail() -> None:
    aar = (
        AAR1_PASS.replace("lists.example.org", "evil.example")
        + "ARC-Authentication-Results: i=2; lists.example.org; dmarc=fail\r\n"
    )
    msg = _msg(extra=aar)
    chain = ArcResult(ArcCv.PASS, 2, 1, ("evil.example", "lists.example.org"))
    # i=1 (untrusted) claims dmarc=pass, the trusted i=2 saw fail: no override
    assert arc_override(chain, msg, ("lists.example.org",)) == ""
    # when both sealers are trusted, the oldest AAR (i=1) decides
    assert arc_override(chain, msg, ("lists.example.org", "evil.example")) == "evil.example"
    # the latest sealer must be trusted
    assert arc_override(chain, msg, ("evil.example",)) == ""


async def test_forged_results_removed_before_evaluation() -> None:
    forged = (
        "Authentication-Results: relay.example.net; dmarc=pass header.from=example.com\r\n"
        "Authentication-Results: (x) RELAY.EXAMPLE.NET; spf=pass\r\n"
        "Authentication-Results: mx.other.example; dmarc=pass\r\n"
    )
    seen: list[bytes] = []

    async def dkim(message: ParsedMessage) -> tuple[DkimResult, ...]:
        seen.append(message.raw)
        return (BROKEN_SIG,)

    v = await _auth(dkim=dkim).evaluate(CONN, ENV, _msg(extra=forged))
    assert v.removed == 2
    assert b"relay.example.net; dmarc=pass" not in seen[0]
    assert b"mx.other.example; dmarc=pass" in v.message
    assert v.message.lower().count(b"authentication-results: relay.example.net") == 1
    assert v.action == "reject"


async def test_quarantine_marks_the_header() -> None:
    v = await _auth().evaluate(CONN, ENV, _msg("quar.example"))
    assert v.action == "quarantine" and v.reply is None
    assert b"\r\nX-Relay-Quarantine: dmarc=fail policy=quarantine from=quar.example\r\n" in (
        v.message
    )
    assert "dis=quarantine" in v.header


async def test_actions_are_configurable() -> None:
    cfg = _config(dmarc_reject="quarantine", spf_fail="reject")
    v = await _auth(cfg).evaluate(CONN, ENV, _msg())
    assert v.action == "quarantine"
    v = await _auth(cfg, spf=_spf(SpfResultCode.FAIL)).evaluate(CONN, ENV, _msg("none.example"))
    assert v.action == "reject" and v.reply is not None
    assert v.reply.startswith("550 5.7.23")
    cfg = _config(dmarc_reject="accept")
    assert (await _auth(cfg).evaluate(CONN, ENV, _msg())).action == "accept"


async def test_disabled_still_strips_forged_results() -> None:
    forged = "Authentication-Results: relay.example.net; dmarc=pass\r\n"
    v = await _auth(_config(enabled=False)).evaluate(CONN, ENV, _msg(extra=forged))
    assert (v.action, v.header, v.removed) == ("accept", "", 1)
    assert v.message == _msg()


async def test_check_errors_become_temperror() -> None:
    async def boom(ip: str, mail_from: str, helo: str) -> SpfResult:
        raise RuntimeError("resolver exploded")

    async def boom2(message: ParsedMessage) -> tuple[DkimResult, ...]:
        raise RuntimeError("worker died")

    v = await _auth(spf=boom, dkim=boom2).evaluate(CONN, ENV, _msg("none.example"))
    assert v.results.spf is not None and v.results.spf.result is SpfResultCode.TEMPERROR
    assert v.results.dkim[0].result == "temperror"
    assert v.action == "accept"


async def test_checks_run_concurrently() -> None:
    spf_started = asyncio.Event()
    dkim_started = asyncio.Event()

    async def spf(ip: str, mail_from: str, helo: str) -> SpfResult:
        spf_started.set()
        await asyncio.wait_for(dkim_started.wait(), 2)
        return SpfResult(SpfResultCode.PASS, "lists.example.org", "mailfrom")

    async def dkim(message: ParsedMessage) -> tuple[DkimResult, ...]:
        dkim_started.set()
        await asyncio.wait_for(spf_started.wait(), 2)
        return (DkimResult("pass", "example.com", "s1", "x"),)

    v = await _auth(spf=spf, dkim=dkim).evaluate(CONN, ENV, _msg())
    assert v.results.spf is not None and v.results.spf.result is SpfResultCode.PASS
    assert v.results.dkim[0].result == "pass"


async def test_judge_hands_the_seal_our_results() -> None:
    """The verdict stage gives the seal stage the message with our A-R, the A-R value
    on one line (for the AAR) and the chain it validated."""
    ok = DkimResult("pass", "example.com", "s1", "abcdefgh")
    auth = Authenticator(
        _config(),
        DNS,
        spf_check=_spf(SpfResultCode.PASS),
        dkim_check=_dkim(ok),
        arc_check=_arc(NO_ARC),
    )
    judged = await auth.judge(CONN, ENV, ParsedMessage.parse(_msg()))
    assert judged.message.raw.startswith(b"Authentication-Results: relay.example.net;")
    assert judged.message.fields[0].name == "Authentication-Results"
    assert judged.ar_value.startswith("relay.example.net; spf=pass")
    assert "\r" not in judged.ar_value
    assert judged.chain is NO_ARC
