"""relay.http against a real HTTPS server on loopback (trustme CA)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from relay.dns import StaticResolver
from relay.http import (
    HttpErrorKind,
    HttpFetchError,
    SafeHttpClient,
    address_refusal,
    content_type_is,
)
from tests.mtasts.sts_https_server import Answer, HttpsServer

HOST = "mta-sts.example.com"
PATH = "/.well-known/mta-sts.txt"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    p = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(p))
    return p


@pytest.fixture
async def server(ca: trustme.CA) -> AsyncIterator[HttpsServer]:
    async with HttpsServer(ca, "127.0.0.1") as srv:
        yield srv


def client(
    ca_file: Path | None,
    *,
    allow_private: bool = True,
    timeout: float = 5.0,
    records: dict[tuple[str, str], object] | None = None,
) -> SafeHttpClient:
    resolver = StaticResolver(
        records or {(HOST, "A"): "127.0.0.1", ("other.test", "A"): "127.0.0.1"}
    )
    return SafeHttpClient(resolver, ca_file=ca_file, allow_private=allow_private, timeout=timeout)


async def test_valid_fetch_uses_sni_and_host(server: HttpsServer, ca_file: Path) -> None:
    server.route(HOST, PATH, Answer(200, b"version: STSv1\n", "text/plain; charset=utf-8"))
    resp = await client(ca_file).get(f"https://{HOST}{PATH}", port=server.port, max_bytes=100)
    assert resp.status == 200
    assert resp.body == b"version: STSv1\n"
    assert content_type_is(resp, "text/plain")
    assert resp.peer_ip == "127.0.0.1"
    seen = server.seen[-1]
    assert (seen.sni, seen.host, seen.method, seen.path) == (HOST, HOST, "GET", PATH)


async def test_post_sends_body(server: HttpsServer, ca_file: Path) -> None:
    server.route(HOST, "/report", Answer(201, b"", None))
    resp = await client(ca_file).post(
        f"https://{HOST}:{server.port}/report", b"\x1f\x8bxyz", "application/tlsrpt+gzip"
    )
    assert resp.status == 201
    seen = server.seen[-1]
    assert seen.body == b"\x1f\x8bxyz"
    assert seen.headers["content-type"] == "application/tlsrpt+gzip"


async def test_wrong_name_certificate_refused(
    ca: trustme.CA, server: HttpsServer, ca_file: Path
) -> None:
    server.route(HOST, PATH, Answer(200, b"x"))
    server.cert_for(HOST, ca, "mta-sts.attacker.example")
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file).get(f"https://{HOST}{PATH}", port=server.port)
    assert ei.value.kind is HttpErrorKind.TLS_CERTIFICATE
    assert "mismatch" in ei.value.message.lower()
    assert server.seen == []


async def test_unknown_ca_refused(server: HttpsServer, ca_file: Path) -> None:
    server.route(HOST, PATH, Answer(200, b"x"))
    server.cert_for(HOST, trustme.CA())
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file).get(f"https://{HOST}{PATH}", port=server.port)
    assert ei.value.kind is HttpErrorKind.TLS_CERTIFICATE
    assert server.seen == []


async def test_no_extra_ca_means_lab_ca_untrusted(server: HttpsServer) -> None:
    server.route(HOST, PATH, Answer(200, b"x"))
    with pytest.raises(HttpFetchError) as ei:
        await client(None).get(f"https://{HOST}{PATH}", port=server.port)
    assert ei.value.kind is HttpErrorKind.TLS_CERTIFICATE


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirect_not_followed(server: HttpsServer, ca_file: Path, status: int) -> None:
    server.route(HOST, PATH, Answer(status, b"", headers=[("Location", f"https://{HOST}/other")]))
    server.route(HOST, "/other", Answer(200, b"version: STSv1\n"))
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file).get(f"https://{HOST}{PATH}", port=server.port)
    assert ei.value.kind is HttpErrorKind.REDIRECT
    assert ei.value.status == status
    assert [s.path for s in server.seen] == [PATH]


async def test_status_other_than_200(server: HttpsServer, ca_file: Path) -> None:
    server.cert_for(HOST)
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file).get(f"https://{HOST}/missing", port=server.port)
    assert ei.value.kind is HttpErrorKind.STATUS and ei.value.status == 404


@pytest.mark.parametrize(
    "answer",
    [
        Answer(200, b"a" * 70000),  # Content-Length announces it
        Answer(200, b"a" * 70000, chunked=True),  # only the stream shows it
        Answer(200, b"a" * 10, headers=[("Content-Length", "999999")]),  # a lying header
        Answer(200, endless=True),  # never ends
    ],
    ids=["content-length", "chunked", "announced", "endless"],
)
async def test_oversize_refused(server: HttpsServer, ca_file: Path, answer: Answer) -> None:
    server.route(HOST, PATH, answer)
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file).get(f"https://{HOST}{PATH}", port=server.port, max_bytes=65536)
    assert ei.value.kind is HttpErrorKind.TOO_LARGE


async def test_exactly_at_limit_accepted(server: HttpsServer, ca_file: Path) -> None:
    server.route(HOST, PATH, Answer(200, b"a" * 65536, chunked=True))
    resp = await client(ca_file).get(f"https://{HOST}{PATH}", port=server.port, max_bytes=65536)
    assert len(resp.body) == 65536


async def test_total_timeout_on_slow_answer(server: HttpsServer, ca_file: Path) -> None:
    server.route(HOST, PATH, Answer(200, b"x", delay=3))
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file, timeout=0.5).get(f"https://{HOST}{PATH}", port=server.port)
    assert ei.value.kind is HttpErrorKind.TIMEOUT


async def test_loopback_refused_when_not_allowed(server: HttpsServer, ca_file: Path) -> None:
    server.route(HOST, PATH, Answer(200, b"x"))
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file, allow_private=False).get(f"https://{HOST}{PATH}", port=server.port)
    assert ei.value.kind is HttpErrorKind.REFUSED_ADDRESS
    assert "loopback" in ei.value.message
    assert server.seen == []


async def test_ip_literal_url_refused(ca_file: Path) -> None:
    c = client(ca_file, allow_private=False)
    with pytest.raises(HttpFetchError) as ei:
        await c.post("https://127.0.0.1:9/", b"x", "application/json")
    assert ei.value.kind is HttpErrorKind.REFUSED_ADDRESS


async def test_metadata_refused_even_when_private_allowed(ca_file: Path) -> None:
    c = client(ca_file, allow_private=True, records={(HOST, "A"): "169.254.169.254"})
    with pytest.raises(HttpFetchError) as ei:
        await c.get(f"https://{HOST}{PATH}")
    assert ei.value.kind is HttpErrorKind.REFUSED_ADDRESS
    assert "metadata" in ei.value.message


async def test_dns_failure(ca_file: Path) -> None:
    c = client(ca_file, records={(HOST, "A"): "SERVFAIL"})
    with pytest.raises(HttpFetchError) as ei:
        await c.get(f"https://{HOST}{PATH}")
    assert ei.value.kind is HttpErrorKind.DNS and ei.value.temporary
    with pytest.raises(HttpFetchError) as ei:
        await c.get(f"https://nonexistent.test{PATH}")
    assert ei.value.kind is HttpErrorKind.DNS and not ei.value.temporary


async def test_connection_refused(ca_file: Path, unused_tcp_port: int) -> None:
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file).get(f"https://{HOST}{PATH}", port=unused_tcp_port)
    assert ei.value.kind is HttpErrorKind.CONNECT


async def test_plain_http_url_refused(ca_file: Path) -> None:
    with pytest.raises(HttpFetchError) as ei:
        await client(ca_file).get(f"http://{HOST}{PATH}")
    assert ei.value.kind is HttpErrorKind.URL


@pytest.mark.parametrize(
    ("ip", "private_ok", "refused"),
    [
        ("127.0.0.1", False, True),
        ("10.1.2.3", False, True),
        ("172.16.0.1", False, True),
        ("192.168.1.1", False, True),
        ("100.64.0.1", False, True),
        ("169.254.1.1", False, True),
        ("169.254.169.254", True, True),
        ("fd00:ec2::254", True, True),
        ("::1", False, True),
        ("fe80::1", False, True),
        ("fc00::1", False, True),
        ("::ffff:127.0.0.1", False, True),
        ("0.0.0.0", True, True),
        ("::", True, True),
        ("224.0.0.1", True, True),
        ("ff02::1", True, True),
        ("8.8.8.8", False, False),
        ("2001:4860:4860::8888", False, False),
        ("127.0.0.1", True, False),
        ("10.1.2.3", True, False),
        ("fe80::1", True, False),
    ],
)
def test_address_refusal(ip: str, private_ok: bool, refused: bool) -> None:
    assert (address_refusal(ip, allow_private=private_ok) is not None) is refused
