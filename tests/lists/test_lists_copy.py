"""A post made into member copies: list headers, subject prefix once, DMARC munge and
wrap, footer only when no author signature breaks, per-member List-Unsubscribe, DKIM by
the list domain covering List-Unsubscribe(-Post), ARC sealed i = previous + 1; verified
with dkimpy's own verifiers."""

from __future__ import annotations

import email
import time
from pathlib import Path
from typing import Any

import dkim
import pytest

from relay.auth.arc import ArcSealer
from relay.auth.dkim import DkimSigner
from relay.auth.fastrsa import PrependView
from relay.auth.signer import OutboundSigner, pick_domain
from relay.auth.types import ArcCv, ArcResult
from relay.commands.keygen import generate
from relay.config import parse_config
from relay.lists import transform
from relay.lists.addresses import address_of, parse_list_address
from relay.lists.policy import needs_mitigation, posting_decision, published_policy, score_bounce
from relay.lists.service import CopyMaker

BASE = "https://lists.example.org"
POST = (
    b"From: Alice Author <alice@author.test>\r\nTo: dev@lists.example.org\r\n"
    b"Subject: plan\r\nMessage-ID: <p1@author.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"\r\nThe plan.\r\n"
)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"list": generate("rsa"), "author": generate("rsa"), "arc": generate("rsa")}


def _config(tmp: Path, keys: dict[str, Any], **lst: Any) -> Any:
    key = tmp / "list.pem"
    key.write_bytes(keys["list"].private_pem)
    table = {"owners": ["owner@example.org"], "name": "Developers"} | lst
    return parse_config(
        {
            "server": {"hostname": "relay.example.org"},
            "lists": {"dev@lists.example.org": table},
            "lists_http": {"base_url": BASE},
            "dkim": {
                "sign": [
                    {"domain": "lists.example.org", "selector": "s2026", "private_key": str(key)}
                ]
            },
        },
        tmp / "config.toml",
    )


def _dns(keys: dict[str, Any]) -> Any:
    records = {
        b"s2026._domainkey.lists.example.org.": keys["list"].record().encode(),
        b"s1._domainkey.author.test.": keys["author"].record().encode(),
        b"arc._domainkey.relay.example.org.": keys["arc"].record().encode(),
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name if name.endswith(b".") else name + b".", b"")

    return dnsfunc


def _sealer(keys: dict[str, Any]) -> ArcSealer:
    return ArcSealer("relay.example.org", "arc", keys["arc"].private_pem, "relay.example.org")


def test_addresses() -> None:
    from relay.config import ListConfig

    lists = {"dev@lists.example.org": ListConfig("dev@lists.example.org", owners=("o@x.org",))}
    assert parse_list_address("DEV@Lists.Example.org", lists).kind == "post"  # type: ignore[union-attr]
    tok = "a" * 32
    la = parse_list_address(f"dev-bounces+{tok}@lists.example.org", lists)
    assert la is not None and (la.kind, la.token) == ("bounces", tok)
    assert parse_list_address("dev-confirm+x!@lists.example.org", lists) is None
    assert parse_list_address("dev+x@lists.example.org", lists) is None
    assert parse_list_address("other@lists.example.org", lists) is None
    for kind in ("subscribe", "unsubscribe", "owner"):
        got = parse_list_address(f"dev-{kind}@lists.example.org", lists)
        assert got is not None and got.kind == kind


def test_policies() -> None:
    assert published_policy("v=DMARC1; p=reject", subdomain=False) == "reject"
    assert published_policy("v=DMARC1; p=reject; sp=none", subdomain=True) == "none"
    assert published_policy("v=DMARC1; p=none; np=reject", True, nonexistent=True) == "reject"
    assert published_policy("v=DMARC1; p=quarantine", True, nonexistent=True) == "quarantine"
    s = score_bounce(4.0, "2026-12-01", "2026-12-02", "hard", 5.0, False)
    assert s.counted and s.disable and s.score == 5.0
    assert not score_bounce(4.0, "2026-12-02", "2026-12-02", "hard", 5.0, False).counted
    assert score_bounce(0, "", "d", "soft", 5.0, False).score == 0.5
    assert pick_domain("a.lists.example.org", ["lists.example.org"]) == "lists.example.org"
    assert pick_domain("example.org", ["lists.example.org"]) is None
    assert pick_domain("org", ["org"]) is None


def test_posting_and_mitigation_rules(tmp_path: Path, keys: dict[str, Any]) -> None:
    cfg = _config(tmp_path, keys).lists["dev@lists.example.org"]
    assert posting_decision(cfg, True)[0] == "accept"
    assert posting_decision(cfg, False)[0] == "hold"
    assert needs_mitigation(cfg, "reject") and needs_mitigation(cfg, "quarantine")
    assert not needs_mitigation(cfg, "none") and not needs_mitigation(cfg, "")


def test_munged_copy_verifies(tmp_path: Path, keys: dict[str, Any]) -> None:
    config = _config(tmp_path, keys, subject_prefix="[dev]", footer="Unsubscribe: see headers")
    cfg = config.lists["dev@lists.example.org"]
    dist = transform.distribute(POST, cfg, BASE, mitigate=True)
    maker = CopyMaker(config, OutboundSigner.from_config(config), _sealer(keys))
    token = "0123456789abcdef0123456789abcdef"
    copy = maker.copy(cfg, dist, token, "relay.example.org; dmarc=fail", ArcResult(ArcCv.NONE))
    msg = email.message_from_bytes(copy)
    assert msg["From"] == '"Alice Author via Developers" <dev@lists.example.org>'
    assert msg["Reply-To"] == "alice@author.test"
    assert msg["Subject"] == "[dev] plan"
    assert msg["List-Id"] == '"Developers" <dev.lists.example.org>'
    assert msg["List-Unsubscribe"] == (
        f"<{BASE}/lists/unsubscribe/{token}>, "
        "<mailto:dev-unsubscribe@lists.example.org?subject=unsubscribe>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Precedence"] == "list"
    assert msg["List-Post"] == "<mailto:dev@lists.example.org>"
    assert b"-- \r\nUnsubscribe: see headers\r\n" in copy
    d = dkim.DKIM(copy)
    assert d.verify(dnsfunc=_dns(keys))
    sig = dkim.util.parse_tag_value(msg["DKIM-Signature"].encode())
    assert sig[b"d"] == b"lists.example.org"
    signed = [h.strip().lower() for h in sig[b"h"].split(b":")]
    assert b"list-unsubscribe" in signed and b"list-unsubscribe-post" in signed
    cv, results, reason = dkim.arc_verify(copy, dnsfunc=_dns(keys))
    assert cv == dkim.CV_Pass, (cv, reason)
    assert b"i=1" in msg["ARC-Seal"].encode()
    # replies keep one prefix
    reply = POST.replace(b"Subject: plan", b"Subject: Re: [dev] plan")
    again = email.message_from_bytes(transform.distribute(reply, cfg, BASE, True))
    assert again["Subject"] == "Re: [dev] plan"


def test_second_seal_is_previous_plus_one(tmp_path: Path, keys: dict[str, Any]) -> None:
    """Intake sealed i=1 (the post as received); the copy is sealed i=2 with cv=pass and the
    chain verifies."""
    config = _config(tmp_path, keys)
    cfg = config.lists["dev@lists.example.org"]
    sealed = _sealer(keys).seal(POST, "relay.example.org; spf=pass", ArcResult(ArcCv.NONE))
    from relay.lists.service import chain_of

    ar, chain = chain_of(sealed)
    assert chain.cv is ArcCv.PASS and chain.instances == 1
    dist = transform.distribute(sealed, cfg, BASE, mitigate=True)
    maker = CopyMaker(config, OutboundSigner.from_config(config), _sealer(keys))
    copy = maker.copy(cfg, dist, "f" * 32, ar, chain)
    cv, _, reason = dkim.arc_verify(copy, dnsfunc=_dns(keys))
    assert cv == dkim.CV_Pass, reason
    assert b"ARC-Seal: i=2" in copy or b"i=2;" in copy.split(b"\r\n\r\n")[0]


def test_p_none_author_keeps_from_and_signature(tmp_path: Path, keys: dict[str, Any]) -> None:
    config = _config(tmp_path, keys, footer="a footer")  # footer: not added (signature)
    cfg = config.lists["dev@lists.example.org"]
    signed = DkimSigner("author.test", "s1", keys["author"].private_pem).sign(POST)
    dist = transform.distribute(signed, cfg, BASE, mitigate=False)
    assert b"a footer" not in dist
    maker = CopyMaker(config, OutboundSigner.from_config(config), None)
    copy = maker.copy(cfg, dist, "e" * 32, "", ArcResult(ArcCv.NONE))
    msg = email.message_from_bytes(copy)
    assert msg["From"] == "Alice Author <alice@author.test>"
    assert dkim.DKIM(copy).verify(idx=0, dnsfunc=_dns(keys))  # the list's
    assert dkim.DKIM(copy).verify(idx=1, dnsfunc=_dns(keys))  # the author's


def test_wrap(tmp_path: Path, keys: dict[str, Any]) -> None:
    config = _config(tmp_path, keys, dmarc_mitigation="wrap")
    cfg = config.lists["dev@lists.example.org"]
    msg = email.message_from_bytes(transform.distribute(POST, cfg, BASE, mitigate=True))
    assert msg["From"] == '"Alice Author via Developers" <dev@lists.example.org>'
    assert msg.get_content_type() == "multipart/mixed"
    inner = [p for p in msg.walk() if p.get_content_type() == "message/rfc822"]
    assert inner and inner[0].get_payload()[0]["From"] == "Alice Author <alice@author.test>"


def test_reply_to_list_puts_author_in_cc(tmp_path: Path, keys: dict[str, Any]) -> None:
    config = _config(tmp_path, keys, reply_to="list")
    cfg = config.lists["dev@lists.example.org"]
    msg = email.message_from_bytes(transform.distribute(POST, cfg, BASE, mitigate=True))
    assert msg["Cc"] == "alice@author.test"
    assert msg["Reply-To"] == "<dev@lists.example.org>"


def test_loop_detection(tmp_path: Path, keys: dict[str, Any]) -> None:
    cfg = _config(tmp_path, keys).lists["dev@lists.example.org"]
    dist = transform.distribute(POST, cfg, BASE, mitigate=False)
    assert transform.has_our_list_id(dist, cfg)
    assert not transform.has_our_list_id(POST, cfg)
    assert address_of(cfg, "bounces", "t" * 16) == f"dev-bounces+{'t' * 16}@lists.example.org"


def test_the_header_split_edge_cases() -> None:
    """The lists split headers with relay.message's splitter: an LF-only message keeps
    its body, a header line that is no field is kept as it came, folding is kept, a
    header-only message has an empty body; a CRLF message comes back byte for byte."""
    crlf = b"From: a@x.test\r\nSubject: one\r\n two\r\nTo: b@y.test\r\n\r\nbody\r\n\r\nmore\r\n"
    fields, body = transform.split_message(crlf)
    assert [f.key for f in fields] == [b"from", b"subject", b"to"]
    assert fields[1].value() == "one two" and body == b"body\r\n\r\nmore\r\n"
    assert transform.join_message(fields, body) == crlf
    lf = b"From: a@x.test\nSubject: lf\n\nthe body\n"
    fields, body = transform.split_message(lf)
    assert [f.key for f in fields] == [b"from", b"subject"] and body == b"the body\n"
    odd = b"From: a@x.test\r\nno colon here\r\nSubject : spaced\r\n\r\nb\r\n"
    fields, body = transform.split_message(odd)
    assert [f.raw for f in fields][1] == b"no colon here\r\n" and fields[1].key == b""
    assert fields[2].key == b"subject" and transform.join_message(fields, body) == odd
    fields, body = transform.split_message(b"Subject: only")
    assert [f.key for f in fields] == [b"subject"] and body == b""
    # an LF-only post distributed: the body stays the body
    cfg = parse_config(
        {
            "storage": {"path": "/tmp/unused.sqlite3"},
            "lists": {"dev@lists.example.org": {"owners": ["o@example.org"]}},
            "lists_http": {"base_url": "https://lists.example.org"},
        },
        Path("/tmp/config.toml"),
    ).lists["dev@lists.example.org"]
    out = transform.distribute(lf, cfg, "https://lists.example.org", False)
    assert out.endswith(b"\r\nthe body\n") and b"List-Id:" in out.split(b"the body")[0]


_NOW = float(int(time.time()) - 60)  # fixed for the whole run: t= the same in both


def _clock() -> float:
    return _NOW


@pytest.mark.parametrize("case", ["munged", "sealed_post", "author_signed", "wrap", "spaces"])
def test_a_batch_makes_the_bytes_copy_makes(
    tmp_path: Path, keys: dict[str, Any], case: str
) -> None:
    """CopyMaker.batch (the list-wide copy parsed and its body hashed once a batch, each
    copy's own fields parsed alone) gives byte for byte what CopyMaker.copy gives for each
    member (RSA PKCS#1 v1.5 signatures are deterministic; the clock is fixed), and the
    copies verify (DKIM by the list domain, the ARC chain)."""
    from relay.lists.service import chain_of
    from relay.stages import Verdict

    opts: dict[str, Any] = {"subject_prefix": "[dev]", "footer": "see headers"}
    post, sealer = (
        POST,
        ArcSealer(
            "relay.example.org", "arc", keys["arc"].private_pem, "relay.example.org", clock=_clock
        ),
    )
    verdict = Verdict("relay.example.org; dmarc=fail", ArcResult(ArcCv.NONE))
    mitigate = True
    if case == "sealed_post":
        post = sealer.seal(POST, "relay.example.org; spf=pass", ArcResult(ArcCv.NONE))
        verdict = Verdict(*chain_of(post))
    elif case == "author_signed":
        post = DkimSigner("author.test", "s1", keys["author"].private_pem).sign(POST)
        mitigate = False
    elif case == "wrap":
        opts["dmarc_mitigation"] = "wrap"
    elif case == "spaces":
        post = POST.replace(b"The plan.", b"The\tplan,  in  detail. \r\n\r\n\r\n")
    config = _config(tmp_path, keys, **opts)
    cfg = config.lists["dev@lists.example.org"]
    dist = transform.distribute(post, cfg, BASE, mitigate=mitigate)
    maker = CopyMaker(config, OutboundSigner.from_config(config, clock=_clock), sealer)
    rcpts = [(f"m{i}@one.test", f"{i:032x}") for i in range(3)] + [("gone@one.test", "")]
    view = PrependView(dist)
    assert view.usual and maker._composes(cfg, view, "0" * 32)  # the reusing path is taken
    made = maker.batch(cfg, dist, rcpts, verdict)
    assert [(a, t) for a, t, _ in made] == rcpts[:3]  # no copy without a token
    for a, t, data in made:
        assert data == maker.copy(cfg, dist, t, verdict.ar, verdict.chain), a
        assert dkim.DKIM(data).verify(idx=0, dnsfunc=_dns(keys))
        cv, _, reason = dkim.arc_verify(data, dnsfunc=_dns(keys))
        assert cv == dkim.CV_Pass, (case, reason)


def test_one_arc_set_serves_a_batch_and_the_dkim_signature_covers_each_members_field(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    """The copies of a batch carry one ARC set (made once: a copy costs one RSA signature,
    the list's DKIM one); its AMS signs every list-wide field but not List-Unsubscribe,
    which differs per member and which the list's DKIM signature covers (RFC 8058 section
    4). Changing one member's List-Unsubscribe breaks that copy's DKIM signature."""
    config = _config(tmp_path, keys, subject_prefix="[dev]")
    cfg = config.lists["dev@lists.example.org"]
    dist = transform.distribute(POST, cfg, BASE, mitigate=True)
    maker = CopyMaker(config, OutboundSigner.from_config(config), _sealer(keys))
    verdict_ar, chain = "relay.example.org; dmarc=fail", ArcResult(ArcCv.NONE)
    from relay.stages import Verdict

    rcpts = [(f"m{i}@one.test", f"{i:032x}") for i in range(4)]
    made = maker.batch(cfg, dist, rcpts, Verdict(verdict_ar, chain))
    sets = set()
    for _, token, data in made:
        head = data.split(b"\r\n\r\n", 1)[0]
        cut = head.index(b"\r\nDKIM-Signature:")
        sets.add(head[:cut])
        assert head[:cut].startswith(b"ARC-Seal: i=1")
        msg = email.message_from_bytes(data)
        ams = dkim.util.parse_tag_value(msg["ARC-Message-Signature"].encode())
        in_ams = [h.strip().lower() for h in ams[b"h"].split(b":")]
        assert b"list-unsubscribe" not in in_ams and b"dkim-signature" not in in_ams
        for field in (b"from", b"subject", b"list-id", b"list-post", b"reply-to"):
            assert field in in_ams, field
        sig = dkim.util.parse_tag_value(msg["DKIM-Signature"].encode())
        assert b"list-unsubscribe" in [h.strip().lower() for h in sig[b"h"].split(b":")]
        assert token.encode() in msg["List-Unsubscribe"].encode()
        assert dkim.DKIM(data).verify(dnsfunc=_dns(keys))
        assert dkim.arc_verify(data, dnsfunc=_dns(keys))[0] == dkim.CV_Pass
        forged = data.replace(token.encode(), b"f" * 32, 1)
        assert not dkim.DKIM(forged).verify(dnsfunc=_dns(keys))
    assert len(sets) == 1 and len(made) == 4
