"""Courier.deliver_many over loopback: one domain's jobs of several messages sent one
after another on one connection, each with its own outcome; a job that cannot share the
connection (other TLS inputs, an address the guard refuses, the session gone) takes the
whole way, and nothing goes out under a weaker TLS decision than deliver() would make."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from relay.delivery.courier import Courier
from relay.model import AttemptResult, DeliveryJob, RecipientState, StsMode, TlsPolicy
from tests.delivery.mxlab import MxLab
from tests.delivery.rawmx import RawMx
from tests.delivery.test_client_pipelining import DATA, STUFFED, commands
from tests.delivery.test_courier_tls import job, sts

D = "d.lab.test"


async def send_all(
    courier: Courier,
    jobs: Sequence[DeliveryJob],
    between: Callable[[int], None] | None = None,
) -> list[tuple[str, AttemptResult]]:
    """``courier.deliver_many`` over ``jobs`` (the courier closed after); the results in
    order. ``between(n)``: called when the n-th result is in, before the next transaction
    (the test's move on the server)."""
    todo = list(jobs)
    results: list[tuple[str, AttemptResult]] = []

    def done(j: DeliveryJob, res: AttemptResult) -> None:
        results.append((j.qid, res))
        if between is not None:
            between(len(results))

    try:
        await courier.deliver_many(lambda: todo.pop(0) if todo else None, done)
    finally:
        await courier.close()
    return results


async def raw_mx(lab: MxLab, raw_factory: Any, **kw: Any) -> RawMx:
    """A RawMx (PIPELINING) as the one MX of D."""
    mx: RawMx = await raw_factory(port=lab.port, **kw)
    lab.zone.add(D, "MX", (10, f"mx.{D}"))
    lab.zone.set(f"mx.{D}", "A", [mx.ip])
    return mx


async def test_one_domains_jobs_share_one_connection_and_one_policy_lookup(lab: MxLab) -> None:
    srv = await lab.add_mx(D, f"mx.{D}", "good")
    lookups: list[str] = []

    async def lookup(domain: str) -> TlsPolicy:
        lookups.append(domain)
        return sts(domain, StsMode.ENFORCE, f"mx.{D}")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    jobs = [job(D, f"m{i}@{D}", qid=f"Q{i}") for i in range(5)]
    results = await send_all(courier, jobs)
    assert [q for q, _ in results] == [f"Q{i}" for i in range(5)]
    for _, res in results:
        assert [r.state for r in res.recipients] == [RecipientState.DELIVERED]
        assert res.mx_host == f"mx.{D}" and res.tls_policy == "sts"
    msgs = srv.recorder.messages
    assert [m.rcpt_tos for m in msgs] == [[f"m{i}@{D}"] for i in range(5)]
    assert srv.connections == 1 and len({m.conn for m in msgs}) == 1
    assert all(m.tls_version for m in msgs)  # enforce: every one over verified TLS
    assert len(lab.outcomes) == 1  # one TLS session, one outcome (RFC 8460)
    assert lookups == [D]


async def test_other_tls_inputs_and_refused_addresses_take_the_whole_way(lab: MxLab) -> None:
    """Under enforce, a "TLS-Required: No" job (testing, RFC 8689 section 5) is decided
    anew; an address the guard refuses fails alone (553 5.1.3, nothing of it written);
    the jobs after them still arrive, each once, over TLS."""
    srv = await lab.add_mx(D, f"mx.{D}", "good")

    async def lookup(domain: str) -> TlsPolicy:
        return sts(domain, StsMode.ENFORCE, f"mx.{D}")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    jobs = [
        job(D, f"a@{D}", qid="Q1"),
        job(D, f"b@{D}", qid="Q2", tls_required=False, record_tls=False),
        job(D, "bad\r\nRCPT TO:<x@evil.test>@" + D, qid="Q3"),
        job(D, f"c@{D}", qid="Q4"),
    ]
    results = await send_all(courier, jobs)
    states = {q: [r.state for r in res.recipients] for q, res in results}
    assert states == {
        "Q1": [RecipientState.DELIVERED],
        "Q2": [RecipientState.DELIVERED],
        "Q3": [RecipientState.FAILED],
        "Q4": [RecipientState.DELIVERED],
    }
    refused = dict(results)["Q3"].recipients[0]
    assert refused.reply.startswith("553 5.1.3") and refused.enhanced == "5.1.3"
    assert [m.rcpt_tos for m in srv.recorder.messages] == [[f"a@{D}"], [f"b@{D}"], [f"c@{D}"]]
    assert all(m.tls_version for m in srv.recorder.messages)
    assert not any(b"evil" in m.data for m in srv.recorder.messages)


async def test_a_session_lost_between_two_jobs_sends_the_next_on_a_new_connection(
    lab: MxLab,
) -> None:
    """The server closes with 421 at every second MAIL on a connection: each job after
    the first finds the shared session gone before MAIL was accepted, and goes the whole
    way on a new connection; every message arrives once."""
    srv = await lab.add_mx(D, f"mx.{D}", "good")
    srv.recorder.fail_mail_on_reuse = True
    courier = Courier(lab.config(), lab.resolver())
    jobs = [job(D, f"m{i}@{D}", qid=f"Q{i}") for i in range(3)]
    results = await send_all(courier, jobs)
    assert [[r.state for r in res.recipients] for _, res in results] == [
        [RecipientState.DELIVERED]
    ] * 3
    assert [m.rcpt_tos for m in srv.recorder.messages] == [[f"m{i}@{D}"] for i in range(3)]
    assert srv.connections == 3


async def test_a_refused_transaction_does_not_stop_the_next(lab: MxLab) -> None:
    """A 550 to one job's recipient is that job's outcome; the connection carries on."""
    srv = await lab.add_mx(D, f"mx.{D}", "good")
    srv.recorder.rcpt_replies[f"gone@{D}"] = "550 5.1.1 no such user"
    courier = Courier(lab.config(), lab.resolver())
    jobs = [job(D, f"a@{D}", qid="Q1"), job(D, f"gone@{D}", qid="Q2"), job(D, f"c@{D}", qid="Q3")]
    results = await send_all(courier, jobs)
    replies = {q: res.recipients[0] for q, res in results}
    assert replies["Q2"].state is RecipientState.FAILED and replies["Q2"].reply.startswith("550")
    assert replies["Q1"].state is replies["Q3"].state is RecipientState.DELIVERED
    assert srv.connections == 1 and len(srv.recorder.messages) == 2


def raw_jobs(*names: str) -> list[DeliveryJob]:
    return [
        DeliveryJob(f"Q{n}", D, "alice@sender.test", (f"{n}@{D}",), DATA, message_id=f"<{n}@x>")
        for n in names
    ]


@pytest.mark.parametrize("trickle", ["", "turn", "ms"])
async def test_the_next_transactions_commands_go_out_with_the_content(
    lab: MxLab, raw_factory: Any, trickle: str
) -> None:
    """RFC 2920 section 3.1: the content may be followed by more commands in one group.
    Four messages on one connection to a server that pipelines: from the third on, each
    one's MAIL, RCPT and DATA went out in the segment of the content before it; every
    reply is read in order whether they come together, one per loop turn or 2 ms apart."""
    mx = await raw_mx(lab, raw_factory, trickle=trickle)
    courier = Courier(lab.config(), lab.resolver())
    results = await send_all(courier, raw_jobs("a", "b", "c", "d"))
    assert [[r.state for r in res.recipients] for _, res in results] == [
        [RecipientState.DELIVERED]
    ] * 4
    assert [m.rcpts for m in mx.stored] == [[f"{n}@{D}"] for n in "abcd"]
    assert all(m.data == DATA for m in mx.stored)
    (conn,) = mx.chunks
    # EHLO; a: commands, content; b: commands, content + c's commands; c: content + d's
    # commands; d: content; QUIT
    assert conn[1] == commands(f"a@{D}") and conn[3] == commands(f"b@{D}")
    assert conn[4] == STUFFED + commands(f"c@{D}")
    assert conn[5] == STUFFED + commands(f"d@{D}")
    assert conn[6] == STUFFED and conn[7:] == [b"QUIT\r\n"]


async def test_a_refused_recipient_does_not_disturb_the_transactions_pipelined_around_it(
    lab: MxLab, raw_factory: Any
) -> None:
    """b's RCPT is refused (its DATA gets 554: no content, so nothing is pipelined after
    it): c, d and e after it are still delivered on the same connection."""
    mx = await raw_mx(lab, raw_factory)
    mx.rcpt_replies[f"b@{D}"] = "550 5.1.1 no such user"
    courier = Courier(lab.config(), lab.resolver())
    results = await send_all(courier, raw_jobs("a", "b", "c", "d", "e"))
    got = {q: res.recipients[0] for q, res in results}
    assert got["Qb"].state is RecipientState.FAILED and got["Qb"].reply.startswith("550")
    for n in "acde":
        assert got[f"Q{n}"].state is RecipientState.DELIVERED, got[f"Q{n}"]
    assert [m.rcpts for m in mx.stored] == [[f"{n}@{D}"] for n in "acde"]
    assert mx.connections == 1


async def test_a_connection_closed_after_the_content_sends_the_pipelined_one_anew(
    lab: MxLab, raw_factory: Any
) -> None:
    """The server answers c's content and closes (its idle limit, say) although d's
    commands followed it: d goes the whole way on a new connection, once."""
    mx = await raw_mx(lab, raw_factory)
    courier = Courier(lab.config(), lab.resolver())

    def close_at_c(n: int) -> None:
        if n == 2:  # b done: c's commands are out, c's content is next
            mx.on_command["MAIL FROM:<alice@sender.test>"] = "close"

    results = await send_all(courier, raw_jobs("a", "b", "c", "d"), close_at_c)
    assert [[r.state for r in res.recipients] for _, res in results] == [
        [RecipientState.DELIVERED]
    ] * 4
    assert sorted(m.rcpts[0] for m in mx.stored) == [f"{n}@{D}" for n in "abcd"]
    assert mx.connections == 2


async def test_a_server_silent_in_the_middle_of_a_lane_meets_the_attempt_deadline(
    lab: MxLab, raw_factory: Any
) -> None:
    """The replies on a shared session are awaited under the courier's attempt deadline
    alone: a server that stops answering after the first message defers the second with
    4.4.2 once the deadline passes, and the session is not used again."""
    mx = await raw_mx(lab, raw_factory)
    courier = Courier(lab.config(attempt_timeout=0.5), lab.resolver())

    def mute_after_first(n: int) -> None:
        mx.mute = True

    started = asyncio.get_running_loop().time()
    results = await send_all(courier, raw_jobs("a", "b"), mute_after_first)
    took = asyncio.get_running_loop().time() - started
    (qa, ra), (qb, rb) = results
    assert ra.recipients[0].state is RecipientState.DELIVERED
    b = rb.recipients[0]
    assert b.state is RecipientState.DEFERRED and b.enhanced == "4.4.2", b
    assert "deadline" in b.reply and took < 3.0
    assert [m.rcpts for m in mx.stored] == [[f"a@{D}"]] and len(courier.pool) == 0
