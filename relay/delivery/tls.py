"""Outbound TLS: the SSL contexts of the SMTP client and the classification of TLS
failures into RFC 8460 section 4.3 result types.

Two contexts (built once per courier):
- ``verifying`` (MTA-STS, RFC 8461 section 5 and 7): CERT_REQUIRED, host name checked
  against the MX name (``server_hostname`` = MX name, also the SNI, section 7.1), TLS 1.2
  or newer (section 7.2), trust = the system's roots plus ``[delivery] ca_file``;
- ``opportunistic`` (RFC 3207 / RFC 7435): no verification, any protocol version the
  library still speaks -- better than clear text, which is the only alternative.

``classify_tls_error`` maps a failed handshake to (result type, reason):
hostname mismatch -> certificate-host-mismatch; expired -> certificate-expired; unknown
or self-signed issuer -> certificate-not-trusted; anything else (protocol version,
handshake failure, connection reset during the handshake) -> validation-failure.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from relay.model import TlsResultType

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h)
X509_EXPIRED = 10
X509_NOT_YET_VALID = 9
X509_HOSTNAME_MISMATCH = 62
X509_IP_MISMATCH = 64
_NOT_TRUSTED = {
    2,  # unable to get issuer certificate
    18,  # depth zero self-signed
    19,  # self-signed certificate in chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
    24,  # invalid CA certificate
    27,  # certificate not trusted
    28,  # certificate rejected
}

STARTTLS_MISSING_REASON = "STARTTLS not offered"
_ENCODING_DER = 2  # _ssl.ENCODING_DER: Certificate.public_bytes format
MX_NOT_IN_POLICY = "mx-host-not-in-policy"


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What a STARTTLS handshake gave."""

    version: str
    cipher: str
    verified: bool  # the certificate was verified for the MX name
    # the peer's certificate chain (DER, leaf first) as sent, for DANE (RFC 7672 3)
    peer_chain: tuple[bytes, ...] = ()


class TlsContexts:
    """The client's SSL contexts: ``verifying`` (MTA-STS) and ``opportunistic``."""

    def __init__(self, ca_file: Path | None = None) -> None:
        self.verifying = verifying_context(ca_file)
        self.opportunistic = opportunistic_context()
        self.dane = dane_context()


def verifying_context(ca_file: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # system roots
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8461 section 7.2
    return ctx


def opportunistic_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def classify_tls_error(exc: BaseException) -> tuple[TlsResultType, str]:
    """RFC 8460 result type and a short reason for a failed TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        message = exc.verify_message or str(exc)
        if code in (X509_HOSTNAME_MISMATCH, X509_IP_MISMATCH):
            return TlsResultType.CERTIFICATE_HOST_MISMATCH, message
        if code == X509_EXPIRED:
            return TlsResultType.CERTIFICATE_EXPIRED, message
        if code in _NOT_TRUSTED:
            return TlsResultType.CERTIFICATE_NOT_TRUSTED, message
        return TlsResultType.VALIDATION_FAILURE, f"certificate verify error {code}: {message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        return TlsResultType.VALIDATION_FAILURE, f"TLS handshake failed: {reason}"
    if isinstance(exc, ConnectionError) and not str(exc):
        return TlsResultType.VALIDATION_FAILURE, "connection reset during the TLS handshake"
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if cause is not exc:
        return classify_tls_error(cause)
    text = str(exc) or type(exc).__name__
    return TlsResultType.VALIDATION_FAILURE, f"TLS handshake failed: {text}"


def dane_context() -> ssl.SSLContext:
    """DANE (RFC 7672 section 3): no PKIX verification by OpenSSL (the chain is matched
    against the TLSA records afterwards), TLS 1.2 or newer."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[bytes, ...]:
    """The certificates the server sent (DER, leaf first), whatever the verification
    mode: ``get_unverified_chain`` (public from Python 3.13, on ``_sslobj`` before)."""
    if ssl_object is None:
        return ()
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    chain = getter() if getter is not None else None
    if not chain:
        leaf = ssl_object.getpeercert(binary_form=True)
        return (leaf,) if leaf else ()
    out = []
    for c in chain:
        out.append(c if isinstance(c, bytes) else bytes(c.public_bytes(_ENCODING_DER)))
    return tuple(out)


def tls_info(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, verified: bool) -> TlsInfo | None:
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return TlsInfo(
        version=ssl_object.version() or "",
        cipher=cipher[0] if cipher else "",
        verified=verified,
        peer_chain=peer_chain(ssl_object),
    )
