"""The lab's HTTPS MTA-STS policy host, fetched by the relay's own policy fetcher
(relay.mtasts.fetch over relay.http.SafeHttpClient) in every mode."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from relay.dns import StaticResolver
from relay.http import HttpErrorKind, SafeHttpClient
from relay.lab.policyhost import (
    OVERSIZE_BYTES,
    PolicyHost,
    Site,
    SiteMode,
    invalid_policy,
    oversized_policy,
)
from relay.model import StsMode, TlsResultType
from relay.mtasts.fetch import PolicyFetchError, fetch_policy
from relay.mtasts.policy import MAX_POLICY_BYTES, StsPolicy, parse_policy

HOST_IP = "127.0.0.41"
POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.a.test\r\nmax_age: 86400\r\n"
DOMAINS = ("a.test", "b.test")


class Env:
    def __init__(self, host: PolicyHost, http: SafeHttpClient) -> None:
        self.host = host
        self.http = http

    async def fetch(self, domain: str = "a.test") -> StsPolicy:
        return await fetch_policy(self.http, domain, port=self.host.port, timeout=5)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*[f"mta-sts.{d}" for d in DOMAINS]).configure_cert(ctx)
    host = PolicyHost(ctx, (HOST_IP, 0), sites={f"mta-sts.{d}": Site(POLICY) for d in DOMAINS})
    resolver = StaticResolver({(f"mta-sts.{d}", "A"): HOST_IP for d in DOMAINS})
    http = SafeHttpClient(resolver, ca_file=ca_file, allow_private=True, timeout=5)
    async with host:
        yield Env(host, http)


async def test_normal_serves_the_policy_as_text_plain(env: Env) -> None:
    policy = await env.fetch()
    assert policy.mode is StsMode.ENFORCE and policy.mx == ("mx.a.test",)
    assert policy.max_age == 86400
    [seen] = env.host.served
    assert (seen.host, seen.path, seen.status) == (
        "mta-sts.a.test",
        "/.well-known/mta-sts.txt",
        200,
    )


@pytest.mark.parametrize(
    ("mode", "result_type", "kind", "words"),
    [
        (SiteMode.NOT_FOUND, TlsResultType.STS_POLICY_FETCH_ERROR, HttpErrorKind.STATUS, "404"),
        (SiteMode.REDIRECT, TlsResultType.STS_POLICY_FETCH_ERROR, HttpErrorKind.REDIRECT, "301"),
        (SiteMode.WRONG_CONTENT_TYPE, TlsResultType.STS_POLICY_FETCH_ERROR, None, "text/html"),
        (SiteMode.OVERSIZED, TlsResultType.STS_POLICY_FETCH_ERROR, HttpErrorKind.TOO_LARGE, ""),
        (SiteMode.INVALID, TlsResultType.STS_POLICY_INVALID, None, "mode"),
        (SiteMode.DOWN, TlsResultType.STS_POLICY_FETCH_ERROR, HttpErrorKind.TLS_OTHER, ""),
    ],
)
async def test_each_failure_mode_gives_its_rfc8460_result_type(
    env: Env, mode: SiteMode, result_type: TlsResultType, kind: HttpErrorKind | None, words: str
) -> None:
    env.host.set_mode("mta-sts.a.test", mode)
    with pytest.raises(PolicyFetchError) as err:
        await env.fetch()
    assert err.value.result_type is result_type
    assert err.value.http_kind is kind
    assert words in err.value.reason
    # the other site on the same listener is untouched
    assert (await env.fetch("b.test")).mode is StsMode.ENFORCE


async def test_down_aborts_the_handshake_and_records_it(env: Env) -> None:
    env.host.set_mode("mta-sts.a.test", SiteMode.DOWN)
    with pytest.raises(PolicyFetchError):
        await env.fetch()
    assert [(s.host, s.status, s.mode) for s in env.host.served] == [
        ("mta-sts.a.test", 0, SiteMode.DOWN)
    ]


async def test_unknown_host_and_path_are_404(env: Env) -> None:
    env.host.sites.pop("mta-sts.b.test")
    with pytest.raises(PolicyFetchError) as err:
        await env.fetch("b.test")
    assert err.value.http_kind is HttpErrorKind.STATUS


def test_invalid_and_oversized_bodies() -> None:
    bad = invalid_policy(POLICY)
    assert "mode: strict" in bad and "mode: enforce" not in bad
    with pytest.raises(Exception, match="mode"):
        parse_policy(bad)
    big = oversized_policy(POLICY)
    assert len(big.encode()) > MAX_POLICY_BYTES and len(big) >= OVERSIZE_BYTES
    # only the size is wrong: the padded body itself parses (unknown keys are ignored)
    assert parse_policy(big).mx == ("mx.a.test",)
