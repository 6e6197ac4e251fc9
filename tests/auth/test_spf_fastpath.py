"""relay.auth.spf's fast paths: the remembered client address parse gives what a fresh
parse gives (errors included), and the macro values built on first use are the ones the
evaluation built up front before."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import spf
from relay.auth.spf import _Evaluation, client_address
from relay.auth.spf_macro import MacroValues, ip_values
from relay.dns import StaticResolver

PIECES = ["127.0.0.1", "::ffff:", "[", "]", " ", "2001:db8::1", "1", ".", ":", "x", "::", "0"]


def _outcome(fn: object, text: str) -> object:
    try:
        return fn(text)  # type: ignore[operator]
    except ValueError as exc:
        return ("error", str(exc))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=5).map("".join))
def test_remembered_client_address_matches_a_fresh_parse(text: str) -> None:
    fresh = _outcome(client_address.__wrapped__, text)
    for _ in range(2):  # the second call is served from the cache
        assert _outcome(client_address, text) == fresh


def test_the_client_address_cache_is_bounded() -> None:
    assert spf.client_address.cache_info().maxsize == 1024


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.sampled_from(["a@b.test", "@b.test", "x.y@z", "postmaster@h"]),
    st.sampled_from(["helo.test", "", "h"]),
)
def test_macro_values_are_the_ones_built_up_front(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, sender: str, helo: str
) -> None:
    ev = _Evaluation(StaticResolver(), ip, sender, helo, "rcv.test", lambda: 1700000000.5)
    local, _, sdomain = sender.rpartition("@")
    i, v, c = ip_values(ip)
    eager = MacroValues(
        s=sender,
        l=local or "postmaster",
        o=sdomain,
        d="",
        i=i,
        p="",
        v=v,
        h=helo,
        c=c,
        r="rcv.test",
        t="1700000000",
    )
    assert ev.values == eager
    assert ev.values is ev.values  # built once
