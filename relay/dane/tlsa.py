"""TLSA matching for SMTP (RFC 7672 section 3, RFC 6698 section 2.1, RFC 7671): pure
functions over DER certificates, since Python's ssl has no DANE API.

- Usable records (RFC 7672 section 3.1): DANE-TA(2) and DANE-EE(3), selector Cert(0) or
  SPKI(1), matching Full(0), SHA2-256(1), SHA2-512(2). PKIX-TA(0) and PKIX-EE(1) are
  unusable for SMTP (section 3.1.3), as is any unknown parameter (RFC 6698 section 4.1).
- DANE-EE: the leaf alone matches; no name check, no expiry check, no chain
  (RFC 7672 section 3.1.1, RFC 7671 section 5.1).
- DANE-TA: some certificate of the peer's chain above the leaf (or a public key that
  signed the top of the chain, for "2 1 0") matches; every certificate from the leaf up
  to it is issued by the next (signature and issuer name) and within its validity; the
  leaf carries one of the reference names: the MX host name and the TLSA base name
  after CNAME expansion (RFC 7672 section 3.2.2, RFC 7671 section 7), with a wildcard
  only as the whole left-most label (RFC 6125 section 6.4.3).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from relay.dns import TlsaRecord

DANE_TA = 2
DANE_EE = 3


def usable(rec: TlsaRecord) -> bool:
    """RFC 7672 section 3.1: only DANE-TA(2) and DANE-EE(3) are usable for SMTP; PKIX-TA(0)
    and PKIX-EE(1) are not (3.1.3); unknown selectors or matching types are unusable
    (RFC 6698 section 4.1). A Full(0) match needs data."""
    if rec.usage not in (DANE_TA, DANE_EE) or rec.selector not in (0, 1):
        return False
    if rec.mtype == 0:
        return bool(rec.data)
    return rec.mtype in (1, 2) and len(rec.data) == (32 if rec.mtype == 1 else 64)


def selected(cert: x509.Certificate, selector: int) -> bytes:
    """RFC 6698 section 2.1.2: 0 = the whole certificate (DER), 1 = SubjectPublicKeyInfo."""
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def digest(data: bytes, mtype: int) -> bytes:
    """RFC 6698 section 2.1.3: 0 = exact, 1 = SHA2-256, 2 = SHA2-512."""
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_matches(rec: TlsaRecord, cert: x509.Certificate) -> bool:
    return digest(selected(cert, rec.selector), rec.mtype) == rec.data


@dataclass(frozen=True, slots=True)
class DaneMatch:
    """The outcome of matching a peer chain against a TLSA RRset."""

    matched: bool
    record: TlsaRecord | None  # the record that matched
    depth: int | None  # its certificate's position in the chain (0 = leaf; -1 = a bare key)
    # why not: "" when matched; else an RFC 8460 section 4.3 result type's reason
    reason: str = ""
    result_type: str = ""  # RFC 8460: "" | certificate-host-mismatch | validation-failure...


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
        if names:
            return [n.lower().rstrip(".") for n in names]
    except x509.ExtensionNotFound:
        pass
    # RFC 7672 section 3.2.3: the CN is checked when there are no DNS-ID subjectAltNames
    return [
        str(a.value).lower().rstrip(".")
        for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    ]


def name_matches(presented: str, reference: str) -> bool:
    """RFC 6125 section 6.4: exact (case-blind), or "*" as the whole left-most label
    standing for exactly one label (never for a public suffix-only name)."""
    p, r = presented.lower().rstrip("."), reference.lower().rstrip(".")
    if p == r:
        return True
    if p.startswith("*.") and "*" not in p[2:]:
        head, _, rest = r.partition(".")
        return bool(head) and rest == p[2:] and rest.count(".") >= 1
    return False


def host_matches(cert: x509.Certificate, names: Sequence[str]) -> bool:
    presented = _dns_names(cert)
    return any(name_matches(p, n) for p in presented for n in names if n)


def _within(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _signed_by_key(cert: x509.Certificate, key: object) -> bool:
    """The certificate's signature verifies with key (a bare DANE-TA "2 1 0" key)."""
    sig, tbs, hash_alg = cert.signature, cert.tbs_certificate_bytes, cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and hash_alg is not None:
            key.verify(sig, tbs, padding.PKCS1v15(), hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey) and hash_alg is not None:
            key.verify(sig, tbs, ec.ECDSA(hash_alg))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(sig, tbs)
        else:
            return False
    except Exception:  # noqa: BLE001 - any failure is "not signed by it"
        return False
    return True


def _path_ok(chain: Sequence[x509.Certificate], top: int, now: datetime.datetime) -> str:
    """ "" when chain[0..top] is an issuance path (each issued by the next) whose
    certificates below the trust anchor are within their validity, else why not."""
    for i in range(top):
        child, parent = chain[i], chain[i + 1]
        try:
            child.verify_directly_issued_by(parent)
        except Exception:  # noqa: BLE001 - ValueError, InvalidSignature, TypeError
            return f"certificate {i} is not issued by certificate {i + 1}"
        if not _within(child, now):
            return f"certificate {i} is outside its validity period"
    return ""


def match_chain(
    records: Sequence[TlsaRecord],
    chain_der: Sequence[bytes],
    names: Sequence[str],
    now: datetime.datetime | None = None,
) -> DaneMatch:
    """Match the peer's chain (leaf first, as sent) against the usable TLSA records.

    ``names``: the reference identifiers for DANE-TA (the MX host name and the TLSA base
    name after CNAMEs, RFC 7672 section 3.2.2). DANE-EE ignores them (section 3.1.1)."""
    now = now or datetime.datetime.now(datetime.UTC)
    recs = [r for r in records if usable(r)]
    if not chain_der:
        return DaneMatch(False, None, None, "no certificate", "validation-failure")
    try:
        chain = [x509.load_der_x509_certificate(d) for d in chain_der]
    except ValueError as exc:
        return DaneMatch(False, None, None, f"bad certificate: {exc}", "validation-failure")
    leaf = chain[0]
    # RFC 7672 section 3.1.1: DANE-EE, the leaf only; no name, expiry or chain check
    for rec in recs:
        if rec.usage == DANE_EE and record_matches(rec, leaf):
            return DaneMatch(True, rec, 0)
    ta_reason = ""
    # RFC 7672 section 3.1.2: DANE-TA, a certificate the server sent above the leaf
    for rec in (r for r in recs if r.usage == DANE_TA):
        for depth in range(1, len(chain)):
            if not record_matches(rec, chain[depth]):
                continue
            why = _path_ok(chain, depth, now)
            if why:
                ta_reason = why
                continue
            if not host_matches(leaf, names):  # RFC 7672 section 3.2.2
                return DaneMatch(
                    False, rec, depth,
                    f"the certificate names none of {', '.join(n for n in names if n)}",
                    "certificate-host-mismatch",
                )  # fmt: skip
            return DaneMatch(True, rec, depth)
        # "2 1 0": a full public key need not be in the chain; it must sign its top
        if rec.selector == 1 and rec.mtype == 0:
            try:
                key = serialization.load_der_public_key(rec.data)
            except ValueError:
                continue
            top = len(chain) - 1
            if _signed_by_key(chain[top], key):
                why = _path_ok(chain, top, now)
                if why or not _within(chain[top], now):
                    ta_reason = why or f"certificate {top} is outside its validity period"
                    continue
                if not host_matches(leaf, names):
                    return DaneMatch(
                        False, rec, -1, "the certificate names none of the reference names",
                        "certificate-host-mismatch",
                    )  # fmt: skip
                return DaneMatch(True, rec, -1)
    reason = ta_reason or "no TLSA record matches the certificate chain"
    return DaneMatch(False, None, None, reason, "validation-failure")
