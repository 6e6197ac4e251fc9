"""Issue 11 end to end over loopback with the lab DNS: a p=reject author's post reaches
three members at three domains munged, with the right List-* fields, list-domain DKIM
covering List-Unsubscribe(-Post) and a verifying ARC chain, and `relay diagnose` on a
copy says DMARC pass; a p=none author keeps From and their own signature; one-click
unsubscribes exactly that member (GET does not, a wrong token is 404); subscribe by mail
with confirmation (reply, and link); a non-member's post held then approved and
delivered, or rejected; five hard bounces disable a member, an ARF report removes one."""

from __future__ import annotations

import asyncio
import contextlib
import email
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import dkim
import pytest

from relay.app import RelayApp
from relay.auth.arc import ArcSealer
from relay.auth.dkim import DkimSigner
from relay.auth.types import ArcCv, ArcResult
from relay.cli import main as cli
from relay.commands.diagnose import diagnose
from relay.config import dump_toml, load_config
from relay.lab.mta import LabMta, Received
from relay.lists import members as db
from tests.labutil import free_port, send
from tests.lists.listlab import AUTHOR_IP, LIST, MEMBER_IPS, PLAIN, ListLab, post

pytestmark = pytest.mark.slow
MEMBERS = ["b@one.test", "c@two.test", "d@three.test"]


class Clock:
    """Real time plus what a test adds (a day between bounces)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    async with make_world(tmp_path) as w:
        yield w


@pytest.fixture
async def trusting_world(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """The author's IP in the trusted networks: it may relay to other domains too."""
    async with make_world(tmp_path, trusted=[AUTHOR_IP]) as w:
        yield w


@contextlib.asynccontextmanager
async def make_world(tmp_path: Path, trusted: list[str] = []) -> AsyncIterator[dict[str, Any]]:  # noqa: B006
    lab = ListLab(tmp_path)
    mtas: dict[str, LabMta] = {}
    port = 0
    for dom, ip in MEMBER_IPS.items():
        mtas[dom] = await LabMta(ip, port, hostname=f"mx.{dom}").start()
        port = mtas[dom].port
    http_port = free_port()
    cfg = tmp_path / "config.toml"
    doc = lab.doc(port, http_port=http_port)
    doc["relay"]["trusted_networks"] = ["127.0.0.1/32", *(f"{ip}/32" for ip in trusted)]
    cfg.write_text(dump_toml(doc))
    for lst in (LIST, PLAIN):
        assert cli(["list", "add", lst, *MEMBERS, "--config", str(cfg)]) == 0
    clock = Clock()
    app = RelayApp(load_config(cfg), poll_interval=0.05, clock=clock)
    await app.start()
    host, smtp_port = app.bound[0]
    yield {
        "lab": lab,
        "app": app,
        "mtas": mtas,
        "cfg": cfg,
        "smtp": (host, smtp_port),
        "http": f"http://127.0.0.1:{http_port}",
        "clock": clock,
    }
    await app.stop(grace=2)
    for m in mtas.values():
        await m.stop()
    lab.close()


async def arrivals(mtas: dict[str, LabMta], n: int, timeout: float = 20) -> list[Received]:
    async with asyncio.timeout(timeout):
        while sum(len(m.messages) for m in mtas.values()) < n:
            await asyncio.sleep(0.05)
    return [r for m in mtas.values() for r in m.messages]


async def members(w: dict[str, Any], lst: str = LIST) -> dict[str, db.Member]:
    store = w["app"].lists.store
    return {m.address: m for m in await store.read(lambda c: db.members(c, lst))}


def fields(data: bytes, name: str) -> list[str]:
    return email.message_from_bytes(data).get_all(name) or []


async def test_p_reject_author_munged_signed_sealed_and_dmarc_passes(world: dict[str, Any]) -> None:
    w, lab = world, world["lab"]
    signed = DkimSigner("author.test", "s1", lab.author_key).sign(post("alice@author.test", LIST))
    host, port = w["smtp"]
    await send(host, port, "alice@author.test", [LIST], signed, source=AUTHOR_IP)
    got = await arrivals(w["mtas"], 3)
    assert sorted(r.rcpt_tos[0] for r in got) == MEMBERS
    for dom, mta in w["mtas"].items():
        assert len(mta.messages) == 1 and mta.messages[0].rcpt_tos[0].endswith(dom)
    tokens = {a: m.token for a, m in (await members(w)).items()}
    for r in got:
        rcpt, data = r.rcpt_tos[0], r.data
        assert r.mail_from == f"dev-bounces+{tokens[rcpt]}@lists.lab.test"
        assert fields(data, "From") == ['"Alice Author via Developers" <dev@lists.lab.test>']
        assert fields(data, "Reply-To") == ["alice@author.test"]
        assert fields(data, "Subject") == ["[dev] plan"]
        assert fields(data, "List-Id") == ['"Developers" <dev.lists.lab.test>']
        assert fields(data, "List-Post") == ["<mailto:dev@lists.lab.test>"]
        assert fields(data, "List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
        assert fields(data, "Precedence") == ["list"]
        assert fields(data, "List-Unsubscribe") == [
            f"<{w['http']}/lists/unsubscribe/{tokens[rcpt]}>, "
            "<mailto:dev-unsubscribe@lists.lab.test?subject=unsubscribe>"
        ]
        sigs = [dkim.util.parse_tag_value(s.encode()) for s in fields(data, "DKIM-Signature")]
        i = next(i for i, s in enumerate(sigs) if s[b"d"] == b"lists.lab.test")
        h = [x.strip().lower() for x in sigs[i][b"h"].split(b":")]
        assert b"list-unsubscribe" in h and b"list-unsubscribe-post" in h
        assert dkim.DKIM(data).verify(idx=i, dnsfunc=lab.txt)
        cv, _, reason = dkim.arc_verify(data, dnsfunc=lab.txt)
        assert cv == dkim.CV_Pass, reason
        instances = sorted(
            int(dkim.util.parse_tag_value(s.encode())[b"i"]) for s in fields(data, "ARC-Seal")
        )
        assert instances == [1]  # one ARC set, the copy's: none of intake's besides
        verdict = await diagnose(
            load_config(w["cfg"]), data, "127.0.0.1", "relay.lab.test", r.mail_from
        )
        assert verdict.results.dmarc is not None
        assert verdict.results.dmarc.result == "pass", verdict.results.dmarc.reason


def arc_sets(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(i, d, cv) of each ARC-Seal of a message, by instance."""
    tags = [dkim.util.parse_tag_value(s.encode()) for s in fields(data, "ARC-Seal")]
    return sorted((int(t[b"i"]), t[b"d"], t[b"cv"]) for t in tags)


def upstream_sealed(lab: ListLab, data: bytes) -> bytes:
    """data as a forwarder (fwd.test) upstream of the relay sealed it: ARC i=1."""
    key = lab.publish("arc", "fwd.test")
    sealer = ArcSealer("fwd.test", "arc", key, "fwd.test")
    return sealer.seal(data, "fwd.test; dkim=pass header.d=author.test", ArcResult(ArcCv.NONE))


async def test_copy_of_an_arc_sealed_post_has_one_set_of_ours(world: dict[str, Any]) -> None:
    """Issue 11 item 5: a post that arrives with an ARC set (i=1) gives copies with one
    set of ours, i = 1 + 1, over the copy's final fields, cv=pass; the chain verifies and
    its AAR repeats intake's verdict (before: intake's seal i=2 and the copy's i=3)."""
    w, lab = world, world["lab"]
    signed = DkimSigner("author.test", "s1", lab.author_key).sign(post("alice@author.test", LIST))
    host, port = w["smtp"]
    await send(
        host, port, "alice@author.test", [LIST], upstream_sealed(lab, signed), source=AUTHOR_IP
    )
    got = await arrivals(w["mtas"], 3)
    for r in got:
        assert arc_sets(r.data) == [(1, b"fwd.test", b"none"), (2, b"relay.lab.test", b"pass")]
        cv, _, reason = dkim.arc_verify(r.data, dnsfunc=lab.txt)
        assert cv == dkim.CV_Pass, reason
        aar = [a for a in fields(r.data, "ARC-Authentication-Results") if a.startswith("i=2")]
        assert len(aar) == 1 and "relay.lab.test;" in aar[0] and "dmarc=pass" in aar[0], aar


async def test_list_and_other_recipient_each_sealed_once(trusting_world: dict[str, Any]) -> None:
    """One transaction to the list and to a plain recipient: the list copies carry one
    set of ours (i=2 over the copy), the plain recipient's message intake's seal (i=2
    over the message as it arrived), each chain verifying."""
    w, lab = trusting_world, trusting_world["lab"]
    signed = DkimSigner("author.test", "s1", lab.author_key).sign(post("alice@author.test", LIST))
    host, port = w["smtp"]
    rcpts = [LIST, "zed@two.test"]
    errors, _ = await send(
        host, port, "alice@author.test", rcpts, upstream_sealed(lab, signed), source=AUTHOR_IP
    )
    assert errors == {}
    got = await arrivals(w["mtas"], 4)
    by = {r.rcpt_tos[0]: r.data for r in got}
    assert sorted(by) == sorted([*MEMBERS, "zed@two.test"])
    for rcpt, data in by.items():
        assert arc_sets(data) == [(1, b"fwd.test", b"none"), (2, b"relay.lab.test", b"pass")]
        cv, _, reason = dkim.arc_verify(data, dnsfunc=lab.txt)
        assert cv == dkim.CV_Pass, (rcpt, reason)
    assert fields(by["zed@two.test"], "From") == ["Alice Author <alice@author.test>"]
    assert fields(by["zed@two.test"], "List-Id") == []


async def test_p_none_author_keeps_from_and_own_signature(world: dict[str, Any]) -> None:
    w, lab = world, world["lab"]
    await w["app"].lists.store.write(lambda c: db.add_member(c, PLAIN, "bob@nopolicy.test", 1.0))
    raw = post("bob@nopolicy.test", PLAIN, "hello")
    signed = DkimSigner("nopolicy.test", "s1", lab.nopolicy_key).sign(raw)
    host, port = w["smtp"]
    await send(host, port, "bob@nopolicy.test", [PLAIN], signed, source=AUTHOR_IP)
    got = await arrivals(w["mtas"], 3)
    for r in got:
        assert fields(r.data, "From") == ["Alice Author <bob@nopolicy.test>"]
        assert fields(r.data, "Subject") == ["hello"]
        sigs = [dkim.util.parse_tag_value(s.encode()) for s in fields(r.data, "DKIM-Signature")]
        domains = [s[b"d"] for s in sigs]
        assert sorted(domains) == [b"lists.lab.test", b"nopolicy.test"]
        for i in range(2):
            assert dkim.DKIM(r.data).verify(idx=i, dnsfunc=lab.txt), domains[i]


async def test_one_click_unsubscribes_exactly_that_member(world: dict[str, Any]) -> None:
    w = world
    host, port = w["smtp"]
    await send(
        host, port, "alice@author.test", [LIST], post("alice@author.test", LIST), source=AUTHOR_IP
    )
    got = {r.rcpt_tos[0]: r for r in await arrivals(w["mtas"], 3)}
    urls = {
        a: fields(r.data, "List-Unsubscribe")[0].split(",")[0].strip().strip("<>")
        for a, r in got.items()
    }
    async with aiohttp.ClientSession() as http:
        async with http.get(urls["c@two.test"]) as resp:
            assert resp.status == 200
        async with http.post(
            urls["b@one.test"], data={"List-Unsubscribe": "One-Click"}, allow_redirects=False
        ) as resp:
            assert resp.status == 200
        async with http.post(
            urls["b@one.test"].rsplit("/", 1)[0] + "/" + "f" * 32,
            data={"List-Unsubscribe": "One-Click"},
        ) as resp:
            assert resp.status == 404
    assert sorted(await members(w)) == ["c@two.test", "d@three.test"]


async def test_subscribe_by_mail_reply_and_link(world: dict[str, Any]) -> None:
    w = world
    host, port = w["smtp"]
    sub = "dev-subscribe@lists.lab.test"
    for who in ("e@one.test", "f@two.test"):
        note = f"From: {who}\r\nSubject: subscribe\r\n\r\n".encode()
        await send(host, port, who, [sub], note, source=AUTHOR_IP)
    got = await arrivals(w["mtas"], 2)
    by = {r.rcpt_tos[0]: r.data for r in got}
    reply_to = fields(by["e@one.test"], "Reply-To")[0].strip("<>")
    await send(
        host,
        port,
        "e@one.test",
        [reply_to],
        b"From: e@one.test\r\nSubject: Re: confirm\r\n\r\nyes\r\n",
        source=AUTHOR_IP,
    )
    link = by["f@two.test"].decode().split("    ", 1)[1].split()[0]
    async with aiohttp.ClientSession() as http:
        async with http.get(link) as resp:
            assert resp.status == 200
        assert (await members(w))["f@two.test"].state == "pending"
        async with http.post(link) as resp:
            assert resp.status == 200
    ms = await members(w)
    assert ms["e@one.test"].state == "active" and ms["f@two.test"].state == "active"


async def test_held_post_approved_and_rejected(world: dict[str, Any]) -> None:
    w = world
    host, port = w["smtp"]
    cfg = str(w["cfg"])
    await send(
        host,
        port,
        "alice@author.test",
        [PLAIN],
        post("alice@author.test", PLAIN, "p1"),
        source=AUTHOR_IP,
    )
    await arrivals(w["mtas"], 1)  # the owner's notice
    notice = w["mtas"]["one.test"].messages[0]
    assert notice.rcpt_tos[0] == "owner@one.test" and b"held" in notice.data
    store = w["app"].lists.store
    held = await store.read(lambda c: db.held_posts(c, PLAIN))
    assert len(held) == 1
    assert (
        await asyncio.to_thread(cli, ["list", "approve", PLAIN, held[0].id, "--config", cfg]) == 0
    )
    got = await arrivals(w["mtas"], 4)
    copies = [r for r in got if fields(r.data, "Subject") == ["p1"]]
    assert sorted(r.rcpt_tos[0] for r in copies) == MEMBERS
    for r in copies:  # the verdict kept with the held post is the copy's one AAR
        assert arc_sets(r.data) == [(1, b"relay.lab.test", b"none")]
        [aar] = fields(r.data, "ARC-Authentication-Results")
        assert aar.startswith("i=1; relay.lab.test;") and "spf=pass" in aar, aar
        cv, _, reason = dkim.arc_verify(r.data, dnsfunc=w["lab"].txt)
        assert cv == dkim.CV_Pass, reason
    await send(
        host,
        port,
        "alice@author.test",
        [PLAIN],
        post("alice@author.test", PLAIN, "p2"),
        source=AUTHOR_IP,
    )
    await arrivals(w["mtas"], 5)
    held = await store.read(lambda c: db.held_posts(c, PLAIN))
    argv = ["list", "reject", PLAIN, held[0].id, "--reason", "off topic", "--config", cfg]
    assert await asyncio.to_thread(cli, argv) == 0
    assert await store.read(lambda c: db.held_posts(c, PLAIN)) == []


DSN = (
    b"From: MAILER-DAEMON@mx.one.test\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
    b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.one.test\r\n\r\n"
    b"Final-Recipient: rfc822; b@one.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b--\r\n"
)
ARF = (
    b"From: fbl@two.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; "
    b"report-type=feedback-report; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
    b"abuse report\r\n--b\r\nContent-Type: message/feedback-report\r\n\r\n"
    b"Feedback-Type: abuse\r\nVersion: 1\r\n\r\n--b--\r\n"
)


async def test_five_hard_bounces_disable_and_arf_removes(world: dict[str, Any]) -> None:
    w = world
    host, port = w["smtp"]
    ms = await members(w)
    verp_b = f"dev-bounces+{ms['b@one.test'].token}@lists.lab.test"
    for _ in range(5):
        await send(host, port, "", [verp_b], DSN, source="127.0.0.2")
        w["clock"].advance(86400)
    assert (await members(w))["b@one.test"].state == "disabled"
    probe = await arrivals(w["mtas"], 1)
    assert probe[0].rcpt_tos[0] == "b@one.test"
    verp_c = f"dev-bounces+{ms['c@two.test'].token}@lists.lab.test"
    await send(host, port, "", [verp_c], ARF, source="127.0.0.3")
    assert "c@two.test" not in await members(w)


async def test_a_refused_copy_scores_its_member_through_our_own_dsn(world: dict[str, Any]) -> None:
    """The member's MX refuses the copy (550 5.1.1): the relay's DSN goes to the copy's
    VERP address, comes back to the list through intake, and scores that member hard."""
    w = world
    w["mtas"]["one.test"].refuse_rcpt("b@one.test", "550 5.1.1 <b@one.test>: no such user")
    host, port = w["smtp"]
    await send(
        host, port, "alice@author.test", [LIST], post("alice@author.test", LIST), source=AUTHOR_IP
    )
    async with asyncio.timeout(20):
        while (await members(w))["b@one.test"].score < 1.0:
            await asyncio.sleep(0.05)
    ms = await members(w)
    assert ms["b@one.test"].score == 1.0 and ms["c@two.test"].score == 0.0
    assert not [r for r in w["mtas"]["one.test"].messages if b"Undelivered" in r.data]
