"""Core value types passed between stages: small frozen dataclasses and enums."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

QueueId = str


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """What the inbound session knows about the client."""

    peer_ip: str
    peer_port: int
    helo: str = ""
    local_ip: str = ""
    local_port: int = 0
    tls_version: str | None = None
    tls_cipher: str | None = None
    trusted: bool = False


@dataclass(frozen=True, slots=True)
class Envelope:
    """SMTP envelope of one accepted transaction."""

    mail_from: str  # "" is the null reverse-path
    rcpt_tos: tuple[str, ...]
    smtputf8: bool = False
    body_8bit: bool = False


class RecipientState(enum.StrEnum):
    QUEUED = "queued"
    INFLIGHT = "inflight"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"


class TlsResultType(enum.StrEnum):
    """RFC 8460 section 4.3 result types."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


class PolicyType(enum.StrEnum):
    """RFC 8460 section 4.3 policy types."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY_FOUND = "no-policy-found"


@dataclass(frozen=True, slots=True)
class TlsOutcome:
    """The one final TLS result of one connection attempt to one MX (input of TLS-RPT).

    ``result_type`` None means a successful TLS session.
    """

    policy_domain: str
    policy_type: PolicyType
    mx_host: str
    receiving_ip: str = ""
    result_type: TlsResultType | None = None
    failure_reason: str = ""
    policy_strings: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()
    sending_mta_ip: str = ""
    enforced: bool = False  # True when the failure stopped delivery (enforce mode)
    day: str = ""  # UTC day YYYY-MM-DD; filled by the recorder when empty

    @property
    def success(self) -> bool:
        return self.result_type is None


@dataclass(frozen=True, slots=True)
class SmtpReply:
    code: int
    message: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.message}"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """Outcome of one recipient in one delivery attempt."""

    address: str
    state: RecipientState  # DELIVERED, DEFERRED or FAILED
    reply: str
    enhanced: str = ""
    remote_host: str = ""


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """Outcome of one delivery job (one destination domain, several recipients)."""

    domain: str
    recipients: tuple[RecipientResult, ...]
    tls_outcomes: tuple[TlsOutcome, ...] = field(default=())
    mx_host: str = ""
    tls_version: str | None = None
