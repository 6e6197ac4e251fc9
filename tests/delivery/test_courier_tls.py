"""MTA-STS enforcement on delivery, end to end over loopback (RFC 8461 section 5,
RFC 8460 result types): for each policy mode x each next hop, what was delivered,
over what, and which TLS outcome was recorded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from relay.delivery.courier import Courier
from relay.delivery.tls import MX_NOT_IN_POLICY
from relay.lab.strip import StripProxy
from relay.model import (
    DeliveryJob,
    PolicyType,
    RecipientState,
    StsMode,
    TlsPolicy,
    TlsResultType,
)
from relay.mtasts.cache import CacheUnavailable
from tests.delivery.mxlab import MxLab, MxServer

R = TlsResultType
MSG = b"From: a@sender.test\r\nTo: b@x\r\nSubject: t\r\n\r\nhello\r\n"


def job(
    domain: str, *rcpts: str, qid: str = "Q1", record_tls: bool = True, **kw: object
) -> DeliveryJob:
    return DeliveryJob(
        qid=qid,
        domain=domain,
        mail_from="alice@sender.test",
        recipients=rcpts or (f"bob@{domain}",),
        data=MSG,
        message_id="<m1@sender.test>",
        record_tls=record_tls,
        **kw,  # type: ignore[arg-type]
    )


HOPS = [
    "good",
    "no-starttls",
    "stripped",
    "expired",
    "wrong-name",
    "unknown-ca",
    "not-in-policy",
    "tls11",
]


async def build_hops(lab: MxLab) -> dict[str, MxServer]:
    """One domain per next hop, ``<hop>.lab.test`` with MX ``mx.<hop>.lab.test``."""
    servers: dict[str, MxServer] = {}
    for hop in HOPS:
        domain = f"{hop}.lab.test"
        name = f"mx.{domain}"
        if hop == "stripped":
            good = await lab.add_server(name, "good")
            proxy = await StripProxy((good.ip, lab.port), (lab.next_ip(), lab.port)).start()
            lab.closers.append(proxy.stop)
            lab.zone.add(domain, "MX", (10, name))
            lab.zone.set(name, "A", [proxy.host])
            servers[hop] = good
            continue
        cert = {"no-starttls": "none", "not-in-policy": "good"}.get(hop, hop)
        servers[hop] = await lab.add_mx(domain, name, cert)
    return servers


def policy_for(mode: str, domain: str) -> TlsPolicy | None:
    if mode == "no-policy":
        return None
    patterns = (
        ("mx.elsewhere.lab.test",) if domain.startswith("not-in-policy") else (f"*.{domain}",)
    )
    return TlsPolicy(
        domain=domain,
        mode=StsMode(mode),
        mx_patterns=patterns,
        max_age=86400,
        policy_id="20260101",
        policy_strings=(
            "version: STSv1",
            f"mode: {mode}",
            *(f"mx: {p}" for p in patterns),
            "max_age: 86400",
        ),
    )


@dataclass(frozen=True)
class Expect:
    delivered: bool
    tls: str | None  # TLS version prefix the server saw, or None for clear text
    result: TlsResultType | None  # the recorded outcome (None: success)
    enforced: bool = False
    connections: int = 1


OK_TLS = Expect(True, "TLSv1.", None)
# RFC 8461 section 5: enforce refuses; testing delivers but reports; none/no policy: opportunistic
MATRIX: dict[str, dict[str, Expect]] = {
    "enforce": {
        "good": Expect(True, "TLSv1.", None),
        "no-starttls": Expect(False, None, R.STARTTLS_NOT_SUPPORTED, True),
        "stripped": Expect(False, None, R.STARTTLS_NOT_SUPPORTED, True),
        "expired": Expect(False, None, R.CERTIFICATE_EXPIRED, True),
        "wrong-name": Expect(False, None, R.CERTIFICATE_HOST_MISMATCH, True),
        "unknown-ca": Expect(False, None, R.CERTIFICATE_NOT_TRUSTED, True),
        "not-in-policy": Expect(False, None, R.VALIDATION_FAILURE, True, connections=0),
        "tls11": Expect(False, None, R.VALIDATION_FAILURE, True),
    },
    "testing": {
        "good": OK_TLS,
        "no-starttls": Expect(True, None, R.STARTTLS_NOT_SUPPORTED),
        "stripped": Expect(True, None, R.STARTTLS_NOT_SUPPORTED),
        # verification pass fails, then a second, opportunistic connection delivers
        "expired": Expect(True, "TLSv1.", R.CERTIFICATE_EXPIRED, connections=2),
        "wrong-name": Expect(True, "TLSv1.", R.CERTIFICATE_HOST_MISMATCH, connections=2),
        "unknown-ca": Expect(True, "TLSv1.", R.CERTIFICATE_NOT_TRUSTED, connections=2),
        "not-in-policy": Expect(True, "TLSv1.", R.VALIDATION_FAILURE),
        "tls11": Expect(True, "TLSv1.1", R.VALIDATION_FAILURE, connections=2),
    },
    "none": {
        "good": OK_TLS,
        "no-starttls": Expect(True, None, R.STARTTLS_NOT_SUPPORTED),
        "stripped": Expect(True, None, R.STARTTLS_NOT_SUPPORTED),
        "expired": OK_TLS,
        "wrong-name": OK_TLS,
        "unknown-ca": OK_TLS,
        "not-in-policy": OK_TLS,
        "tls11": Expect(True, "TLSv1.1", None),
    },
}
MATRIX["no-policy"] = MATRIX["none"]


@pytest.mark.parametrize("mode", ["enforce", "testing", "none", "no-policy"])
async def test_policy_mode_by_next_hop(lab: MxLab, mode: str) -> None:
    servers = await build_hops(lab)
    policies = {f"{h}.lab.test": policy_for(mode, f"{h}.lab.test") for h in HOPS}

    async def lookup(domain: str) -> TlsPolicy:
        return policies[domain] or TlsPolicy(domain)

    courier = Courier(
        lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink, idle_timeout=0
    )
    try:
        for hop in HOPS:
            domain = f"{hop}.lab.test"
            exp = MATRIX[mode][hop]
            lab.outcomes.clear()
            res = await courier.deliver(job(domain))
            srv = servers[hop]
            where = f"{mode}/{hop}"
            (rr,) = res.recipients
            if exp.delivered:
                assert rr.state is RecipientState.DELIVERED, (where, rr)
                assert len(srv.recorder.messages) == 1, where
                got_tls = srv.recorder.messages[0].tls_version
                if exp.tls is None:
                    assert got_tls is None, (where, got_tls)
                else:
                    assert got_tls is not None and got_tls.startswith(exp.tls), (where, got_tls)
            else:
                # never bounced at once, never sent in clear (RFC 8461 section 5)
                assert rr.state is RecipientState.DEFERRED, (where, rr)
                assert rr.enhanced == "4.7.5" and "MTA-STS" in rr.reply, (where, rr)
                assert srv.recorder.messages == [], where
            assert srv.connections == exp.connections, (where, srv.connections)
            # exactly one outcome per attempt here, handed to the sink and in the result
            assert len(lab.outcomes) == 1, (where, lab.outcomes)
            assert tuple(lab.outcomes) == res.tls_outcomes
            (o,) = lab.outcomes
            assert o.result_type == exp.result, (where, o)
            assert o.enforced == exp.enforced, where
            assert o.policy_domain == domain and o.mx_host == f"mx.{domain}"
            expected_type = PolicyType.NO_POLICY_FOUND if mode == "no-policy" else PolicyType.STS
            assert o.policy_type is expected_type, where
            if mode != "no-policy":
                assert o.mx_patterns == policies[domain].mx_patterns  # type: ignore[union-attr]
                assert o.policy_strings[0] == "version: STSv1"
            if hop == "not-in-policy" and mode in ("enforce", "testing"):
                assert o.failure_reason == MX_NOT_IN_POLICY
            else:
                assert o.receiving_ip == (srv.ip if hop != "stripped" else o.receiving_ip)
                if exp.connections:
                    assert o.sending_mta_ip.startswith("127.")
    finally:
        await courier.close()


def sts(domain: str, mode: StsMode, *patterns: str, **kw: object) -> TlsPolicy:
    return TlsPolicy(domain, mode, patterns, 86400, "id1", ("version: STSv1",), **kw)  # type: ignore[arg-type]


async def test_enforce_moves_to_the_next_mx(lab: MxLab) -> None:
    bad = await lab.add_mx("d.lab.test", "mx1.d.lab.test", "expired", pref=10)
    good = await lab.add_mx("d.lab.test", "mx2.d.lab.test", "good", pref=20)

    async def lookup(domain: str) -> TlsPolicy:
        return sts(domain, StsMode.ENFORCE, "*.d.lab.test")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    try:
        res = await courier.deliver(job("d.lab.test"))
    finally:
        await courier.close()
    assert res.recipients[0].state is RecipientState.DELIVERED
    assert res.mx_host == "mx2.d.lab.test" and res.tls_version
    assert bad.recorder.messages == [] and bad.connections == 1
    assert len(good.recorder.messages) == 1
    assert [(o.mx_host, o.result_type) for o in lab.outcomes] == [
        ("mx1.d.lab.test", R.CERTIFICATE_EXPIRED),
        ("mx2.d.lab.test", None),
    ]


async def test_enforce_with_no_matching_mx_defers_without_connecting(lab: MxLab) -> None:
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "good")

    async def lookup(domain: str) -> TlsPolicy:
        return sts(domain, StsMode.ENFORCE, "mx.other.test")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup)
    res = await courier.deliver(job("d.lab.test"))
    await courier.close()
    rr = res.recipients[0]
    assert rr.state is RecipientState.DEFERRED and rr.reply.startswith("451 4.7.5")
    assert "mx-host-not-in-policy" in rr.reply
    assert srv.connections == 0
    # a TLS-policy refusal is no sign of a dead destination
    assert not courier.is_dead("d.lab.test")


async def test_fetch_error_is_reported_once_and_delivery_is_opportunistic(lab: MxLab) -> None:
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "none")

    async def lookup(domain: str) -> TlsPolicy:
        return TlsPolicy(
            domain, fetch_error=R.STS_POLICY_FETCH_ERROR, fetch_error_reason="HTTP 404"
        )

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    res = await courier.deliver(job("d.lab.test"))
    await courier.close()
    assert res.recipients[0].state is RecipientState.DELIVERED
    assert len(srv.recorder.messages) == 1
    fetch = [o for o in lab.outcomes if o.result_type is R.STS_POLICY_FETCH_ERROR]
    assert len(fetch) == 1 and fetch[0].policy_type is PolicyType.STS
    assert fetch[0].failure_reason == "HTTP 404"


async def test_tls_required_no_waives_enforce(lab: MxLab) -> None:
    """RFC 8689: "TLS-Required: no" mail is delivered despite an enforce failure."""
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "none")

    async def lookup(domain: str) -> TlsPolicy:
        return sts(domain, StsMode.ENFORCE, "mx.d.lab.test")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    res = await courier.deliver(job("d.lab.test", tls_required=False))
    await courier.close()
    assert res.recipients[0].state is RecipientState.DELIVERED
    assert [o.result_type for o in lab.outcomes] == [R.STARTTLS_NOT_SUPPORTED]
    assert lab.outcomes[0].enforced is False
    assert len(srv.recorder.messages) == 1


async def test_record_tls_false_keeps_outcomes_from_the_sink(lab: MxLab) -> None:
    await lab.add_mx("d.lab.test", "mx.d.lab.test", "good")
    courier = Courier(lab.config(), lab.resolver(), outcome_sink=lab.sink)
    res = await courier.deliver(job("d.lab.test", record_tls=False))
    await courier.close()
    assert res.recipients[0].state is RecipientState.DELIVERED
    assert lab.outcomes == [] and len(res.tls_outcomes) == 1


async def test_policy_lookup_error_defers_rather_than_downgrades(lab: MxLab) -> None:
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "none")

    async def lookup(domain: str) -> TlsPolicy:
        raise RuntimeError("cache broke")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup)
    res = await courier.deliver(job("d.lab.test"))
    await courier.close()
    assert res.recipients[0].state is RecipientState.DEFERRED
    assert res.recipients[0].enhanced == "4.7.0" and "cache broke" in res.recipients[0].reply
    assert srv.connections == 0


async def test_unreadable_policy_cache_defers_with_the_reason_and_never_connects(
    lab: MxLab,
) -> None:
    """RFC 8461 section 5: an unreadable cache may hold an enforce policy; the MX has no
    STARTTLS (as behind a stripper): nothing is sent, every recipient waits with 4.7.0."""
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "none")

    async def lookup(domain: str) -> TlsPolicy:
        raise CacheUnavailable(domain, "StoreError: OperationalError: database is locked")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    res = await courier.deliver(job("d.lab.test", "a@d.lab.test", "b@d.lab.test"))
    await courier.close()
    assert {r.state for r in res.recipients} == {RecipientState.DEFERRED}
    for r in res.recipients:
        assert r.reply.startswith("451 4.7.0 TLS policy of d.lab.test unavailable"), r.reply
        assert "database is locked" in r.reply and r.enhanced == "4.7.0"
    assert srv.connections == 0 and srv.recorder.messages == []
    assert lab.outcomes == []


async def test_connection_reuse_two_transactions_one_connection(lab: MxLab) -> None:
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "good")

    async def lookup(domain: str) -> TlsPolicy:
        return sts(domain, StsMode.ENFORCE, "mx.d.lab.test")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    try:
        r1 = await courier.deliver(job("d.lab.test", "a@d.lab.test", qid="Q1"))
        r2 = await courier.deliver(job("d.lab.test", "b@d.lab.test", qid="Q2"))
    finally:
        await courier.close()
    assert r1.recipients[0].state is RecipientState.DELIVERED
    assert r2.recipients[0].state is RecipientState.DELIVERED
    assert srv.connections == 1
    msgs = srv.recorder.messages
    assert len(msgs) == 2 and msgs[0].conn == msgs[1].conn
    assert all(m.tls_version for m in msgs)
    assert len(lab.outcomes) == 1  # one TLS session, one outcome


async def test_reuse_needs_a_verified_session_under_enforce(lab: MxLab) -> None:
    """A connection opened opportunistically is not reused for a domain under enforce."""
    srv = await lab.add_mx("d.lab.test", "mx.shared.lab.test", "good")
    lab.zone.add("e.lab.test", "MX", (10, "mx.shared.lab.test"))

    async def lookup(domain: str) -> TlsPolicy:
        if domain == "e.lab.test":
            return sts(domain, StsMode.ENFORCE, "mx.shared.lab.test")
        return TlsPolicy(domain)

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup)
    try:
        await courier.deliver(job("d.lab.test"))
        await courier.deliver(job("e.lab.test"))
        await courier.deliver(job("e.lab.test"))
    finally:
        await courier.close()
    # d: opportunistic session (pooled); e: needs verified -> new session, then reused
    assert srv.connections == 2 and len(srv.recorder.messages) == 3


async def test_reused_connection_failing_before_mail_is_retried_once(lab: MxLab) -> None:
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "good")
    srv.recorder.fail_mail_on_reuse = True
    courier = Courier(lab.config(), lab.resolver())
    try:
        r1 = await courier.deliver(job("d.lab.test", "a@d.lab.test"))
        r2 = await courier.deliver(job("d.lab.test", "b@d.lab.test"))
    finally:
        await courier.close()
    assert r1.recipients[0].state is RecipientState.DELIVERED
    assert r2.recipients[0].state is RecipientState.DELIVERED
    assert srv.connections == 2 and len(srv.recorder.messages) == 2


async def test_idle_connection_expires(lab: MxLab) -> None:
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "good")
    courier = Courier(lab.config(), lab.resolver(), idle_timeout=0.2)
    try:
        await courier.deliver(job("d.lab.test"))
        assert len(courier.pool) == 1
        await asyncio.sleep(0.4)
        assert len(courier.pool) == 0
        await courier.deliver(job("d.lab.test"))
    finally:
        await courier.close()
    assert srv.connections == 2


async def test_policy_memo_reuses_an_answer_briefly_but_never_an_unavailable_cache(
    lab: MxLab,
) -> None:
    """A list's copies to one domain: the lookup runs once for messages within
    POLICY_MEMO_SECONDS; an unreadable cache is asked again on the next message and
    defers it (RFC 8461 section 5), even right after an enforce policy was memoised;
    a replaced lookup (relay reload) is used at once."""
    srv = await lab.add_mx("d.lab.test", "mx.d.lab.test", "none")  # no STARTTLS
    calls: list[str] = []
    broken = False

    async def lookup(domain: str) -> TlsPolicy:
        calls.append(domain)
        if broken:
            raise CacheUnavailable(domain, "StoreError: database is locked")
        return sts(domain, StsMode.ENFORCE, "mx.d.lab.test")

    courier = Courier(lab.config(), lab.resolver(), policy_lookup=lookup, outcome_sink=lab.sink)
    try:
        first = await courier.deliver(job("d.lab.test", qid="Q1"))
        second = await courier.deliver(job("d.lab.test", qid="Q2"))
        assert len(calls) == 1  # the second message took the memo
        courier._policy_memo.clear()  # past the memo's second
        broken = True
        third = await courier.deliver(job("d.lab.test", qid="Q3"))
        fourth = await courier.deliver(job("d.lab.test", qid="Q4"))
        assert len(calls) == 3  # no memo of an unavailable cache: asked each time

        async def none(domain: str) -> TlsPolicy:
            calls.append("replaced")
            return TlsPolicy(domain=domain)

        broken = False
        await courier.deliver(job("d.lab.test", qid="Q5"))  # enforce memoised again
        courier.policy_lookup = none
        fifth = await courier.deliver(job("d.lab.test", qid="Q6"))
    finally:
        await courier.close()
    for res in (first, second):  # enforce, MX without STARTTLS: never in clear
        assert res.recipients[0].state is RecipientState.DEFERRED, res
    for res in (third, fourth):
        assert res.recipients[0].reply.startswith("451 4.7.0 TLS policy of d.lab.test"), res
    assert calls[-1] == "replaced"
    assert fifth.recipients[0].state is RecipientState.DELIVERED  # no policy: opportunistic
    assert len(srv.recorder.messages) == 1 and srv.recorder.messages[0].tls_version is None
