"""TLS-RPT aggregate reports (RFC 8460 section 4): build them from ledger counts, serialise
them to JSON (and gzip, section 5.3), parse reports written by anyone, and check a report
object field by field against section 4 (``validate_report``).

The RFC defines the format in prose (no official JSON schema). What is checked:

- top level (4.4): ``organization-name`` (string), ``date-range`` with ``start-datetime``
  and ``end-datetime`` (RFC 3339 section 5.6 date-times, start not after end),
  ``contact-info`` (string; strict: an RFC 5322 addr-spec), ``report-id`` (string),
  ``policies`` (array);
- each policy: ``policy`` with ``policy-type`` (strict: ``sts``, ``tlsa`` or
  ``no-policy-found``), ``policy-string`` (array of strings), ``policy-domain``
  (strict: required), ``mx-host`` (a string or an array of strings: the RFC example
  uses a string, other copies of it an array); ``summary`` with the two session counts
  (non-negative integers; strict: both present); ``failure-details`` (array);
- each failure detail: ``result-type`` (strict: a section 4.3 value),
  ``failed-session-count`` (non-negative integer), ``sending-mta-ip`` and
  ``receiving-ip`` (IP addresses), ``receiving-mx-hostname``, ``receiving-mx-helo``,
  ``additional-information``, ``failure-reason-code`` (strings).

Strict mode is what our own reports must meet: additionally one full UTC day
(00:00:00Z to 23:59:59Z, section 4.1), known enumerations, and the failure details not
counting more failures than the summary. Lenient mode accepts what real senders send.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import ipaddress
import json
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from typing import Any

from relay.model import PolicyType, TlsResultType

MEDIA_TYPE_GZIP = "application/tlsrpt+gzip"
MEDIA_TYPE_JSON = "application/tlsrpt+json"
MAX_REPORT_BYTES = 16 * 1024 * 1024  # a gunzipped report larger than this is refused

RESULT_TYPES = frozenset(t.value for t in TlsResultType)
POLICY_TYPES = frozenset(t.value for t in PolicyType)

# RFC 3339 section 5.6 date-time
_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
_ADDR_SPEC_RE = re.compile(r"^[^\s@<>()\[\],;:\"]+@[A-Za-z0-9.-]+\.?$")


class ReportError(ValueError):
    """A report could not be parsed."""


# ---------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class FailureDetail:
    """One ``failure-details`` entry."""

    result_type: str
    failed_session_count: int
    sending_mta_ip: str = ""
    receiving_mx_hostname: str = ""
    receiving_mx_helo: str = ""
    receiving_ip: str = ""
    failure_reason_code: str = ""
    additional_information: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result-type": self.result_type}
        for key, value in (
            ("sending-mta-ip", self.sending_mta_ip),
            ("receiving-mx-hostname", self.receiving_mx_hostname),
            ("receiving-mx-helo", self.receiving_mx_helo),
            ("receiving-ip", self.receiving_ip),
        ):
            if value:
                out[key] = value
        out["failed-session-count"] = self.failed_session_count
        if self.additional_information:
            out["additional-information"] = self.additional_information
        if self.failure_reason_code:
            out["failure-reason-code"] = self.failure_reason_code
        return out


@dataclass(frozen=True, slots=True)
class PolicyReport:
    """One ``policies[]`` entry: the policy applied, its summary and failure details."""

    policy_type: str
    policy_domain: str
    policy_strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()
    successful: int = 0
    failed: int = 0
    failure_details: tuple[FailureDetail, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        policy: dict[str, Any] = {"policy-type": self.policy_type}
        if self.policy_strings:
            policy["policy-string"] = list(self.policy_strings)
        policy["policy-domain"] = self.policy_domain
        if self.mx_hosts:
            policy["mx-host"] = list(self.mx_hosts)
        return {
            "policy": policy,
            "summary": {
                "total-successful-session-count": self.successful,
                "total-failure-session-count": self.failed,
            },
            "failure-details": [d.to_dict() for d in self.failure_details],
        }


@dataclass(frozen=True, slots=True)
class TlsReport:
    """One RFC 8460 report (one policy domain, one date range)."""

    organization_name: str
    start_datetime: str
    end_datetime: str
    contact_info: str
    report_id: str
    policies: tuple[PolicyReport, ...] = ()

    @property
    def policy_domain(self) -> str:
        return self.policies[0].policy_domain if self.policies else ""

    @property
    def total_successful(self) -> int:
        return sum(p.successful for p in self.policies)

    @property
    def total_failed(self) -> int:
        return sum(p.failed for p in self.policies)

    def to_dict(self) -> dict[str, Any]:
        return {
            "organization-name": self.organization_name,
            "date-range": {
                "start-datetime": self.start_datetime,
                "end-datetime": self.end_datetime,
            },
            "contact-info": self.contact_info,
            "report-id": self.report_id,
            "policies": [p.to_dict() for p in self.policies],
        }

    def to_json(self, *, indent: int | None = None) -> bytes:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=True).encode("ascii")

    def to_gzip(self) -> bytes:
        """The gzip'd JSON (section 5.3), with a fixed mtime so equal reports give equal
        bytes."""
        return gzip_bytes(self.to_json())


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


# ---------------------------------------------------------------- building


@dataclass(frozen=True, slots=True)
class CountRow:
    """One aggregated ledger row: ``count`` sessions of one kind on one day.

    ``result_type`` "" means successful sessions (then the MX and IP fields are empty)."""

    day: str
    policy_domain: str
    policy_type: str
    policy_strings: tuple[str, ...]
    mx_patterns: tuple[str, ...]
    mx_host: str
    receiving_ip: str
    sending_mta_ip: str
    result_type: str
    failure_reason: str
    count: int


@dataclass(frozen=True, slots=True)
class ReportMeta:
    """Who sends the report (``[tlsrpt]`` organization, contact, submitter)."""

    organization: str
    contact: str
    submitter: str
    max_failure_details: int = 100


def day_range(day: str) -> tuple[str, str]:
    """The RFC 3339 start and end of UTC day YYYY-MM-DD (section 4.1: a full UTC day)."""
    d = dt.date.fromisoformat(day)
    return f"{d.isoformat()}T00:00:00Z", f"{d.isoformat()}T23:59:59Z"


def day_epochs(day: str) -> tuple[int, int]:
    """Seconds since the epoch of the start and the end (23:59:59) of UTC day."""
    d = dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), tzinfo=dt.UTC)
    start = int(d.timestamp())
    return start, start + 86399


def contact_address(contact: str) -> str:
    """``contact-info`` is an addr-spec (4.4): drop a leading ``mailto:``."""
    c = contact.strip()
    if c.lower().startswith("mailto:"):
        c = c[7:]
    return c


def build_report(
    meta: ReportMeta,
    day: str,
    policy_domain: str,
    rows: Iterable[CountRow],
    report_id: str,
) -> TlsReport:
    """Aggregate one domain's rows of one day into a report.

    One ``policies[]`` entry per distinct applied policy (type, policy strings, MX
    patterns). Summaries are exact; the failure details (most frequent first) are capped
    at ``meta.max_failure_details`` for the whole report, so a report stays small."""
    groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[CountRow]] = {}
    for r in rows:
        if r.policy_domain != policy_domain or r.day != day or r.count <= 0:
            continue
        groups.setdefault((r.policy_type, r.policy_strings, r.mx_patterns), []).append(r)
    if not groups:
        raise ValueError(f"no sessions for {policy_domain} on {day}")

    # every failure detail of the report, most frequent first, then capped
    candidates: list[tuple[int, int, FailureDetail]] = []
    summaries: list[tuple[tuple[str, tuple[str, ...], tuple[str, ...]], int, int]] = []
    for gi, (key, grp) in enumerate(sorted(groups.items())):
        ok = sum(r.count for r in grp if not r.result_type)
        details: dict[tuple[str, str, str, str, str], int] = {}
        for r in grp:
            if r.result_type:
                k = (r.result_type, r.sending_mta_ip, r.mx_host, r.receiving_ip, r.failure_reason)
                details[k] = details.get(k, 0) + r.count
        bad = sum(details.values())
        summaries.append((key, ok, bad))
        for (rt, smta, mx, rip, reason), n in details.items():
            candidates.append(
                (
                    gi,
                    n,
                    FailureDetail(
                        result_type=rt,
                        failed_session_count=n,
                        sending_mta_ip=smta,
                        receiving_mx_hostname=mx,
                        receiving_ip=rip,
                        failure_reason_code=reason,
                    ),
                )
            )
    candidates.sort(key=lambda c: (-c[1], c[0], c[2].result_type, c[2].receiving_mx_hostname))
    kept = candidates[: max(meta.max_failure_details, 0)]
    per_group: dict[int, list[FailureDetail]] = {}
    for gi, _n, d in kept:
        per_group.setdefault(gi, []).append(d)

    policies = []
    for gi, ((ptype, strings, patterns), ok, bad) in enumerate(summaries):
        is_sts = ptype == PolicyType.STS.value
        policies.append(
            PolicyReport(
                policy_type=ptype,
                policy_domain=policy_domain,
                policy_strings=tuple(_one_line(s) for s in strings) if is_sts else (),
                mx_hosts=patterns if is_sts else (),
                successful=ok,
                failed=bad,
                failure_details=tuple(per_group.get(gi, [])),
            )
        )
    start, end = day_range(day)
    return TlsReport(
        organization_name=meta.organization or meta.submitter,
        start_datetime=start,
        end_datetime=end,
        contact_info=contact_address(meta.contact)
        or f"noreply-smtp-tls-reporting@{meta.submitter}",
        report_id=report_id,
        policies=tuple(policies),
    )


def _one_line(text: str) -> str:
    """Section 4.4: line breaks in a policy-string entry are replaced by spaces."""
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def make_report_id(day: str, policy_domain: str, submitter: str, token: str) -> str:
    """``<day>T00:00:00Z_<domain>_<token>@<submitter>``: unique by its random token."""
    return f"{day}T00:00:00Z_{policy_domain}_{token}@{submitter}"


def attachment_filename(
    submitter: str, policy_domain: str, day: str, unique_id: str, *, gz: bool = True
) -> str:
    """RFC 8460 section 5.3: ``submitter!policy-domain!begin!end!unique-id.json.gz``
    (timestamps in seconds since the epoch; unique-id alphanumeric)."""
    begin, end = day_epochs(day)
    uid = re.sub(r"[^A-Za-z0-9]", "", unique_id)
    ext = "json.gz" if gz else "json"
    return f"{submitter}!{policy_domain}!{begin}!{end}!{uid}.{ext}"


# ---------------------------------------------------------------- parsing


def _str(obj: Mapping[str, Any], key: str) -> str:
    v = obj.get(key, "")
    return v if isinstance(v, str) else ""


def _int(obj: Mapping[str, Any], key: str) -> int:
    v = obj.get(key, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _strings(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list):
        return tuple(x for x in v if isinstance(x, str))
    return ()


def parse_report(data: bytes | str | Mapping[str, Any]) -> TlsReport:
    """Parse a report: JSON text or bytes (gzip'd or not) or an already decoded object.

    ``mx-host`` may be a string or an array of strings. Raises ReportError when the
    input is not a JSON object or lacks the structure (``policies`` an array of objects
    with a ``policy`` object). Field values are not judged here: see validate_report."""
    obj: Any
    if isinstance(data, str | bytes | bytearray):
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        if raw[:2] == b"\x1f\x8b":
            raw = gunzip(raw)
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ReportError(f"not JSON: {exc}") from None
        except RecursionError:  # "[[[[..." deeper than the interpreter's stack
            raise ReportError("not JSON: nested too deeply") from None
    else:
        obj = data  # an already decoded object (anything but an object is refused below)
    if not isinstance(obj, Mapping):
        raise ReportError("a report is a JSON object")
    pols = obj.get("policies", [])
    if not isinstance(pols, list):
        raise ReportError("policies must be an array")
    dr = obj.get("date-range", {})
    dr = dr if isinstance(dr, Mapping) else {}
    policies: list[PolicyReport] = []
    for p in pols:
        if not isinstance(p, Mapping) or not isinstance(p.get("policy"), Mapping):
            raise ReportError("each policies[] entry needs a policy object")
        pol = p["policy"]
        summ = p.get("summary", {})
        summ = summ if isinstance(summ, Mapping) else {}
        fds = p.get("failure-details", [])
        details = tuple(
            FailureDetail(
                result_type=_str(d, "result-type"),
                failed_session_count=_int(d, "failed-session-count"),
                sending_mta_ip=_str(d, "sending-mta-ip"),
                receiving_mx_hostname=_str(d, "receiving-mx-hostname"),
                receiving_mx_helo=_str(d, "receiving-mx-helo"),
                receiving_ip=_str(d, "receiving-ip"),
                failure_reason_code=_str(d, "failure-reason-code"),
                additional_information=_str(d, "additional-information"),
            )
            for d in (fds if isinstance(fds, list) else [])
            if isinstance(d, Mapping)
        )
        policies.append(
            PolicyReport(
                policy_type=_str(pol, "policy-type"),
                policy_domain=_str(pol, "policy-domain"),
                policy_strings=_strings(pol.get("policy-string")),
                mx_hosts=_strings(pol.get("mx-host")),
                successful=_int(summ, "total-successful-session-count"),
                failed=_int(summ, "total-failure-session-count"),
                failure_details=details,
            )
        )
    return TlsReport(
        organization_name=_str(obj, "organization-name"),
        start_datetime=_str(dr, "start-datetime"),
        end_datetime=_str(dr, "end-datetime"),
        contact_info=_str(obj, "contact-info"),
        report_id=_str(obj, "report-id"),
        policies=tuple(policies),
    )


def gunzip(raw: bytes, limit: int = MAX_REPORT_BYTES) -> bytes:
    """Decompress a gzip'd report, at most ``limit`` bytes of JSON (a decompression bomb
    is refused, not inflated). Raises ReportError."""
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            while chunk := f.read(65536):
                out += chunk
                if len(out) > limit:
                    raise ReportError(f"gzip'd report larger than {limit} bytes")
    except (OSError, EOFError, zlib.error) as exc:
        raise ReportError(f"bad gzip: {exc}") from None
    return bytes(out)


def report_attachments(message: bytes) -> list[tuple[str, str, bytes]]:
    """The report parts of a TLS-RPT mail (section 5.3): (content type, filename, JSON
    bytes, gunzipped) of every ``application/tlsrpt+gzip`` or ``+json`` part (and the
    ``application/tlsrpt`` some senders write)."""
    msg = message_from_bytes(message)
    out: list[tuple[str, str, bytes]] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype not in (MEDIA_TYPE_GZIP, MEDIA_TYPE_JSON, "application/tlsrpt"):
            continue
        payload = _payload(part)
        if ctype == MEDIA_TYPE_GZIP or payload[:2] == b"\x1f\x8b":
            payload = gunzip(payload)  # raises ReportError
        out.append((ctype, part.get_filename() or "", payload))
    return out


def _payload(part: Message) -> bytes:
    raw = part.get_payload(decode=True)
    return raw if isinstance(raw, bytes) else b""


# ---------------------------------------------------------------- validation


def _parse_datetime(value: str) -> dt.datetime | None:
    m = _DATETIME_RE.match(value)
    if not m:
        return None
    try:
        return dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def validate_report(obj: Any, *, strict: bool = False) -> list[str]:
    """Problems of a decoded report object against RFC 8460 section 4 (empty: valid).

    See the module docstring for what lenient and strict mode check."""
    problems: list[str] = []
    if not isinstance(obj, Mapping):
        return ["report: not a JSON object"]
    for key in ("organization-name", "contact-info", "report-id"):
        v = obj.get(key)
        if not isinstance(v, str) or not v.strip():
            problems.append(f"{key}: missing or not a non-empty string")
    contact = obj.get("contact-info")
    if strict and isinstance(contact, str) and not _ADDR_SPEC_RE.match(contact):
        problems.append(f"contact-info: {contact!r} is not an addr-spec")
    problems += _check_date_range(obj.get("date-range"), strict)
    pols = obj.get("policies")
    if not isinstance(pols, list):
        problems.append("policies: missing or not an array")
        return problems
    if strict and not pols:
        problems.append("policies: empty")
    for i, p in enumerate(pols):
        problems += _check_policy(f"policies[{i}]", p, strict)
    return problems


def _check_date_range(dr: Any, strict: bool) -> list[str]:
    if not isinstance(dr, Mapping):
        return ["date-range: missing or not an object"]
    problems: list[str] = []
    parsed: dict[str, dt.datetime] = {}
    for key in ("start-datetime", "end-datetime"):
        v = dr.get(key)
        when = _parse_datetime(v) if isinstance(v, str) else None
        if when is None:
            problems.append(f"date-range.{key}: {v!r} is not an RFC 3339 date-time")
        else:
            parsed[key] = when
    if len(parsed) == 2:
        start, end = parsed["start-datetime"], parsed["end-datetime"]
        if start > end:
            problems.append("date-range: start-datetime is after end-datetime")
        if strict:
            try:
                s = start.astimezone(dt.UTC)
                e = end.astimezone(dt.UTC)
            except OverflowError:  # 9999-12-31T23:59:59-23:59 has no UTC date
                return [*problems, "date-range: a date-time out of the representable range"]
            if s.time() != dt.time(0, 0) or e.date() != s.date() or e.time() != dt.time(23, 59, 59):
                problems.append("date-range: not one full UTC day (00:00:00Z to 23:59:59Z)")
    return problems


def _check_policy(where: str, p: Any, strict: bool) -> list[str]:
    if not isinstance(p, Mapping):
        return [f"{where}: not an object"]
    problems: list[str] = []
    pol = p.get("policy")
    if not isinstance(pol, Mapping):
        problems.append(f"{where}.policy: missing or not an object")
        pol = {}
    ptype = pol.get("policy-type")
    if not isinstance(ptype, str) or not ptype:
        problems.append(f"{where}.policy.policy-type: missing or not a string")
    elif strict and ptype not in POLICY_TYPES:
        problems.append(f"{where}.policy.policy-type: unknown value {ptype!r}")
    if "policy-string" in pol and not _string_list(pol["policy-string"]):
        problems.append(f"{where}.policy.policy-string: not an array of strings")
    if strict and _string_list(pol.get("policy-string", [])):
        if any("\n" in s or "\r" in s for s in pol.get("policy-string", [])):
            problems.append(f"{where}.policy.policy-string: line breaks must be spaces")
    dom = pol.get("policy-domain")
    if dom is not None and (not isinstance(dom, str) or not dom):
        problems.append(f"{where}.policy.policy-domain: not a non-empty string")
    elif strict and dom is None:
        problems.append(f"{where}.policy.policy-domain: missing")
    elif strict and isinstance(dom, str) and not dom.isascii():
        problems.append(f"{where}.policy.policy-domain: not in A-labels")
    if "mx-host" in pol:
        mx = pol["mx-host"]
        if not (isinstance(mx, str) or _string_list(mx)):
            problems.append(f"{where}.policy.mx-host: not a string or an array of strings")
    summ = p.get("summary")
    total_failed: int | None = None
    if not isinstance(summ, Mapping):
        problems.append(f"{where}.summary: missing or not an object")
    else:
        for key in ("total-successful-session-count", "total-failure-session-count"):
            if key in summ:
                if not _nonneg_int(summ[key]):
                    problems.append(f"{where}.summary.{key}: not a non-negative integer")
                elif key == "total-failure-session-count":
                    total_failed = summ[key]
            elif strict:
                problems.append(f"{where}.summary.{key}: missing")
    fds = p.get("failure-details", [])
    if not isinstance(fds, list):
        problems.append(f"{where}.failure-details: not an array")
        return problems
    counted = 0
    for j, d in enumerate(fds):
        problems += _check_detail(f"{where}.failure-details[{j}]", d, strict)
        if isinstance(d, Mapping) and _nonneg_int(d.get("failed-session-count")):
            counted += d["failed-session-count"]
    if strict and total_failed is not None and counted > total_failed:
        problems.append(
            f"{where}: failure-details count {counted} sessions, the summary {total_failed}"
        )
    return problems


def _string_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _check_detail(where: str, d: Any, strict: bool) -> list[str]:
    if not isinstance(d, Mapping):
        return [f"{where}: not an object"]
    problems: list[str] = []
    rt = d.get("result-type")
    if not isinstance(rt, str) or not rt:
        problems.append(f"{where}.result-type: missing or not a string")
    elif strict and rt not in RESULT_TYPES:
        problems.append(f"{where}.result-type: unknown value {rt!r}")
    if not _nonneg_int(d.get("failed-session-count")):
        problems.append(f"{where}.failed-session-count: missing or not a non-negative integer")
    for key in ("sending-mta-ip", "receiving-ip"):
        if key in d and not (isinstance(d[key], str) and _is_ip(d[key])):
            problems.append(f"{where}.{key}: {d[key]!r} is not an IP address")
    for key in (
        "receiving-mx-hostname",
        "receiving-mx-helo",
        "additional-information",
        "failure-reason-code",
    ):
        if key in d and not isinstance(d[key], str):
            problems.append(f"{where}.{key}: not a string")
    return problems


__all__ = [
    "MEDIA_TYPE_GZIP",
    "MEDIA_TYPE_JSON",
    "CountRow",
    "FailureDetail",
    "PolicyReport",
    "ReportError",
    "ReportMeta",
    "TlsReport",
    "attachment_filename",
    "build_report",
    "contact_address",
    "day_epochs",
    "day_range",
    "gunzip",
    "gzip_bytes",
    "make_report_id",
    "parse_report",
    "report_attachments",
    "validate_report",
]
