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
    trusted: bool = False  # the client's address is in [relay] trusted_networks
    auth_user: str = ""  # the user of a successful AUTH (RFC 4954), "" when none

    @property
    def may_relay(self) -> bool:
        """Trusted or authenticated: may send to any domain (Postfix's
        permit_mynetworks, permit_sasl_authenticated)."""
        return self.trusted or bool(self.auth_user)


@dataclass(frozen=True, slots=True)
class MailDsn:
    """MAIL's DSN parameters (RFC 3461 4.3, 4.4): RET (FULL or HDRS, "" when not given)
    and ENVID (decoded, "" when not given)."""

    ret: str = ""
    envid: str = ""


@dataclass(frozen=True, slots=True)
class RcptDsn:
    """RCPT's DSN parameters (RFC 3461 4.1, 4.2). ``notify``: () when not given,
    ("NEVER",) or a subset of SUCCESS, FAILURE, DELAY in that order. ``orcpt``:
    "addr-type;address" decoded, "" when not given."""

    notify: tuple[str, ...] = ()
    orcpt: str = ""


@dataclass(frozen=True, slots=True)
class Envelope:
    """SMTP envelope of one accepted transaction."""

    mail_from: str  # "" is the null reverse-path
    rcpt_tos: tuple[str, ...]
    smtputf8: bool = False
    body_8bit: bool = False
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS over TLS (RFC 8689 section 4.1)
    dsn: MailDsn = MailDsn()
    rcpt_dsn: tuple[RcptDsn, ...] = ()  # per rcpt_tos entry (() when none was given)


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
    next_hop_dsn: bool = False  # the next hop offered DSN and got the parameters


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """Outcome of one delivery job (one destination domain, several recipients)."""

    domain: str
    recipients: tuple[RecipientResult, ...]
    tls_outcomes: tuple[TlsOutcome, ...] = field(default=())
    mx_host: str = ""
    tls_version: str | None = None
    # the transport policy the last attempt ran under: "dane" (RFC 7672), "sts" (RFC 8461)
    # or "none" (opportunistic)
    tls_policy: str = ""


class StsMode(enum.StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """What the next hop of one recipient domain must prove (from MTA-STS; DANE later).

    ``mode`` None means no policy (opportunistic TLS). ``fetch_error`` is set when
    discovery found a policy id but no usable policy could be had (RFC 8460
    sts-policy-fetch-error / sts-policy-invalid / sts-webpki-invalid); delivery is then
    opportunistic and the failure is reported.
    """

    domain: str
    mode: StsMode | None = None
    mx_patterns: tuple[str, ...] = ()
    max_age: int = 0
    policy_id: str = ""
    policy_strings: tuple[str, ...] = ()  # the policy file's lines, for TLS-RPT
    fetch_error: TlsResultType | None = None
    fetch_error_reason: str = ""

    @property
    def enforce(self) -> bool:
        return self.mode is StsMode.ENFORCE

    @property
    def policy_type(self) -> PolicyType:
        return PolicyType.STS if self.mode is not None else PolicyType.NO_POLICY_FOUND


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """One destination domain's share of one queued message."""

    qid: QueueId
    domain: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str = ""
    tls_required: bool = True  # False for mail carrying "TLS-Required: no" (RFC 8689)
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS was given (RFC 8689 section 4)
    record_tls: bool = True  # False: outcomes are not recorded in the TLS-RPT ledger
    dsn: MailDsn = MailDsn()  # RET and ENVID, passed on to a next hop that offers DSN
    rcpt_dsn: tuple[RcptDsn, ...] = ()  # NOTIFY and ORCPT per recipient (() when none)

    def rcpt_dsn_map(self) -> dict[str, RcptDsn]:
        return dict(zip(self.recipients, self.rcpt_dsn, strict=True)) if self.rcpt_dsn else {}
