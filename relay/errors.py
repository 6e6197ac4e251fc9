"""Error hierarchy of relay, rooted at RelayError.

    RelayError
    ├── ConfigError                 config file, key and problem
    ├── StartupError                the relay cannot start (store locked, address in use)
    ├── SmtpReplyError              carries an SMTP reply (code, enhanced code, text)
    ├── DnsError
    │   ├── DnsNotFound             NXDOMAIN
    │   ├── DnsNoData               the name exists, no record of that type
    │   └── DnsTempFail             SERVFAIL, timeout, refused: try again later
    │       └── DnsBogus            SERVFAIL because DNSSEC validation failed
    ├── StoreError                  the durable store failed (reply 451/452)
    ├── PolicyError                 an MTA-STS record or policy is invalid
    └── DeliveryError
        ├── TemporaryDeliveryError
        └── PermanentDeliveryError

Client-facing text stays generic; details go to structured log fields.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error relay raises on purpose."""


class ConfigError(RelayError):
    """A configuration problem: names the file, the key and what is wrong."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(f"{path}: {key}: {problem}")


class StartupError(RelayError):
    """The relay (or a command) cannot start: one line for the operator, exit code 2."""


class SmtpReplyError(RelayError):
    """An error that maps onto one SMTP reply."""

    def __init__(self, code: int, enhanced: str, message: str) -> None:
        self.code = code
        self.enhanced = enhanced
        self.message = message
        super().__init__(self.reply)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.message}"

    @property
    def temporary(self) -> bool:
        return self.code // 100 == 4


class DnsError(RelayError):
    """A DNS lookup did not give an answer."""

    def __init__(
        self, name: str, rdtype: str, detail: str = "", *, status: str = "insecure"
    ) -> None:
        self.name = name
        self.rdtype = rdtype
        self.detail = detail
        # DNSSEC status of a negative answer: "secure" is an authenticated denial of
        # existence (RFC 4035 section 5.4); "bogus" only on DnsBogus
        self.status = status
        super().__init__(f"{rdtype} {name}: {self.kind}{': ' + detail if detail else ''}")

    kind = "dns error"


class DnsNotFound(DnsError):
    kind = "NXDOMAIN"


class DnsNoData(DnsError):
    kind = "no data"


class DnsTempFail(DnsError):
    """No answer now; its DNSSEC status is "unknown", never "insecure"."""

    kind = "temporary failure"

    def __init__(
        self, name: str, rdtype: str, detail: str = "", *, status: str = "unknown"
    ) -> None:
        super().__init__(name, rdtype, detail, status=status)


class DnsBogus(DnsTempFail):
    """The validating resolver says the answer failed DNSSEC validation. Temporary for
    everything else (a SERVFAIL), but DANE must not treat it as "insecure"
    (RFC 7672 section 2.1.1)."""

    kind = "DNSSEC bogus"

    def __init__(self, name: str, rdtype: str, detail: str = "") -> None:
        super().__init__(name, rdtype, detail, status="bogus")


class StoreError(RelayError):
    """The durable store could not complete a write or read."""


class PolicyError(RelayError):
    """An MTA-STS TXT record or policy file is invalid; the text names the line."""


class DeliveryError(RelayError):
    """One delivery attempt failed."""

    def __init__(self, message: str, code: int = 0, enhanced: str = "") -> None:
        self.code = code
        self.enhanced = enhanced
        super().__init__(message)


class TemporaryDeliveryError(DeliveryError):
    pass


class PermanentDeliveryError(DeliveryError):
    pass
