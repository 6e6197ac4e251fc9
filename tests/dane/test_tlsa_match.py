"""TLSA matching (relay/dane/tlsa.py) against generated certificate chains: every usage,
selector and matching type (RFC 6698 section 2.1, RFC 7672 section 3)."""

from __future__ import annotations

import datetime
import hashlib
import itertools

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.dane.tlsa import match_chain, name_matches, selected, usable
from relay.dns import TlsaRecord

MX = "mx.dane.example"
NAMES = [MX, MX]  # MX host name, TLSA base name (no CNAME)
NOW = datetime.datetime.now(datetime.UTC)


def _der_chain(leaf: trustme.LeafCert) -> list[bytes]:
    return [
        x509.load_pem_x509_certificate(b.bytes()).public_bytes(serialization.Encoding.DER)
        for b in leaf.cert_chain_pems
    ]


def _cert(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def _ca_der(ca: trustme.CA) -> bytes:
    return _cert_pem_der(ca.cert_pem.bytes())


def _cert_pem_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _rec(usage: int, selector: int, mtype: int, der: bytes) -> TlsaRecord:
    data = selected(_cert(der), selector)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TlsaRecord(usage, selector, mtype, data)


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    root = trustme.CA()
    inter = root.create_child_ca()
    leaf = inter.issue_cert(MX)
    other_root = trustme.CA()
    other_leaf = other_root.issue_cert(MX)
    return {
        "root": root, "inter": inter, "chain": _der_chain(leaf) + [_ca_der(root)],
        "other_chain": _der_chain(other_leaf) + [_ca_der(other_root)],
    }  # fmt: skip


COMBOS = list(itertools.product((0, 1), (0, 1, 2)))


@pytest.mark.parametrize(("selector", "mtype"), COMBOS)
def test_dane_ee_matches_the_leaf(pki: dict[str, object], selector: int, mtype: int) -> None:
    chain = pki["chain"]
    assert isinstance(chain, list)
    rec = _rec(3, selector, mtype, chain[0])
    got = match_chain([rec], chain, NAMES, NOW)
    assert (got.matched, got.depth, got.record) == (True, 0, rec)
    other = pki["other_chain"]
    assert isinstance(other, list)
    miss = match_chain([rec], other, NAMES, NOW)
    assert not miss.matched and miss.result_type == "validation-failure"


@pytest.mark.parametrize(("selector", "mtype"), COMBOS)
@pytest.mark.parametrize("depth", [1, 2])  # the intermediate, or the root the server sent
def test_dane_ta_matches_a_chain_certificate(
    pki: dict[str, object], selector: int, mtype: int, depth: int
) -> None:
    chain = pki["chain"]
    assert isinstance(chain, list)
    rec = _rec(2, selector, mtype, chain[depth])
    got = match_chain([rec], chain, NAMES, NOW)
    assert (got.matched, got.depth) == (True, depth)
    other = pki["other_chain"]
    assert isinstance(other, list)
    assert not match_chain([rec], other, NAMES, NOW).matched


@pytest.mark.parametrize(
    ("usage", "selector", "mtype"), list(itertools.product((0, 1), (0, 1), (0, 1, 2)))
)
def test_pkix_usages_are_unusable_for_smtp(
    pki: dict[str, object], usage: int, selector: int, mtype: int
) -> None:
    """RFC 7672 section 3.1.3: PKIX-TA(0) and PKIX-EE(1) are not used, even when the data
    would match."""
    chain = pki["chain"]
    assert isinstance(chain, list)
    rec = _rec(usage, selector, mtype, chain[0 if usage == 1 else 1])
    assert not usable(rec)
    assert not match_chain([rec], chain, NAMES, NOW).matched


def test_unknown_parameters_and_bad_digest_lengths_are_unusable() -> None:
    assert not usable(TlsaRecord(3, 2, 1, b"\0" * 32))
    assert not usable(TlsaRecord(3, 1, 3, b"\0" * 32))
    assert not usable(TlsaRecord(4, 1, 1, b"\0" * 32))
    assert not usable(TlsaRecord(3, 1, 1, b"\0" * 31))
    assert not usable(TlsaRecord(3, 1, 2, b"\0" * 32))
    assert not usable(TlsaRecord(3, 0, 0, b""))
    assert usable(TlsaRecord(3, 1, 1, b"\0" * 32)) and usable(TlsaRecord(2, 0, 2, b"\0" * 64))


def test_dane_ee_checks_neither_name_nor_expiry() -> None:
    """RFC 7672 section 3.1.1: with DANE-EE the leaf's names and dates do not matter."""
    ca = trustme.CA()
    past = NOW - datetime.timedelta(days=30)
    leaf = ca.issue_cert(
        "unrelated.example", not_before=past, not_after=NOW - datetime.timedelta(days=1)
    )
    chain = _der_chain(leaf)
    got = match_chain([_rec(3, 1, 1, chain[0])], chain, NAMES, NOW)
    assert got.matched


def test_dane_ta_checks_the_name_against_mx_host_and_tlsa_base() -> None:
    ca = trustme.CA()
    chain = _der_chain(ca.issue_cert("mx.other.example")) + [_ca_der(ca)]
    rec = _rec(2, 1, 1, chain[-1])
    got = match_chain([rec], chain, NAMES, NOW)
    assert not got.matched and got.result_type == "certificate-host-mismatch"
    # RFC 7672 section 3.2.2: the TLSA base name after CNAME expansion is also accepted
    assert match_chain([rec], chain, [MX, "mx.other.example"], NOW).matched
    wild = _der_chain(ca.issue_cert("*.dane.example")) + [_ca_der(ca)]
    assert match_chain([rec], wild, NAMES, NOW).matched


def test_dane_ta_rejects_an_expired_leaf() -> None:
    ca = trustme.CA()
    past = NOW - datetime.timedelta(days=30)
    leaf = ca.issue_cert(MX, not_before=past, not_after=NOW - datetime.timedelta(days=1))
    chain = _der_chain(leaf) + [_ca_der(ca)]
    got = match_chain([_rec(2, 0, 1, chain[-1])], chain, NAMES, NOW)
    assert not got.matched and "validity" in got.reason


def test_dane_ta_cert_appended_to_a_forged_leaf_does_not_match(pki: dict[str, object]) -> None:
    """An attacker can send the real TA certificate after its own leaf: the leaf must be
    issued by it (signature), not merely followed by it."""
    chain = pki["chain"]
    other = pki["other_chain"]
    assert isinstance(chain, list) and isinstance(other, list)
    forged = [other[0], chain[1], chain[2]]
    got = match_chain([_rec(2, 0, 1, chain[1])], forged, NAMES, NOW)
    assert not got.matched and "not issued" in got.reason


def test_dane_ta_bare_public_key_not_in_the_chain(pki: dict[str, object]) -> None:
    """ "2 1 0": the full key need not be sent; it must have signed the top certificate."""
    chain = pki["chain"]
    assert isinstance(chain, list)
    without_root = chain[:2]
    rec = _rec(2, 1, 0, chain[2])
    got = match_chain([rec], without_root, NAMES, NOW)
    assert (got.matched, got.depth) == (True, -1)
    other = pki["other_chain"]
    assert isinstance(other, list)
    assert not match_chain([rec], other[:2], NAMES, NOW).matched


def test_one_matching_record_among_several_is_enough(pki: dict[str, object]) -> None:
    chain = pki["chain"]
    assert isinstance(chain, list)
    recs = [
        TlsaRecord(3, 1, 1, b"\1" * 32),
        TlsaRecord(1, 1, 1, b"\2" * 32),
        _rec(3, 0, 2, chain[0]),
    ]
    assert match_chain(recs, chain, NAMES, NOW).matched
    assert not match_chain(recs[:2], chain, NAMES, NOW).matched
    assert not match_chain(recs, [], NAMES, NOW).matched


@pytest.mark.parametrize(
    ("presented", "reference", "ok"),
    [
        ("mx.example.com", "MX.Example.COM.", True),
        ("*.example.com", "mx.example.com", True),
        ("*.example.com", "a.mx.example.com", False),
        ("*.example.com", "example.com", False),
        ("*.com", "example.com", False),
        ("m*.example.com", "mx.example.com", False),
    ],
)
def test_name_matching(presented: str, reference: str, ok: bool) -> None:
    assert name_matches(presented, reference) is ok
