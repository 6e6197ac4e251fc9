"""The outbound command guard (threats row 3): an address with a control character, or
one that quoting would change, never reaches the wire; it fails permanently (553) and
the other recipients of the job are delivered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiosmtplib.email import quote_address
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.courier import Courier
from relay.delivery.guard import address_problem
from relay.model import DeliveryJob, RecipientState
from tests.delivery.mxlab import MxLab
from tests.delivery.rawmx import RawMx
from tests.delivery.test_client_pipelining import open_session

D = "d.lab.test"
DATA = b"Subject: t\r\n\r\nhello\r\n"
EVIL_RCPTS = (
    f"evil@{D}>\r\nRSET",
    f"x@{D}\r\nDATA",
    f"y@{D}\nRCPT TO:<victim@{D}>",
    f"z@{D}\rQUIT",
    f"nul@{D}\x00",
    f"a,victim@{D}",  # aiosmtplib would send <a>
    f"w@{D}> NOTIFY=NEVER",  # ... and this as <w@d.lab.test>
)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("", None),
        (f"a@{D}", None),
        (f'"a b"@{D}', None),
        ("ü@例え.jp", None),
        (f"a@{D}\r\nRSET", "contains control characters"),
        (f"a@{D}\x7f", "contains control characters"),
        (f"a@{D}\x85", "contains control characters"),
        (f"a,b@{D}", "would not go on the wire as written"),
        (f"Bob <b@{D}>", "would not go on the wire as written"),
        (f"<a@{D}>", "would not go on the wire as written"),
    ],
)
def test_address_problem(address: str, problem: str | None) -> None:
    assert address_problem(address) == problem


@given(st.text(max_size=40))
def test_whatever_passes_goes_out_exactly_and_on_one_line(address: str) -> None:
    if address_problem(address) is None:
        wire = quote_address(address)
        assert wire == f"<{address}>"
        assert not any(c in wire for c in "\r\n\x00")


@given(st.text(max_size=20), st.sampled_from("\r\n\x00\x1b\x7f"), st.text(max_size=20))
def test_any_control_character_is_refused(head: str, ctl: str, tail: str) -> None:
    assert address_problem(head + ctl + tail) is not None


@pytest.fixture
async def raw_factory() -> AsyncIterator[Callable[..., Any]]:
    """RawMx servers (they record every byte they read) on 127.0.0.170, .171, ..."""
    started: list[RawMx] = []

    async def make(**kw: Any) -> RawMx:
        mx = await RawMx(f"127.0.0.{170 + len(started)}", 0, **kw).start()
        started.append(mx)
        return mx

    yield make
    for mx in started:
        await mx.stop()


async def _courier_to(lab: MxLab, mx: RawMx) -> Courier:
    lab.zone.add(D, "MX", (10, f"mx.{D}"))
    lab.zone.set(f"mx.{D}", "A", [mx.ip])
    return Courier(lab.config(port=mx.port), lab.resolver())


@pytest.mark.parametrize("pipelining", [True, False])
async def test_injected_recipients_never_reach_the_wire(
    lab: MxLab, raw_factory: Any, pipelining: bool
) -> None:
    mx = await raw_factory(pipelining=pipelining)
    courier = await _courier_to(lab, mx)
    job = DeliveryJob("Q1", D, "alice@sender.test", (f"ok@{D}", *EVIL_RCPTS), DATA, "<m@x>")
    try:
        res = await courier.deliver(job)
    finally:
        await courier.close()
    by = {r.address: r for r in res.recipients}
    assert [r.address for r in res.recipients] == list(job.recipients)
    assert by[f"ok@{D}"].state is RecipientState.DELIVERED
    for evil in EVIL_RCPTS:
        r = by[evil]
        assert r.state is RecipientState.FAILED and r.enhanced == "5.1.3", r
        assert r.reply.startswith("553 5.1.3 recipient address"), r.reply
    wire = b"".join(b"".join(c) for c in mx.chunks)
    assert b"RCPT TO:<ok@d.lab.test>" in wire
    for marker in (b"evil", b"victim", b"RSET", b"z@", b"nul@", b"NOTIFY"):
        assert marker not in wire, (marker, wire)
    assert wire.count(b"DATA\r\n") == 1
    assert [s.rcpts for s in mx.stored] == [[f"ok@{D}"]]


async def test_injected_sender_fails_every_recipient_without_connecting(
    lab: MxLab, raw_factory: Any
) -> None:
    mx = await raw_factory()
    courier = await _courier_to(lab, mx)
    job = DeliveryJob(
        "Q1", D, f"a@{D}>\r\nRCPT TO:<victim@{D}>", (f"b@{D}", f"c@{D}"), DATA, "<m@x>"
    )
    try:
        res = await courier.deliver(job)
    finally:
        await courier.close()
    assert {(r.state, r.enhanced) for r in res.recipients} == {(RecipientState.FAILED, "5.1.7")}
    assert all(r.reply.startswith("553 5.1.7 sender address") for r in res.recipients)
    assert mx.connections == 0


@pytest.mark.parametrize("pipelining", [True, False])
async def test_the_session_guards_too(raw_factory: Any, pipelining: bool) -> None:
    """SmtpSession.send, the last step before the wire, refuses on its own."""
    mx = await raw_factory(pipelining=pipelining)
    s = await open_session(mx.ip, mx.port)
    try:
        tx = await s.send(f"a@{D}\r\nRSET", [f"b@{D}"], DATA)
        assert [str(r).split(" ", 2)[:2] for _, r in tx.replies] == [["553", "5.1.7"]]
        tx = await s.send("alice@sender.test", [f"b@{D}", f"c@{D}\r\nDATA"], DATA)
        assert tx.data_sent
        assert [r.code for _, r in tx.replies] == [250, 553]
    finally:
        await s.quit()
    wire = b"".join(mx.chunks[0])
    assert b"RSET" not in wire and b"c@" not in wire
    assert wire.count(b"MAIL FROM") == 1
