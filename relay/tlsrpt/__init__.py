"""SMTP TLS Reporting (RFC 8460): the outcome ledger, report building and parsing,
``_smtp._tls`` discovery, and the daily sender (https POST, DKIM-signed mail).

Delivery hands one ``TlsOutcome`` per connection to ``TlsRptLedger.record``; the
``TlsRptSender`` turns each UTC day's counts into reports.
"""

from relay.tlsrpt.discovery import Rua, RuaScheme, TlsRptRecord, discover, parse_record
from relay.tlsrpt.ledger import DeliveryStatus, ReportState, TlsRptLedger
from relay.tlsrpt.report import (
    TlsReport,
    build_report,
    parse_report,
    validate_report,
)
from relay.tlsrpt.sender import TlsRptSender

__all__ = [
    "DeliveryStatus",
    "ReportState",
    "Rua",
    "RuaScheme",
    "TlsReport",
    "TlsRptLedger",
    "TlsRptRecord",
    "TlsRptSender",
    "build_report",
    "discover",
    "parse_record",
    "parse_report",
    "validate_report",
]
