"""Threats row 30: MX -> CNAME (followed for the addresses; the host keeps its MX name for
SNI, the certificate and MTA-STS), a CNAME loop (bounded, deferred 4.4.3 naming the
host), and an MX on a loopback address that is not ours (refused unless the lab allows
loopback delivery)."""

from __future__ import annotations

import pytest

from relay.delivery.courier import Courier
from relay.delivery.route import is_loopback, resolve_route
from relay.dns import StaticResolver
from relay.model import DeliveryJob, RecipientState, StsMode, TlsPolicy, TlsResultType
from tests.delivery.mxlab import MxLab


async def route(records: dict[tuple[str, str], object], **kw: object):
    kw.setdefault("port", 25)
    return await resolve_route(StaticResolver(records), "d.test", **kw)  # type: ignore[arg-type]


def job(domain: str, *rcpts: str) -> DeliveryJob:
    return DeliveryJob("Q1", domain, "a@sender.test", rcpts or (f"b@{domain}",), b"x\r\n")


def enforce(domain: str, *mx: str) -> TlsPolicy:
    lines = ("version: STSv1", "mode: enforce", *(f"mx: {m}" for m in mx), "max_age: 86400")
    return TlsPolicy(domain, StsMode.ENFORCE, mx, 86400, "id1", lines)


# ---------------------------------------------------------------- loopback, not ours


@pytest.mark.parametrize(
    ("ip", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("0.0.0.0", True),  # noqa: S104 - a connect to it reaches this host
        ("::", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.1", False),
        ("2001:db8::1", False),
        ("not-an-ip", False),
    ],
)
def test_is_loopback(ip: str, loopback: bool) -> None:
    assert is_loopback(ip) is loopback


async def test_loopback_mx_not_ours_is_refused_unless_allowed() -> None:
    records = {("d.test", "MX"): [(10, "mx.d.test")], ("mx.d.test", "A"): "127.0.0.1"}
    r = await route(records, local_addresses=[("192.0.2.25", 25)])
    assert r.failure is not None and (r.failure.code, r.failure.enhanced) == (550, "5.4.4")
    assert "loopback" in r.failure.text and r.failure.permanent
    assert r.skipped == ("mx.d.test: loopback address 127.0.0.1 refused",)
    r = await route(records, allow_loopback=True)
    assert r.failure is None and r.hosts[0].addresses == ("127.0.0.1",)


async def test_loopback_addresses_are_dropped_and_the_rest_kept() -> None:
    records = {
        ("d.test", "MX"): [(10, "mixed.d.test"), (20, "local.d.test"), (30, "ok.d.test")],
        ("mixed.d.test", "A"): ["127.0.0.1", "192.0.2.1"],
        ("mixed.d.test", "AAAA"): "::1",
        ("local.d.test", "A"): "0.0.0.0",  # noqa: S104
        ("ok.d.test", "A"): "192.0.2.3",
    }
    r = await route(records)
    assert r.failure is None
    assert [(h.name, h.addresses) for h in r.hosts] == [
        ("mixed.d.test", ("192.0.2.1",)),
        ("ok.d.test", ("192.0.2.3",)),
    ]
    assert any("local.d.test: loopback address 0.0.0.0" in s for s in r.skipped)


async def test_our_own_address_is_still_a_loop_not_a_loopback() -> None:
    records = {("d.test", "MX"): [(10, "mx.d.test")], ("mx.d.test", "A"): "127.0.0.1"}
    r = await route(records, local_addresses=[("127.0.0.1", 25)])
    assert r.failure is not None and r.failure.enhanced == "5.4.6"


async def test_temporary_failure_wins_over_loopback() -> None:
    records = {
        ("d.test", "MX"): [(10, "a.d.test"), (20, "b.d.test")],
        ("a.d.test", "A"): "SERVFAIL",
        ("b.d.test", "A"): "127.0.0.1",
    }
    r = await route(records)
    assert r.failure is not None and r.failure.enhanced == "4.4.3"


def test_courier_allows_loopback_only_for_the_lab(lab: MxLab) -> None:
    assert Courier(lab.config(), lab.resolver()).allow_loopback  # lab port, not 25
    assert not Courier(lab.config(port=25), lab.resolver()).allow_loopback
    assert not Courier(lab.config(), lab.resolver(), allow_loopback=False).allow_loopback


async def test_e2e_loopback_mx_refused_without_connecting(lab: MxLab) -> None:
    srv = await lab.add_mx("lo.lab.test", "mx.lo.lab.test", "good")
    courier = Courier(lab.config(), lab.resolver(), allow_loopback=False)
    try:
        res = await courier.deliver(job("lo.lab.test"))
    finally:
        await courier.close()
    (r,) = res.recipients
    assert r.state is RecipientState.FAILED and r.enhanced == "5.4.4", r
    assert "loopback addresses that are not ours" in r.reply
    assert srv.connections == 0


# ---------------------------------------------------------------- CNAME


async def test_mx_cname_followed_static() -> None:
    r = await route(
        {
            ("d.test", "MX"): [(10, "alias.d.test")],
            ("alias.d.test", "CNAME"): "real.d.test",
            ("real.d.test", "A"): "192.0.2.7",
        }
    )
    assert r.failure is None
    assert [(h.name, h.addresses) for h in r.hosts] == [("alias.d.test", ("192.0.2.7",))]


async def test_cname_loop_static_is_a_bounded_temporary_failure() -> None:
    r = await route(
        {
            ("d.test", "MX"): [(10, "a.d.test")],
            ("a.d.test", "CNAME"): "b.d.test",
            ("b.d.test", "CNAME"): "a.d.test",
        }
    )
    assert r.failure is not None and not r.failure.permanent
    assert r.failure.reply.startswith("451 4.4.3 address lookup of the MX hosts of d.test")
    assert "a.d.test: temporary failure" in r.failure.text
    assert "CNAME chain too long" in r.failure.text


async def test_e2e_mx_cname_keeps_the_mx_name_for_tls_and_mta_sts(lab: MxLab) -> None:
    """RFC 8461 4.1/4.2: the MX name (not the CNAME target) is matched against the policy
    and the certificate. mx.ok -> CNAME host.ok, certificate for mx.ok: delivered over
    verified TLS; mx.bad -> CNAME host.bad, certificate only for host.bad: refused."""
    ok = await lab.add_server("mx.ok.lab.test", "good")
    lab.zone.add("ok.lab.test", "MX", (10, "mx.ok.lab.test"))
    lab.zone.add("mx.ok.lab.test", "CNAME", "host.ok.lab.test")
    lab.zone.set("host.ok.lab.test", "A", [ok.ip])
    bad = await lab.add_server("host.bad.lab.test", "good")
    lab.zone.add("bad.lab.test", "MX", (10, "mx.bad.lab.test"))
    lab.zone.add("mx.bad.lab.test", "CNAME", "host.bad.lab.test")
    lab.zone.set("host.bad.lab.test", "A", [bad.ip])

    async def lookup(domain: str) -> TlsPolicy:
        return enforce(domain, f"mx.{domain}")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    try:
        good = await courier.deliver(job("ok.lab.test"))
        refused = await courier.deliver(job("bad.lab.test"))
    finally:
        await courier.close()
    (r,) = good.recipients
    assert r.state is RecipientState.DELIVERED and r.remote_host == "mx.ok.lab.test"
    assert ok.recorder.messages[0].tls_version is not None
    (r,) = refused.recipients
    assert r.state is RecipientState.DEFERRED and r.enhanced == "4.7.5", r
    assert bad.recorder.messages == []
    results = {(o.mx_host, o.result_type) for o in lab.outcomes}
    assert results == {
        ("mx.ok.lab.test", None),
        ("mx.bad.lab.test", TlsResultType.CERTIFICATE_HOST_MISMATCH),
    }


async def test_e2e_cname_loop_defers_naming_the_host(lab: MxLab) -> None:
    lab.zone.add("loop.lab.test", "MX", (10, "mx.loop.lab.test"))
    lab.zone.add("mx.loop.lab.test", "CNAME", "a.loop.lab.test")
    lab.zone.add("a.loop.lab.test", "CNAME", "mx.loop.lab.test")
    courier = Courier(lab.config(), lab.resolver(timeout=1.0, tries=1))
    try:
        res = await courier.deliver(job("loop.lab.test"))
    finally:
        await courier.close()
    (r,) = res.recipients
    assert r.state is RecipientState.DEFERRED and r.enhanced == "4.4.3", r
    assert "mx.loop.lab.test: temporary failure" in r.reply, r.reply
