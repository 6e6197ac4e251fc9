"""Discovery and fetch end to end: the real lab DNS server and a real HTTPS policy host
(trustme) on 127.0.0.2, through PolicyManager.get_policy and relay.mtasts.fetch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from relay.http import HttpErrorKind, SafeHttpClient
from relay.model import StsMode, TlsResultType
from relay.mtasts.fetch import DiscoveryStatus, PolicyFetchError, discover, fetch_policy
from relay.store import Store
from tests.mtasts.conftest import StsLab
from tests.mtasts.sts_https_server import Answer

GOOD = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.mail.example.com\r\n"
    "max_age: 86400\r\n"
)
VECTORS = Path(__file__).parent.parent / "vectors" / "mta-sts"


async def test_valid_policy(lab: StsLab, store: Store) -> None:
    lab.publish("example.com", GOOD, "20260101T000000")
    pol = await lab.manager(store).get_policy("Example.COM.")
    assert pol.domain == "example.com"
    assert pol.mode is StsMode.ENFORCE and pol.enforce
    assert pol.mx_patterns == ("mx1.example.com", "*.mail.example.com")
    assert (pol.max_age, pol.policy_id, pol.fetch_error) == (86400, "20260101T000000", None)
    assert pol.policy_strings[0] == "version: STSv1"
    seen = lab.https.seen[-1]
    assert (seen.sni, seen.host, seen.path) == (
        "mta-sts.example.com",
        "mta-sts.example.com",
        "/.well-known/mta-sts.txt",
    )


async def test_no_txt_record_no_policy_no_fetch(lab: StsLab, store: Store) -> None:
    pol = await lab.manager(store).get_policy("nopolicy.example")
    assert pol.mode is None and pol.fetch_error is None
    assert lab.https.seen == []


@pytest.mark.parametrize(
    ("answer", "result_type", "why"),
    [
        (Answer(404, GOOD.encode()), TlsResultType.STS_POLICY_FETCH_ERROR, "HTTP 404"),
        (
            Answer(301, b"", headers=[("Location", "https://mta-sts.example.com/p")]),
            TlsResultType.STS_POLICY_FETCH_ERROR,
            "redirect",
        ),
        (
            Answer(200, GOOD.encode(), "text/html"),
            TlsResultType.STS_POLICY_FETCH_ERROR,
            "text/html",
        ),
        (Answer(200, GOOD.encode(), None), TlsResultType.STS_POLICY_FETCH_ERROR, "none"),
        (
            Answer(200, GOOD.encode() + b"a" * 131136, chunked=True),
            TlsResultType.STS_POLICY_FETCH_ERROR,
            "limit",
        ),
        (Answer(200, endless=True), TlsResultType.STS_POLICY_FETCH_ERROR, "limit"),
        (
            Answer(200, b"version: STSv1\nmode: enforce\nmax_age: 86400\n"),
            TlsResultType.STS_POLICY_INVALID,
            "no mx",
        ),
        (Answer(200, b"garbage"), TlsResultType.STS_POLICY_INVALID, "line 1"),
    ],
    ids=["404", "redirect", "html", "no-content-type", "oversized", "endless", "no-mx", "garbage"],
)
async def test_bad_policy_hosts(
    lab: StsLab, store: Store, answer: Answer, result_type: TlsResultType, why: str
) -> None:
    lab.publish("example.com", None, "abc", answer=answer)
    lab.https.route("mta-sts.example.com", "/p", Answer(200, GOOD.encode()))
    pol = await lab.manager(store).get_policy("example.com")
    assert pol.mode is None
    assert pol.fetch_error is result_type
    assert why in pol.fetch_error_reason
    assert pol.policy_id == "abc"
    assert [s.path for s in lab.https.seen] == ["/.well-known/mta-sts.txt"]  # no redirect


async def test_wrong_name_and_unknown_ca_are_webpki_invalid(
    lab: StsLab, store: Store, ca: trustme.CA
) -> None:
    lab.publish("wrongname.example", GOOD)
    lab.https.cert_for("mta-sts.wrongname.example", ca, "mta-sts.other.example")
    lab.publish("unknownca.example", GOOD)
    lab.https.cert_for("mta-sts.unknownca.example", trustme.CA())
    m = lab.manager(store)
    for d in ("wrongname.example", "unknownca.example"):
        pol = await m.get_policy(d)
        assert (pol.mode, pol.fetch_error) == (None, TlsResultType.STS_WEBPKI_INVALID), d
    assert m.counters.refusals == 2


async def test_private_address_refused_without_lab_flag(lab: StsLab) -> None:
    lab.publish("example.com", GOOD)
    cfg = lab.config()
    http = SafeHttpClient(lab.resolver(), ca_file=lab.ca_file, allow_private=False)
    with pytest.raises(PolicyFetchError) as ei:
        await fetch_policy(http, "example.com", port=cfg.mta_sts.https_port)
    assert ei.value.result_type is TlsResultType.STS_POLICY_FETCH_ERROR
    assert ei.value.http_kind is HttpErrorKind.REFUSED_ADDRESS
    assert lab.https.seen == []


async def test_metadata_address_refused_even_in_lab(lab: StsLab, store: Store) -> None:
    lab.publish("example.com", GOOD)
    lab.zone.set("mta-sts.example.com", "A", ["169.254.169.254"])
    pol = await lab.manager(store).get_policy("example.com")
    assert pol.fetch_error is TlsResultType.STS_POLICY_FETCH_ERROR
    assert "metadata" in pol.fetch_error_reason


async def test_slow_policy_host_times_out(lab: StsLab, store: Store) -> None:
    lab.publish("slow.example", None, answer=Answer(200, GOOD.encode(), delay=3))
    pol = await lab.manager(store, fetch_timeout=0.5).get_policy("slow.example")
    assert pol.fetch_error is TlsResultType.STS_POLICY_FETCH_ERROR
    assert "timeout" in pol.fetch_error_reason.lower() or "within" in pol.fetch_error_reason


# ---------------------------------------------------------------- TXT discovery (row 15)


@pytest.mark.parametrize(
    ("records", "status", "rid"),
    [
        ([], DiscoveryStatus.NONE, None),
        (["v=STSv1; id=one"], DiscoveryStatus.FOUND, "one"),
        (["v=STSv1; id=one", "v=STSv1; id=two"], DiscoveryStatus.NONE, None),
        (["v=spf1 -all", "v=STSv1; id=one"], DiscoveryStatus.FOUND, "one"),
        ([["v=STSv1; i", "d=split123"]], DiscoveryStatus.FOUND, "split123"),
        (["v=STSv12; id=x"], DiscoveryStatus.NONE, None),
        (["v=STSv1; id=bad-id"], DiscoveryStatus.NONE, None),
    ],
    ids=["zero", "one", "two", "other-txt", "split-strings", "v12", "bad-id"],
)
async def test_txt_discovery(
    lab: StsLab, records: list[Any], status: DiscoveryStatus, rid: str | None
) -> None:
    name = "_mta-sts.example.com"
    lab.zone.set("example.com", "A", ["192.0.2.1"])
    if records:
        lab.zone.set(name, "TXT", records)
    d = await discover(lab.resolver(), "example.com")
    assert d.status is status, d.reason
    assert (d.record.id if d.record else None) == rid


async def test_txt_cname_followed_and_servfail(lab: StsLab) -> None:
    lab.zone.set("_mta-sts.example.com", "CNAME", ["_mta-sts.provider.example"])
    lab.zone.set("_mta-sts.provider.example", "TXT", ["v=STSv1; id=viacname"])
    d = await discover(lab.resolver(), "example.com")
    assert d.record is not None and d.record.id == "viacname"
    lab.zone.fail("_mta-sts.example.com", "SERVFAIL")
    d = await discover(lab.resolver(), "example.com")
    assert d.status is DiscoveryStatus.ERROR


# ---------------------------------------------------------------- served vectors


def served_vectors() -> list[dict[str, Any]]:
    return [e for e in yaml.safe_load((VECTORS / "policies.yml").read_text()) if "http" in e]


@pytest.mark.parametrize("entry", served_vectors(), ids=lambda e: e["name"])
async def test_served_policy_vectors(lab: StsLab, entry: dict[str, Any]) -> None:
    """Every policies.yml entry with HTTP conditions, served for real."""
    http = entry["http"]
    body = entry["policy_text"].encode()
    if "append" in entry:
        body += entry["append"]["byte"].encode() * entry["append"]["count"]
    headers = []
    if "content_length" in http:
        headers.append(("Content-Length", str(http["content_length"])))
    answer = Answer(
        http.get("status", 200),
        body,
        http.get("content_type", "text/plain"),
        headers=headers,
        chunked=http.get("transfer") == "chunked",
    )
    lab.publish("vec.example", None, answer=answer)
    http_client = SafeHttpClient(lab.resolver(), ca_file=lab.ca_file, allow_private=True)
    own = {"chasquid-served-domain.com": False}  # indented fields: rejected (see policy tests)
    expected = own.get(entry["name"], entry["valid"])
    try:
        pol = await fetch_policy(http_client, "vec.example", port=lab.https.port)
    except PolicyFetchError:
        assert not expected
        return
    assert expected
    assert pol.mode == StsMode(entry["expected"]["mode"])
    assert lab.https.seen[-1].host == "mta-sts.vec.example"
