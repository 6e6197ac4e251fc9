"""The queue's newer columns, over both stores (``queue_backend``: SQLite and PostgreSQL):
held messages, the stored envelope, the RFC 3461 DSN parameters per message and
recipient (and the "relayed" DSN they make owed), the message history and its pruning,
the operator's listing filters, flush per domain and deletes."""

from __future__ import annotations

import asyncio

from relay.model import RecipientState
from relay.queue.spool import ListFilter, NewMessage, RecipientUpdate
from tests.pg.backends import QueueBackend
from tests.queue.test_scheduler import MSG, Clock

DEFERRED, DELIVERED, FAILED = (
    RecipientState.DEFERRED,
    RecipientState.DELIVERED,
    RecipientState.FAILED,
)


def _dsn_msg() -> NewMessage:
    return NewMessage(
        "srs0=x@srs.test",
        ("b@dest.test", "B@dest.test", "c@other.test"),
        MSG,
        orig_recipients=("b@alias.test", "b2@alias.test", "c@other.test"),
        client_ip="192.0.2.9",
        helo="mail.x.test",
        env_from="A@x.test",
        notify=("SUCCESS,DELAY", "NEVER", ""),
        orcpts=("rfc822;b@alias.test", "rfc822;ignored@x", ""),
        ret="HDRS",
        envid="env-1",
    )


async def test_envelope_and_dsn_parameters_are_stored(queue_backend: QueueBackend) -> None:
    spool = await queue_backend.spool(Clock())
    qid = await spool.enqueue(_dsn_msg())
    for m in (await spool.get(qid), (await spool.list())[0]):
        assert m is not None
        assert (m.client_ip, m.helo, m.env_from) == ("192.0.2.9", "mail.x.test", "A@x.test")
        assert (m.ret, m.envid, m.held, m.mail_from) == ("HDRS", "env-1", False, "srs0=x@srs.test")
        # the duplicate address (any case) is dropped with its parameters: the first wins
        assert [(r.address, r.orig, r.notify, r.orcpt) for r in m.recipients] == [
            ("b@dest.test", "b@alias.test", ("SUCCESS", "DELAY"), "rfc822;b@alias.test"),
            ("c@other.test", "c@other.test", (), ""),
        ]
    plain = await spool.enqueue(NewMessage("a@x.test", ("d@dest.test",), MSG))
    got = await spool.get(plain)
    assert got is not None and got.env_from is None and got.recipients[0].notify == ()


async def test_a_relayed_success_owes_a_dsn_until_it_is_queued(queue_backend: QueueBackend) -> None:
    """RFC 3461 6.2.1: delivered to a next hop without DSN, SUCCESS asked: a "relayed"
    DSN is owed; the row keeps its lease and the message stays until the DSN is queued."""
    clock = Clock()
    spool = await queue_backend.spool(clock)
    qid = await spool.enqueue(_dsn_msg())
    await spool.claim(qid, ["b@dest.test", "c@other.test"])
    ok = RecipientUpdate("b@dest.test", DELIVERED, "250 ok", relayed=True)
    plain = RecipientUpdate("c@other.test", DELIVERED, "250 ok")
    removed, mine = await spool.record(qid, [ok, plain])
    assert not removed and [r.address for r in mine] == ["b@dest.test"]
    [r] = [r for r in mine]
    assert r.relayed_owed and r.dsn_owed and r.lease_owner == spool.owner
    assert await spool.unreported(10, set()) == []  # our lease holds it
    clock.t += spool.lease + 1
    assert await spool.unreported(10, set()) == [qid]  # a crash here: another owner's
    other = await queue_backend.spool(clock)
    removed, mine = await other.settle(qid)
    assert [x.address for x in mine] == ["b@dest.test"]
    report = NewMessage("", ("a@x.test",), b"Subject: relayed\r\n\r\nx\r\n")
    assert await spool.enqueue_report(report, "DSN1", about=qid, failed=["b@dest.test"]) is None
    assert await other.enqueue_report(report, "DSN1", about=qid, failed=["b@dest.test"]) is True
    assert await spool.get(qid) is None and await spool.get("DSN1") is not None


async def test_notify_without_failure_settles_a_failure_quietly(
    queue_backend: QueueBackend,
) -> None:
    spool = await queue_backend.spool(Clock())
    qid = await spool.enqueue(
        NewMessage("a@x.test", ("b@dest.test",), MSG, notify=("SUCCESS",), ret="FULL")
    )
    await spool.claim(qid, ["b@dest.test"])
    removed, mine = await spool.record(qid, [RecipientUpdate("b@dest.test", FAILED, "550 no")])
    assert removed and mine == ()  # RFC 3461 4.1: no failure DSN asked, none owed
    assert await queue_backend.owed() == 0


async def test_a_held_message_is_left_alone_by_every_owner(queue_backend: QueueBackend) -> None:
    clock = Clock()
    a = await queue_backend.spool(clock)
    b = await queue_backend.spool(clock)
    qid = await a.enqueue(NewMessage("a@x.test", ("b@dest.test",), MSG))
    other = await a.enqueue(NewMessage("a@x.test", ("c@dest.test",), MSG))
    assert await b.hold([qid, "NOSUCHID"]) == [qid]
    assert [m.id for m in await a.list(ListFilter(state="held"))] == [qid]
    assert await a.due(clock.t + 1, 10, set()) == [other]
    assert await a.claim(qid, ["b@dest.test"]) == ()
    assert await b.claim(qid, ["b@dest.test"]) == ()
    assert await a.unhold([qid]) == [qid]
    assert await b.claim(qid, ["b@dest.test"]) == ("b@dest.test",)
    await b.record(qid, [RecipientUpdate("b@dest.test", DEFERRED, "451 later", 1e12)])
    await a.hold([qid])
    assert await a.requeue([qid]) == [qid]  # released and due now
    m = await a.get(qid)
    assert m is not None and not m.held and m.recipients[0].next_attempt == 0.0
    assert await b.claim(qid, ["b@dest.test"]) == ("b@dest.test",)


async def test_the_history_outlives_the_message_until_pruned(queue_backend: QueueBackend) -> None:
    clock = Clock()
    spool = await queue_backend.spool(clock)
    qid = await spool.enqueue(_dsn_msg())
    keep = await spool.enqueue(NewMessage("a@x.test", ("k@dest.test",), MSG))
    await spool.hold([qid])
    await spool.unhold([qid])
    clock.t += 1
    await spool.claim(qid, ["b@dest.test", "c@other.test"])
    deferred = RecipientUpdate("b@dest.test", DEFERRED, "451 4.7.1 later", 0.0, "mx.dest.test")
    failed = RecipientUpdate(
        "c@other.test", FAILED, "550 5.1.1 no", 0.0, "mx.other.test", "TLSv1.3"
    )
    await spool.record(qid, [deferred, failed])
    report = NewMessage("", ("A@x.test",), b"Subject: failed\r\n\r\nx\r\n")
    assert await spool.enqueue_report(report, "DSN2", about=qid, failed=["c@other.test"]) is False
    clock.t += 1
    await spool.claim(qid, ["b@dest.test"])
    await spool.record(qid, [RecipientUpdate("b@dest.test", DELIVERED, "250 2.0.0 ok")])
    assert await spool.get(qid) is None
    lines = await spool.history(qid)
    assert [(e.event, e.address) for e in lines] == [
        ("received", ""),
        ("held", ""),
        ("released", ""),
        ("deferred", "b@dest.test"),
        ("failed", "c@other.test"),
        ("dsn_queued", "c@other.test"),
        ("delivered", "b@dest.test"),
        ("removed", ""),
    ]
    assert "client=[192.0.2.9] helo=mail.x.test" in lines[0].reply
    assert "from=<A@x.test>" in lines[0].reply
    assert (lines[4].mx_host, lines[4].tls, lines[4].reply) == (
        "mx.other.test",
        "TLSv1.3",
        "550 5.1.1 no",
    )
    assert lines[5].reply == "DSN2"
    assert await spool.prune_log(clock.t - 10) == 0  # not old enough yet
    assert await spool.prune_log(clock.t + 10) == len(lines)  # only the removed one's
    assert await spool.history(qid) == []
    assert [e.event for e in await spool.history(keep)] == ["received"]


async def test_listing_filters_flush_per_domain_and_deletes(queue_backend: QueueBackend) -> None:
    clock = Clock()
    spool = await queue_backend.spool(clock)
    ids = []
    for rcpts in (("b@dest.test",), ("c@DEST.test.", "d@other.test"), ("e@other.test",)):
        ids.append(await spool.enqueue(NewMessage("a@x.test", rcpts, MSG)))
        clock.t += 1
    assert [m.id for m in await spool.list()] == ids
    assert [m.id for m in await spool.list(ListFilter(limit=2))] == ids[:2]
    assert [m.id for m in await spool.list(ListFilter(limit=2, offset=2))] == ids[2:]
    assert [m.id for m in await spool.list(ListFilter(offset=1))] == ids[1:]
    by_domain = await spool.list(ListFilter(domain="OTHER.test"))
    assert [m.id for m in by_domain] == ids[1:]
    assert [r.address for r in by_domain[0].recipients] == ["d@other.test"]
    await spool.claim(ids[0], ["b@dest.test"])
    await spool.record(ids[0], [RecipientUpdate("b@dest.test", DEFERRED, "451", 1e12)])
    await spool.claim(ids[1], ["c@DEST.test.", "d@other.test"])
    await spool.record(
        ids[1],
        [
            RecipientUpdate("c@DEST.test.", DEFERRED, "451", 1e12),
            RecipientUpdate("d@other.test", DEFERRED, "451", 1e12),
        ],
    )
    assert [m.id for m in await spool.list(ListFilter(state="deferred"))] == ids[:2]
    assert await spool.flush_domain("dest.test") == 2  # b@ and c@DEST.test.
    assert sorted(await spool.due(clock.t, 10, set())) == sorted(ids)
    assert await spool.delete_many([ids[0], "NOSUCHID", ids[0]]) == [ids[0]]
    assert await spool.delete_all() == 2 and await spool.list() == []
    assert [e.event for e in await spool.history(ids[1])][-1] == "removed"


async def test_claims_from_another_owner_after_a_hold_skip_only_the_held(
    queue_backend: QueueBackend,
) -> None:
    clock = Clock()
    a = await queue_backend.spool(clock)
    b = await queue_backend.spool(clock)
    ids = [await a.enqueue(NewMessage("a@x.test", (f"r{i}@dest.test",), MSG)) for i in range(20)]
    held = await b.hold(ids[::2])
    claimed = await asyncio.gather(*(a.claim(q, [f"r{i}@dest.test"]) for i, q in enumerate(ids)))
    for i, got in enumerate(claimed):
        assert bool(got) == (ids[i] not in held)
