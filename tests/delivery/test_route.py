"""MX routing (RFC 5321 5.1, RFC 7505, RFC 8461 4.1): unit tests over StaticResolver and
end-to-end tests over the lab DNS server through the courier."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery.courier import Courier
from relay.delivery.route import is_ip_literal, mx_matches, resolve_route
from relay.dns import StaticResolver
from relay.model import DeliveryJob, RecipientState
from tests.delivery.mxlab import MxLab, Recorder


async def route(records: dict[tuple[str, str], object], domain: str = "d.test", **kw: object):
    kw.setdefault("port", 25)
    return await resolve_route(StaticResolver(records), domain, **kw)  # type: ignore[arg-type]


async def test_preference_order() -> None:
    r = await route(
        {
            ("d.test", "MX"): [(20, "b.d.test"), (10, "a.d.test"), (30, "c.d.test")],
            ("a.d.test", "A"): "192.0.2.1",
            ("b.d.test", "A"): "192.0.2.2",
            ("c.d.test", "AAAA"): "2001:db8::3",
        }
    )
    assert r.failure is None
    assert [(h.name, h.preference, h.addresses) for h in r.hosts] == [
        ("a.d.test", 10, ("192.0.2.1",)),
        ("b.d.test", 20, ("192.0.2.2",)),
        ("c.d.test", 30, ("2001:db8::3",)),
    ]


async def test_random_among_equal_preference() -> None:
    records = {
        ("d.test", "MX"): [(10, "a.d.test"), (10, "b.d.test"), (5, "first.d.test")],
        ("a.d.test", "A"): "192.0.2.1",
        ("b.d.test", "A"): "192.0.2.2",
        ("first.d.test", "A"): "192.0.2.5",
    }
    orders = set()
    for seed in range(30):
        r = await route(records, rng=random.Random(seed))
        names = tuple(h.name for h in r.hosts)
        assert names[0] == "first.d.test"
        orders.add(names[1:])
    assert orders == {("a.d.test", "b.d.test"), ("b.d.test", "a.d.test")}


async def test_implicit_mx_only_without_mx_records() -> None:
    r = await route({("d.test", "A"): "192.0.2.7", ("d.test", "AAAA"): "2001:db8::7"})
    assert r.failure is None
    (h,) = r.hosts
    assert h.implicit and h.name == "d.test" and h.addresses == ("192.0.2.7", "2001:db8::7")


async def test_no_implicit_mx_after_an_mx_error() -> None:
    r = await route({("d.test", "MX"): "SERVFAIL", ("d.test", "A"): "192.0.2.7"})
    assert r.failure is not None and not r.failure.permanent
    assert r.failure.code == 451 and r.failure.enhanced == "4.4.3"
    assert r.hosts == ()


async def test_null_mx_fails_at_once() -> None:
    r = await route({("d.test", "MX"): [(0, "")], ("d.test", "A"): "192.0.2.7"})
    assert r.failure is not None
    assert (r.failure.code, r.failure.enhanced) == (556, "5.1.10")


async def test_nxdomain_fails() -> None:
    r = await route({("d.test", "MX"): "NXDOMAIN"})
    assert r.failure is not None and r.failure.permanent and r.failure.enhanced == "5.1.2"


async def test_ip_literal_mx_refused() -> None:
    r = await route(
        {
            ("d.test", "MX"): [(10, "192.0.2.1"), (20, "mx.d.test")],
            ("mx.d.test", "A"): "192.0.2.9",
        }
    )
    assert [h.name for h in r.hosts] == ["mx.d.test"]
    assert any("IP literal" in s for s in r.skipped)
    r = await route({("d.test", "MX"): [(10, "192.0.2.1"), (20, "[2001:db8::1]")]})
    assert r.failure is not None and r.failure.permanent and "IP literal" in r.failure.text
    assert is_ip_literal("[IPv6:2001:db8::1]") and not is_ip_literal("mx1.d.test")


async def test_mx_resolving_to_our_own_listen_address_is_a_loop() -> None:
    records = {
        ("d.test", "MX"): [(10, "self.d.test"), (20, "backup.d.test")],
        ("self.d.test", "A"): "127.0.0.9",
        ("backup.d.test", "A"): "192.0.2.2",
    }
    r = await route(records, port=25, local_addresses=[("127.0.0.9", 25)])
    # the best MX is us: every MX not better than us would loop too (Postfix)
    assert r.failure is not None and (r.failure.code, r.failure.enhanced) == (554, "5.4.6")
    # a listen address on another port is not us (loopback allowed, as in the lab)
    r = await route(records, port=25, local_addresses=[("127.0.0.9", 2525)], allow_loopback=True)
    assert r.failure is None and len(r.hosts) == 2
    # we are a backup MX: the better one is kept
    records[("d.test", "MX")] = [(10, "backup.d.test"), (20, "self.d.test")]
    r = await route(records, port=25, local_addresses=[("127.0.0.9", 25)])
    assert [h.name for h in r.hosts] == ["backup.d.test"]
    # a wildcard listen address stands for every loopback address
    r = await route(records, port=25, local_addresses=[("0.0.0.0", 25)])
    assert [h.name for h in r.hosts] == ["backup.d.test"]


async def test_at_most_max_mx_hosts() -> None:
    records: dict[tuple[str, str], object] = {
        ("d.test", "MX"): [(i, f"mx{i}.d.test") for i in range(20)]
    }
    for i in range(20):
        records[(f"mx{i}.d.test", "A")] = f"192.0.2.{i + 1}"
    r = await route(records)
    assert [h.name for h in r.hosts] == [f"mx{i}.d.test" for i in range(5)]
    r = await route(records, max_mx=2)
    assert len(r.hosts) == 2


async def test_mx_without_addresses() -> None:
    r = await route({("d.test", "MX"): [(10, "gone.d.test")], ("gone.d.test", "A"): "NXDOMAIN"})
    assert r.failure is not None and r.failure.permanent and r.failure.enhanced == "5.4.4"
    r = await route({("d.test", "MX"): [(10, "slow.d.test")], ("slow.d.test", "A"): "SERVFAIL"})
    assert r.failure is not None and not r.failure.permanent and r.failure.enhanced == "4.4.3"


def test_mx_matches_rfc8461_section_4_1() -> None:
    assert mx_matches("mail.example.com", "MAIL.example.com.")
    assert mx_matches("*.example.com", "mx1.example.com")
    assert mx_matches("*.example.com.", "Mx1.Example.Com")
    assert not mx_matches("*.example.com", "example.com")
    assert not mx_matches("*.example.com", "a.b.example.com")
    assert not mx_matches("*.example.com", "mx1.example.net")
    assert not mx_matches("mail.example.com", "mx.mail.example.com")
    assert not mx_matches("", "example.com")


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)


@settings(max_examples=200)
@given(st.lists(_label, min_size=1, max_size=4), st.lists(_label, min_size=0, max_size=3))
def test_wildcard_matches_exactly_one_label(suffix: list[str], prefix: list[str]) -> None:
    pattern = "*." + ".".join(suffix)
    host = ".".join([*prefix, *suffix])
    assert mx_matches(pattern, host) == (len(prefix) == 1)
    assert mx_matches(host, host.upper() + ".")


# ---------------------------------------------------------------- end to end (lab DNS)


def job(domain: str, *rcpts: str) -> DeliveryJob:
    return DeliveryJob("Q1", domain, "a@sender.test", rcpts or (f"b@{domain}",), b"x\r\n")


async def test_e2e_dns_failures(lab: MxLab) -> None:
    lab.zone.add("fail.lab.test", "MX", (10, "mx.fail.lab.test"))
    lab.zone.fail("fail.lab.test", "SERVFAIL")
    lab.zone.add("null.lab.test", "MX", (0, "."))
    lab.zone.add("drop.lab.test", "MX", (10, "mx.drop.lab.test"))
    lab.zone.fail("drop.lab.test", "DROP")
    courier = Courier(lab.config(), lab.resolver(timeout=0.6, tries=1))
    try:
        servfail = await courier.deliver(job("fail.lab.test"))
        nx = await courier.deliver(job("nowhere.lab.test"))
        null = await courier.deliver(job("null.lab.test"))
        drop = await courier.deliver(job("drop.lab.test"))
    finally:
        await courier.close()
    r = servfail.recipients[0]
    assert r.state is RecipientState.DEFERRED and r.enhanced == "4.4.3"
    r = drop.recipients[0]
    assert r.state is RecipientState.DEFERRED and r.enhanced == "4.4.3"
    r = nx.recipients[0]
    assert r.state is RecipientState.FAILED and r.enhanced == "5.1.2"
    r = null.recipients[0]
    assert r.state is RecipientState.FAILED and r.reply.startswith("556 5.1.10")
    # DNS trouble is no dead destination
    assert not courier.is_dead("fail.lab.test")


async def test_e2e_failover_to_second_mx_and_implicit_mx(lab: MxLab) -> None:
    # mx1 has an address where nothing listens; mx2 works
    lab.zone.add("d.lab.test", "MX", (10, "mx1.d.lab.test"))
    lab.zone.set("mx1.d.lab.test", "A", [lab.next_ip()])
    second = await lab.add_mx("d.lab.test", "mx2.d.lab.test", "good", pref=20)
    implicit = await lab.add_server("i.lab.test", "good")
    lab.zone.set("i.lab.test", "A", [implicit.ip])
    courier = Courier(lab.config(), lab.resolver())
    try:
        res = await courier.deliver(job("d.lab.test"))
        res_i = await courier.deliver(job("i.lab.test"))
    finally:
        await courier.close()
    assert res.recipients[0].state is RecipientState.DELIVERED
    assert res.recipients[0].remote_host == "mx2.d.lab.test"
    assert len(second.recorder.messages) == 1
    assert res_i.recipients[0].state is RecipientState.DELIVERED
    assert len(implicit.recorder.messages) == 1


async def test_e2e_own_listen_address_and_ip_literal_refused(lab: MxLab) -> None:
    me = await lab.add_mx("loop.lab.test", "mx.loop.lab.test", "good")
    other = await lab.add_server("x", "good")
    lab.zone.add("lit.lab.test", "MX", (10, other.ip))
    courier = Courier(lab.config(), lab.resolver(), local_addresses=[(me.ip, lab.port)])
    try:
        loop = await courier.deliver(job("loop.lab.test"))
        lit = await courier.deliver(job("lit.lab.test"))
    finally:
        await courier.close()
    assert loop.recipients[0].state is RecipientState.FAILED
    assert loop.recipients[0].enhanced == "5.4.6"
    assert lit.recipients[0].state is RecipientState.FAILED
    assert me.connections == 0 and other.connections == 0


async def test_e2e_at_most_five_mx_hosts_tried(lab: MxLab) -> None:
    rec = Recorder(mail_reply="421 4.3.2 not now")
    servers = [
        await lab.add_mx("many.lab.test", f"mx{i}.many.lab.test", "none", pref=i, recorder=rec)
        for i in range(8)
    ]
    courier = Courier(lab.config(), lab.resolver())
    try:
        res = await courier.deliver(job("many.lab.test"))
    finally:
        await courier.close()
    assert res.recipients[0].state is RecipientState.DEFERRED
    assert [s.connections for s in servers] == [1, 1, 1, 1, 1, 0, 0, 0]
