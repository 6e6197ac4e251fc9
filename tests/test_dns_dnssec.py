"""DNSSEC status of every answer (relay/dns.py): the AD bit is trusted only in trust-ad
mode from a loopback (or explicitly trusted) resolver; SERVFAIL is temporary, and bogus
only when the resolver says validation failed (RFC 8914 EDE, or an answer with CD).

The responder here is a real UDP server on loopback that answers as a validating
resolver would (AD set or not, SERVFAIL with or without EDE); the same statuses through
real unbound are in tests/dane/test_unbound_lab.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from relay.config import load_config
from relay.dns import CachingResolver, DnspythonResolver, StaticResolver, effective_dnssec
from relay.errors import ConfigError, DnsBogus, DnsNoData, DnsTempFail

Handler = Callable[[dns.message.Message], dns.message.Message]


class Responder:
    """A UDP DNS responder on 127.0.0.1 answering each query with handler(query)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.queries: list[dns.message.Message] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            q = dns.message.from_wire(data)
            self.queries.append(q)
            self.sock.sendto(self.handler(q).to_wire(), peer)

    def __enter__(self) -> Responder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _a_answer(q: dns.message.Message, ad: bool) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.7"))
    if ad:
        r.flags |= dns.flags.AD
    return r


@pytest.fixture
def ad_server() -> Iterator[Responder]:
    with Responder(lambda q: _a_answer(q, ad=True)) as r:
        yield r


async def test_ad_bit_from_loopback_is_secure_and_query_asks_for_it(ad_server: Responder) -> None:
    res = DnspythonResolver([f"127.0.0.1:{ad_server.port}"], timeout=2)
    assert res.dnssec == "trust-ad"  # the default on loopback
    ans = await res.answer("h.example", "A")
    assert (ans.records, ans.status) == (("192.0.2.7",), "secure")
    q = ad_server.queries[-1]
    assert q.flags & dns.flags.AD and q.ednsflags & dns.flags.DO  # RFC 6840 5.7, RFC 3225


async def test_ad_bit_ignored_when_off(ad_server: Responder) -> None:
    res = DnspythonResolver([f"127.0.0.1:{ad_server.port}"], timeout=2, dnssec="off")
    assert (await res.answer("h.example", "A")).status == "insecure"


async def test_no_ad_bit_is_insecure() -> None:
    with Responder(lambda q: _a_answer(q, ad=False)) as srv:
        res = DnspythonResolver([f"127.0.0.1:{srv.port}"], timeout=2)
        assert (await res.answer("h.example", "A")).status == "insecure"


def test_ad_from_a_remote_resolver_is_trusted_only_when_marked() -> None:
    assert effective_dnssec(None, False, ["127.0.0.1"]) == "trust-ad"
    assert effective_dnssec(None, False, ["::1", "127.0.0.53"]) == "trust-ad"
    assert effective_dnssec(None, False, ["192.0.2.53"]) == "off"
    assert effective_dnssec(None, False, ["127.0.0.1", "192.0.2.53"]) == "off"
    assert effective_dnssec("trust-ad", False, ["192.0.2.53"]) == "off"
    assert effective_dnssec("trust-ad", True, ["192.0.2.53"]) == "trust-ad"
    assert effective_dnssec("off", False, ["127.0.0.1"]) == "off"


def test_config_trust_ad_remote_needs_dnssec_trusted(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[dns]\nnameservers = ["192.0.2.53"]\ndnssec = "trust-ad"\n')
    with pytest.raises(ConfigError, match="dnssec_trusted"):
        load_config(p)
    p.write_text(
        '[dns]\nnameservers = ["192.0.2.53"]\ndnssec = "trust-ad"\ndnssec_trusted = true\n'
    )
    cfg = load_config(p).dns
    assert (cfg.dnssec, cfg.dnssec_trusted) == ("trust-ad", True)
    p.write_text('[dns]\ndnssec = "maybe"\n')
    with pytest.raises(ConfigError, match="dns.dnssec"):
        load_config(p)
    p.write_text("[dns]\n")
    assert load_config(p).dns.dnssec is None


def _servfail(ede: int | None, cd_answers: bool) -> Handler:
    def handle(q: dns.message.Message) -> dns.message.Message:
        if q.flags & dns.flags.CD and cd_answers:
            return _a_answer(q, ad=False)
        r = dns.message.make_response(q)
        r.set_rcode(dns.rcode.SERVFAIL)
        if ede is not None:
            r.use_edns(0, options=[dns.edns.EDEOption(ede, "lab")])
        return r

    return handle


async def test_servfail_is_temporary_never_insecure() -> None:
    with Responder(_servfail(ede=None, cd_answers=False)) as srv:
        res = DnspythonResolver([f"127.0.0.1:{srv.port}"], timeout=2)
        with pytest.raises(DnsTempFail) as exc:
            await res.answer("h.example", "A")
        assert not isinstance(exc.value, DnsBogus)
        assert exc.value.status == "unknown"


@pytest.mark.parametrize(("ede", "cd_answers"), [(6, False), (7, False), (None, True)])
async def test_servfail_from_validation_is_bogus(ede: int | None, cd_answers: bool) -> None:
    with Responder(_servfail(ede, cd_answers)) as srv:
        res = DnspythonResolver([f"127.0.0.1:{srv.port}"], timeout=2)
        with pytest.raises(DnsBogus) as exc:
            await res.answer("h.example", "A")
        assert exc.value.status == "bogus"
        # a temporary failure for every other use (RFC 7672 2.1.1: never "insecure")
        assert isinstance(exc.value, DnsTempFail)


async def test_servfail_with_a_non_dnssec_ede_is_not_bogus() -> None:
    with Responder(_servfail(ede=22, cd_answers=False)) as srv:  # 22: No Reachable Authority
        res = DnspythonResolver([f"127.0.0.1:{srv.port}"], timeout=2)
        with pytest.raises(DnsTempFail) as exc:
            await res.answer("h.example", "A")
        assert not isinstance(exc.value, DnsBogus)


async def test_cache_keeps_the_status_and_never_keeps_bogus() -> None:
    inner = StaticResolver(
        {("s.example", "A"): ["192.0.2.1"], ("b.example", "A"): "BOGUS"}, secure=["s.example"]
    )
    res = CachingResolver(inner)
    for _ in range(2):
        assert (await res.answer("s.example", "A")).status == "secure"
    for _ in range(2):
        with pytest.raises(DnsBogus):
            await res.answer("b.example", "A")
    assert inner.queries.count(("b.example", "A")) == 2
    with pytest.raises(DnsNoData) as exc:
        await res.answer("s.example", "AAAA")
    assert exc.value.status == "secure"  # an authenticated denial


async def test_concurrent_queries_each_get_their_answer(ad_server: Responder) -> None:
    res = DnspythonResolver([f"127.0.0.1:{ad_server.port}"], timeout=2)
    got = await asyncio.gather(*(res.a(f"h{i}.example") for i in range(20)))
    assert all(g == ["192.0.2.7"] for g in got)
