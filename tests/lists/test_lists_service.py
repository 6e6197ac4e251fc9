"""The list service over a real store: posts fanned out into queued copies (one each,
idempotent), held / approved / rejected / expired posts, subscribe by mail with
confirmation, unsubscribe, bounces scored to disabled, ARF removal, strangers dropped."""

from __future__ import annotations

import email
from pathlib import Path
from typing import Any

import pytest
import structlog

from relay.commands.keygen import generate
from relay.config import Config, parse_config
from relay.dns import StaticResolver
from relay.errors import SmtpReplyError
from relay.lists import members as db
from relay.lists.service import ListService
from relay.lists.tx import ListsDb, Tx, lists_db
from relay.model import Envelope
from relay.queue.base import QueueSpool
from tests.pg.backends import QueueBackend

LIST = "dev@lists.example.org"
BASE = "https://lists.example.org"


def post(frm: str = "alice@author.test", subject: str = "plan", extra: str = "") -> bytes:
    return (
        f"From: Alice <{frm}>\r\nTo: {LIST}\r\nSubject: {subject}\r\n{extra}"
        f"Message-ID: <{subject}@author.test>\r\n\r\nbody\r\n"
    ).encode()


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def key() -> Any:
    return generate("rsa")


@pytest.fixture
def config(tmp_path: Path, key: Any) -> Config:
    kp = tmp_path / "k.pem"
    kp.write_bytes(key.private_pem)
    return parse_config(
        {
            "storage": {"path": str(tmp_path / "s.sqlite3")},
            "lists": {LIST: {"owners": ["owner@example.org"], "name": "Developers"}},
            "lists_http": {"base_url": BASE},
            "arc": {"enabled": False},
            "dkim": {
                "sign": [{"domain": "lists.example.org", "selector": "s", "private_key": str(kp)}]
            },
        },
        tmp_path / "config.toml",
    )


@pytest.fixture
async def env(config: Config, queue_backend: QueueBackend) -> Any:
    """The service over SQLite and over PostgreSQL (``queue_backend``, parametrised);
    ``store`` is its ``ListsDb`` (the same calls on both)."""
    raw = await queue_backend.lists_store()
    resolver = StaticResolver({("_dmarc.author.test", "TXT"): ["v=DMARC1; p=reject"]})
    clock = Clock()
    svc = ListService(config, raw, resolver=resolver, clock=clock)
    yield svc, svc.store, queue_backend.spool_of(raw), clock
    await svc.wait_idle()


async def queued(spool: QueueSpool) -> list[tuple[str, list[str], bytes]]:
    out = []
    for m in await spool.list():
        loaded = await spool.load(m.id)
        assert loaded is not None
        out.append((m.mail_from, [r.address for r in m.recipients], loaded[1]))
    return out


async def add(store: ListsDb, *addrs: str) -> None:
    async def run(c: Tx) -> None:
        for a in addrs:
            await db.add_member(c, LIST, a, 1.0)

    await store.write(run)


def E(mail_from: str = "alice@author.test", rcpt: str = LIST) -> Envelope:
    return Envelope(mail_from, (rcpt,))


async def test_a_members_post_goes_once_to_each_member(env: Any) -> None:
    svc, store, spool, _ = env
    await add(store, "alice@author.test", "b@one.test", "c@two.test")
    await svc.receive(E(), LIST, post(), "Q1")
    await svc.wait_idle()
    got = await queued(spool)
    assert sorted(r[0] for _, r, _ in got) == ["alice@author.test", "b@one.test", "c@two.test"]
    tokens = {m.address: m.token for m in await store.read(lambda c: db.members(c, LIST))}
    for mail_from, (rcpt,), data in got:
        assert mail_from == f"dev-bounces+{tokens[rcpt]}@lists.example.org"
        msg = email.message_from_bytes(data)
        assert msg["From"] == '"Alice via Developers" <dev@lists.example.org>'  # p=reject
        assert f"/lists/unsubscribe/{tokens[rcpt]}>" in msg["List-Unsubscribe"]
    # a second fan-out of the same post (a crash before the last commit) adds nothing
    assert await svc.fan_out("Q1") == 0
    assert len(await queued(spool)) == 3
    arch = await store.read(lambda c: db.archived(c, LIST))
    assert len(arch) == 1 and b"List-Unsubscribe:" not in arch[0][2]


async def test_fan_out_resumes_after_a_partial_commit(env: Any) -> None:
    """The post and its recipients are stored before the 250; a fan-out that stopped
    after some batches completes the rest and no more."""
    svc, store, spool, _ = env
    many = [f"m{i:03d}@one.test" for i in range(120)]
    await add(store, "alice@author.test", *many)
    svc.start_fan_out = lambda post_id: None  # the "crash": no fan-out after the write
    await svc.receive(E(), LIST, post(), "Q2")
    assert await queued(spool) == []
    todo = await store.read(lambda c: db.fanout_todo(c, "Q2", 1000))
    assert len(todo) == 121
    # one batch done by hand, as a fan-out killed after its first commit would leave it
    from relay.lists import service as service_mod

    first = todo[:50]
    copies = svc.maker.batch(
        svc.lists[LIST], (await store.read(lambda c: db.post_data(c, "Q2")))[1], first
    )
    outs = [(a, service_mod.Outgoing("x@y", (a,), d)) for a, _, d in copies]
    await store.write(lambda c: svc._commit("Q2", outs, [a for a, _ in first], 0.0, c))
    del svc.start_fan_out  # restart: the real fan-out again
    assert await svc.resume() == 1
    await svc.wait_idle()
    rcpts = sorted(r[0] for _, r, _ in await queued(spool))
    assert rcpts == sorted(["alice@author.test", *many])


async def test_loop_and_null_sender(env: Any) -> None:
    svc, store, spool, _ = env
    await add(store, "alice@author.test")
    looped = post(extra="List-Id: Developers <dev.lists.example.org>\r\n")
    with pytest.raises(SmtpReplyError) as err:
        await svc.receive(E(), LIST, looped, "Q3")
    assert err.value.code == 554
    await svc.receive(E(""), LIST, post(), "Q4")  # a bounce: never to the list
    vacation = post(extra="Auto-Submitted: auto-replied\r\n")
    await svc.receive(E(), LIST, vacation, "Q4b")  # an auto-reply (RFC 3834): neither
    await svc.wait_idle()
    assert await queued(spool) == []


async def test_held_approved_rejected_expired(env: Any) -> None:
    svc, store, spool, clock = env
    await add(store, "b@one.test")
    await svc.receive(E("eve@else.test"), LIST, post("eve@else.test", "p1"), "Q5")
    held = await store.read(lambda c: db.held_posts(c, LIST))
    assert [h.author for h in held] == ["eve@else.test"]
    notices = await queued(spool)
    assert [r for _, r, _ in notices] == [["owner@example.org"]]  # owners told once
    assert held[0].id.encode() in notices[0][2]
    assert await svc.approve(LIST, held[0].id)
    await svc.wait_idle()
    got = [r for _, r, _ in await queued(spool)]
    assert ["b@one.test"] in got
    # rejected: the author is told
    await svc.receive(E("eve@else.test"), LIST, post("eve@else.test", "p2"), "Q6")
    h2 = (await store.read(lambda c: db.held_posts(c, LIST)))[0]
    assert await svc.reject(LIST, h2.id, "off topic")
    assert not await svc.reject(LIST, h2.id, "twice")
    last = [d for _, r, d in await queued(spool) if r == ["eve@else.test"]]
    assert len(last) == 1 and b"off topic" in last[0]
    # expired after 7 days: the author is told once, the post is gone
    await svc.receive(E("eve@else.test"), LIST, post("eve@else.test", "p3"), "Q7")
    clock.t += 7 * 86400 + 1
    await svc.sweep()
    assert await store.read(lambda c: db.held_posts(c, LIST)) == []
    told = [d for _, r, d in await queued(spool) if r == ["eve@else.test"]]
    assert len(told) == 2 and b"expired" in told[1]


async def test_subscribe_by_mail_reply_confirms(env: Any) -> None:
    svc, store, spool, clock = env
    sub = "dev-subscribe@lists.example.org"
    await svc.receive(E("new@three.test", sub), sub, post("new@three.test", "sub"), "Q8")
    await svc.receive(E("new@three.test", sub), sub, post("new@three.test", "sub"), "Q9")
    sent = await queued(spool)
    assert len(sent) == 1  # one confirmation per hour
    msg = email.message_from_bytes(sent[0][2])
    reply_to = msg["Reply-To"].strip("<>")
    assert reply_to.startswith("dev-confirm+")
    m = await store.read(lambda c: db.get_member(c, LIST, "new@three.test"))
    assert m is not None and m.state == "pending"
    await svc.receive(E("new@three.test", reply_to), reply_to, b"Subject: Re\r\n\r\nok\r\n", "QA")
    m = await store.read(lambda c: db.get_member(c, LIST, "new@three.test"))
    assert m is not None and m.state == "active"
    clock.t += 3601  # an hour later another request may be sent (none: a member now)
    await svc.receive(E("new@three.test", sub), sub, post("new@three.test", "sub"), "QB")
    assert len(await queued(spool)) == 1
    unsub = "dev-unsubscribe@lists.example.org"
    await svc.receive(E("new@three.test", unsub), unsub, b"Subject: x\r\n\r\n", "QC")
    assert await store.read(lambda c: db.get_member(c, LIST, "new@three.test")) is None


DSN = (
    b"From: MAILER-DAEMON@one.test\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
    b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; one.test\r\n\r\n"
    b"Final-Recipient: rfc822; b@one.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b--\r\n"
)


async def test_five_hard_bounces_disable_then_removed(env: Any) -> None:
    svc, store, spool, clock = env
    await add(store, "b@one.test")
    m = await store.read(lambda c: db.get_member(c, LIST, "b@one.test"))
    verp = f"dev-bounces+{m.token}@lists.example.org"
    for day in range(5):
        await svc.receive(E("", verp), verp, DSN, f"B{day}")
        await svc.receive(E("", verp), verp, DSN, f"B{day}x")  # same day: counted once
        m = await store.read(lambda c: db.get_member(c, LIST, "b@one.test"))
        assert m.score == day + 1.0
        assert m.state == ("disabled" if day == 4 else "active")
        clock.t += 86400
    probes = [r for _, r, _ in await queued(spool)]
    assert probes == [["b@one.test"]]  # one probe notice
    clock.t += 14 * 86400
    await svc.sweep()
    assert await store.read(lambda c: db.get_member(c, LIST, "b@one.test")) is None


async def test_arf_removes_and_a_stranger_is_dropped(env: Any) -> None:
    svc, store, spool, _ = env
    await add(store, "b@one.test")
    m = await store.read(lambda c: db.get_member(c, LIST, "b@one.test"))
    arf = (
        b"From: fbl@one.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; "
        b"report-type=feedback-report; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
        b"report\r\n--b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
        b"Version: 1\r\n\r\n--b--\r\n"
    )
    stranger = "dev-bounces+" + "0" * 32 + "@lists.example.org"
    with structlog.testing.capture_logs() as logs:
        await svc.receive(E("", stranger), stranger, arf, "S1")
    assert any(e["event"] == "list_bounce_unknown_token_dropped" for e in logs)
    assert await store.read(lambda c: db.get_member(c, LIST, "b@one.test")) is not None
    verp = f"dev-bounces+{m.token}@lists.example.org"
    await svc.receive(E("", verp), verp, arf, "S2")
    assert await store.read(lambda c: db.get_member(c, LIST, "b@one.test")) is None
    assert await queued(spool) == []  # a bounce never goes to the list


async def test_unsubscribe_by_mail_needs_an_authenticated_sender(env: Any) -> None:
    """A forged unsubscribe request (our verdict: nothing passed) is ignored; one whose
    SPF passed is honoured."""
    svc, store, _, _ = env
    await add(store, "b@one.test")
    unsub = "dev-unsubscribe@lists.example.org"
    me = svc.config.authserv_id
    forged = f"Authentication-Results: {me}; spf=fail smtp.mailfrom=b@one.test\r\n".encode()
    await svc.receive(E("b@one.test", unsub), unsub, forged + b"Subject: x\r\n\r\n", "U1")
    assert await store.read(lambda c: db.get_member(c, LIST, "b@one.test")) is not None
    real = f"Authentication-Results: {me}; spf=pass smtp.mailfrom=b@one.test\r\n".encode()
    await svc.receive(E("b@one.test", unsub), unsub, real + b"Subject: x\r\n\r\n", "U2")
    assert await store.read(lambda c: db.get_member(c, LIST, "b@one.test")) is None


async def test_the_verdicts_dmarc_policy_is_used_not_looked_up_again(env: Any) -> None:
    """Intake's DMARC check hands on (author domain, published policy): the list uses it
    (here p=none, while the resolver would say p=reject: the From stays the author's);
    for another domain than the author's it looks the policy up itself (munged)."""
    from relay.stages import Verdict

    svc, store, spool, _ = env
    await add(store, "alice@author.test", "b@one.test")
    known = Verdict("relay.test; dmarc=pass", author_policy=("author.test", "none"))
    await svc.receive(E(), LIST, post(subject="known"), "K1", known)
    other = Verdict("relay.test; dmarc=pass", author_policy=("elsewhere.test", "none"))
    await svc.receive(E(), LIST, post(subject="other"), "K2", other)
    await svc.wait_idle()
    froms = {
        email.message_from_bytes(d)["Subject"]: email.message_from_bytes(d)["From"]
        for _, _, d in await queued(spool)
    }
    assert froms == {
        "known": "Alice <alice@author.test>",
        "other": '"Alice via Developers" <dev@lists.example.org>',
    }


class Window:
    """The scheduler as the fan-out sees it (a unit-test stand-in): ``room`` places in
    the active window; a claimed message handed over gives its place back, as
    Scheduler.submit_new does."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.reserved = 0
        self.handed: list[tuple[str, tuple[str, ...], bool]] = []

    def reserve(self, share: float = 1.0) -> bool:
        assert share == 0.75  # the fan-out leaves a quarter of the window to new mail
        if self.reserved >= self.room:
            return False
        self.reserved += 1
        return True

    def release(self) -> None:
        self.reserved -= 1

    def submit_new(self, qid: str, msg: Any, created: float, claimed: bool) -> None:
        if claimed:
            self.release()
            self.room -= 1  # the copy now holds its place until delivered
        self.handed.append((qid, msg.recipients, claimed))


async def test_copies_are_handed_over_claimed_while_the_window_has_room(
    config: Config,
) -> None:
    """With the scheduler's window and the spool's lease, copies are written in flight
    under that lease and handed over claimed (no loader reads them back); once the window
    is full the rest are queued for the loader; every place reserved is given back."""
    from relay.queue.spool import Spool
    from relay.store import Store

    store = Store(config.storage.path).open()
    try:
        spool = Spool(store)
        window = Window(room=2)
        svc = ListService(
            config,
            store,
            resolver=StaticResolver({("_dmarc.author.test", "TXT"): ["v=DMARC1; p=none"]}),
            queue=window,
            lease=lambda: (spool.owner, 60.0),
        )
        members = sorted(["alice@author.test", *(f"m{i}@one.test" for i in range(4))])
        await add(svc.store, *members)
        await svc.receive(E(), LIST, post(), "Q9")
        await svc.wait_idle()
        assert sorted(r[0] for _, r, _ in window.handed) == members
        assert [c for _, _, c in window.handed].count(True) == 2
        assert window.reserved == 0
        by_qid = {m.id: m for m in await spool.list()}
        for qid, _, claimed in window.handed:
            (r,) = by_qid[qid].recipients
            assert by_qid[qid].message_id == "<plan@author.test>"  # read once, the post's
            if claimed:
                assert (r.state.value, r.lease_owner) == ("inflight", spool.owner)
            else:
                assert (r.state.value, r.lease_owner) == ("queued", "")
        # the loader sees only the copies queued unclaimed (a claimed one comes back by
        # the sweep of expired leases, should its owner die)
        loader = sorted(q for q, _, c in window.handed if not c)
        assert sorted(await spool.due(2e9, 10, set())) == loader
    finally:
        store.close()


async def test_pages_and_batches_in_flight_give_each_member_one_copy(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recipients read a page at a time and signed a batch per job with several jobs in
    flight (committed in whatever order they finish): each member gets one copy."""
    from relay.lists import service as service_mod

    monkeypatch.setattr(service_mod, "TODO_PAGE", 7)
    monkeypatch.setattr(service_mod, "BATCH", 3)
    svc, store, spool, _ = env
    many = ["alice@author.test", *(f"m{i:02d}@one.test" for i in range(40))]
    await add(store, *many)
    await svc.receive(E(), LIST, post(), "Q3")
    await svc.wait_idle()
    rcpts = sorted(r[0] for _, r, _ in await queued(spool))
    assert rcpts == sorted(many)
    assert await store.read(lambda c: db.unfinished_posts(c)) == []


async def test_a_fan_out_another_owner_leases_is_left_to_it_until_the_lease_expires(
    env: Any, config: Config
) -> None:
    """Two owners (two nodes, or two workers) on one store: the one that stored the post
    holds its fan-out lease; the other's resume leaves the post alone while that lease
    runs and takes it over (making every copy, once) when it has expired."""
    svc, store, spool, clock = env
    await add(store, "alice@author.test", "b@one.test", "c@two.test")
    svc.start_fan_out = lambda post_id: None  # stored, then the owner stalls
    await svc.receive(E(), LIST, post(), "Q9")
    shown = await store.read(lambda c: db.fanouts(c, LIST))  # `relay list show`'s
    assert shown == [db.Fanout("Q9", 3, svc.fanout_lease()[0], clock.t + 60)]
    other = ListService(config, svc.store, resolver=svc.resolver, clock=clock)
    assert await other.resume() == 0  # svc's lease runs
    assert await other.fan_out("Q9") == 0  # and a direct try is refused
    assert await queued(spool) == []
    clock.t += 61  # svc's 60 s lease expired without a renewal
    assert await other.resume() == 1
    await other.wait_idle()
    assert sorted(r[0] for _, r, _ in await queued(spool)) == [
        "alice@author.test",
        "b@one.test",
        "c@two.test",
    ]
    del svc.start_fan_out
    assert await svc.fan_out("Q9") == 0  # finished: nothing for the stalled owner
    assert await store.read(lambda c: db.fanouts(c, LIST)) == []


async def test_a_restart_frees_the_fan_outs_of_the_relay_before_it(tmp_path: Path) -> None:
    """On SQLite (one relay holds the file) the parent releases every fan-out lease at
    start (relay.workers.recover): a post whose fan-out the killed relay held is resumed
    at once, not a lease later."""
    from relay.store import Store

    store = Store(tmp_path / "s.sqlite3").open()
    try:
        db.open_tables(store)
        lists = lists_db(store)
        await lists.write(
            lambda c: db.store_post(
                c, "P1", LIST, b"x", ["b@one.test"], 1.0, ("", ""), ("dead:1:x", 2e9)
            )
        )
        assert await lists.read(lambda c: db.unfinished_posts(c, 1_800_000_000.0, "new")) == []
        assert db.release_fanouts(store) == 1
        assert await lists.read(lambda c: db.unfinished_posts(c, 1_800_000_000.0, "new")) == ["P1"]
    finally:
        store.close()


async def test_a_fan_out_taken_over_while_it_runs_stops_and_no_copy_is_doubled(
    env: Any, config: Config
) -> None:
    """The owner stalls past its lease while it makes its first batch and another owner
    takes the post over: the first owner commits what it made (each recipient claimed),
    starts no more batches, and the new owner makes the rest: every member once."""
    import asyncio

    svc, store, spool, clock = env
    many = [f"m{i:03d}@one.test" for i in range(400)]
    await add(store, "alice@author.test", *many)
    svc.start_fan_out = lambda post_id: None
    await svc.receive(E(), LIST, post(), "Q7")
    del svc.start_fan_out
    loop = asyncio.get_running_loop()
    orig, calls = svc.maker.batch, [0]

    def batch(*args: Any) -> Any:  # in the executor's thread
        calls[0] += 1
        if calls[0] == 1:
            clock.t += 61
            took = asyncio.run_coroutine_threadsafe(
                store.write(lambda c: db.take_fanout(c, "Q7", "other", clock.t, clock.t + 60)),
                loop,
            ).result(10)
            assert took
        return orig(*args)

    svc.maker.batch = batch  # type: ignore[method-assign]
    first = await svc.fan_out("Q7")
    assert 0 < first < 401 and calls[0] < 9  # stopped before the last batches
    other = ListService(config, store, resolver=svc.resolver, clock=clock,
                        lease=lambda: ("other", 60.0))  # fmt: skip
    rest = await other.fan_out("Q7")
    assert first + rest == 401
    rcpts = sorted(r[0] for _, r, _ in await queued(spool))
    assert rcpts == sorted(["alice@author.test", *many])


async def test_claimed_copies_hold_their_lease_from_the_write_not_from_before_a_wait(
    tmp_path: Path, config: Config
) -> None:
    """Copies handed to the scheduler in flight (claimed under the worker's lease): a
    batch whose write waited for a busy store writer still holds each copy's lease for
    the whole lease after the write, so another worker's sweeper cannot take a copy this
    one is about to deliver."""
    import asyncio
    import threading

    from relay.queue.spool import Spool
    from relay.store import Store

    class Window:
        def __init__(self) -> None:
            self.handed: list[str] = []

        def reserve(self, share: float = 1.0) -> bool:
            return True

        def release(self) -> None:
            pass

        def submit_new(self, qid: str, msg: Any, created: float, claimed: bool) -> None:
            self.handed.append(qid)

    raw = Store(tmp_path / "q.sqlite3").open()
    try:
        clock = Clock()
        spool = Spool(raw, clock, lease=10)
        window = Window()
        svc = ListService(config, raw, clock=clock, queue=window,
                          lease=lambda: (spool.owner, spool.lease))  # fmt: skip
        await add(svc.store, "alice@author.test", "b@one.test", "c@two.test")
        svc.start_fan_out = lambda post_id: None
        await svc.receive(E(), LIST, post(), "Q8")
        del svc.start_fan_out
        loop = asyncio.get_running_loop()
        orig, gate = svc.maker.batch, threading.Event()

        def batch(*args: Any) -> Any:  # the writer gets busy while the copies are made
            asyncio.run_coroutine_threadsafe(raw.write(lambda _c: gate.wait(5)), loop)

            def later() -> None:  # 30 s pass before the writer is free again
                clock.t += 30
                gate.set()

            threading.Timer(0.3, later).start()
            return orig(*args)

        svc.maker.batch = batch  # type: ignore[method-assign]
        assert await svc.fan_out("Q8") == 3
        written = clock.t
        assert len(window.handed) == 3
        other = Spool(raw, clock, lease=10)
        clock.t += 5
        assert await other.expire_leases() == 0
        for qid in window.handed:
            m = await spool.get(qid)
            assert m is not None
            assert [r.lease_expiry for r in m.recipients] == [written + 10]
    finally:
        raw.close()
