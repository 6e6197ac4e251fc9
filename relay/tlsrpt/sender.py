"""Sending TLS-RPT reports (RFC 8460 section 5): the daily loop, https POST with retries,
and the DKIM-signed ``multipart/report`` mail handed to our own queue.

Once per UTC day, after midnight plus a random delay (``[tlsrpt] send_delay_max``), every
earlier day (up to ``CATCH_UP_DAYS`` back) with sessions and no report state yet is
reported: for each policy domain that had sessions, the ``_smtp._tls`` record is looked
up; with none, nothing is sent (state ``no-record``); otherwise the report is built once,
stored with its report-id, and delivered to every rua URI:

- ``https:``: POST of the gzip'd JSON as ``application/tlsrpt+gzip`` (5.3.2) through
  ``SafeHttpClient`` (our resolver, address checks, certificate checked, no redirects);
  any 2xx is success.
- ``mailto:``: a ``multipart/report; report-type="tlsrpt"`` message (5.3) with a text
  part and the ``application/tlsrpt+gzip`` attachment named
  ``submitter!policy-domain!begin!end!unique-id.json.gz``, the ``TLS-Report-Domain`` and
  ``TLS-Report-Submitter`` headers and the RFC's subject, ``TLS-Required: No`` (RFC
  8689, so MTA-STS failures cannot block it, 5.3.1, and the queue does not count its
  delivery in the ledger), ``Auto-Submitted: auto-generated``, DKIM-signed by the
  ``[[dkim.sign]]`` key of the submitter domain or a parent of it (relay.auth.signer;
  ``[tlsrpt] dkim_private_key`` / ``dkim_selector`` is an alias for one; relaxed/relaxed,
  no ``l=``). Without a key it is never sent (RFC 8460 section 3): the delivery fails
  at once and is logged (``tlsrpt_report_unsigned_not_sent``). A signed report is
  handed to ``inject`` (our durable queue) with the null reverse-path ``<>``: a report
  is an automatic notification, so an undeliverable one must never cause a bounce
  (RFC 5321 section 6.1, no loops); its fate is in the queue and the logs.

A failed delivery is retried with back-off (5 minutes doubling to 1 hour) for up to 24
hours after its first try (5.5), then given up with an error log; its state stays in the
store. Delivery is at-least-once: a crash between a successful send and the state write
sends that report again (same report-id and Message-ID, so collectors can drop it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import email.utils
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from relay import metrics
from relay.config import Config
from relay.dns import Resolver
from relay.errors import ConfigError, DnsError
from relay.http import HttpErrorKind, HttpFetchError
from relay.tlsrpt.discovery import TlsRptRecord, discover
from relay.tlsrpt.ledger import (
    Delivery,
    DeliveryStatus,
    ReportRecord,
    ReportState,
    TlsLedger,
    day_start,
    utc_day,
)
from relay.tlsrpt.report import (
    MEDIA_TYPE_GZIP,
    ReportMeta,
    TlsReport,
    attachment_filename,
    build_report,
    gzip_bytes,
    make_report_id,
    parse_report,
    validate_report,
)

if TYPE_CHECKING:
    from relay.auth.signer import OutboundSigner

log = structlog.get_logger("relay.tlsrpt.sender")

Inject = Callable[[str, Sequence[str], bytes], Awaitable[str]]

RETRY_WINDOW = 86400.0  # section 5.5: retry for up to 24 hours
RETRY_FIRST = 300.0
RETRY_MAX = 3600.0
MIN_DELAY = 10.0  # after midnight, so the last outcomes of the day are flushed
SETTLE_POLL = 15.0  # while a day's counts wait for a node, look again this often
CATCH_UP_DAYS = 7  # days missed while the relay was down are still reported
KEEP_DAYS = 14  # ledger rows older than this are pruned
CLI_HOLD = 300.0  # deliveries the send command tries itself are not due elsewhere before
CLAIM_HOLD = 180.0  # a delivery claimed for a try is nobody else's for this long
POST_TIMEOUT = 60.0
MAX_RESPONSE = 64 * 1024
REPORT_MAIL_FROM = ""  # the null reverse-path: reports never bounce
SIGNED_HEADERS = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "tls-report-domain",
    "tls-report-submitter",
    "tls-required",
    "auto-submitted",
)


class HttpPoster(Protocol):
    """What the sender needs of ``relay.http.SafeHttpClient``."""

    async def post(
        self,
        url: str,
        body: bytes,
        content_type: str,
        *,
        max_bytes: int = ...,
        timeout: float | None = ...,
    ) -> Any: ...


class Signer(Protocol):
    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class MailParts:
    """What goes into one report mail."""

    report: TlsReport
    day: str
    submitter: str
    to_addr: str
    from_addr: str
    message_id: str
    date: str


def report_meta(config: Config) -> ReportMeta:
    t = config.tlsrpt
    submitter = (t.submitter or config.server.hostname).rstrip(".").lower()
    return ReportMeta(
        organization=t.organization or submitter,
        contact=t.contact,
        submitter=submitter,
        max_failure_details=t.max_failure_details,
    )


class UnsignedReportError(Exception):
    """A mailto report with no DKIM key for its From domain: never sent (RFC 8460 section
    3: reports sent by mail MUST be DKIM-signed)."""


def no_key_reason(submitter: str) -> str:
    """One line: why mailto reports are not sent (for the log and ``relay tlsrpt``)."""
    return (
        f"no DKIM key for {submitter} ([[dkim.sign]] domain {submitter} or a parent of it, "
        "or [tlsrpt] dkim_private_key): mailto reports are not sent, as RFC 8460 section 3 "
        "requires them signed; https reports are"
    )


@dataclass(frozen=True, slots=True)
class _DomainSigner:
    """The outbound signer (relay.auth.signer) bound to the reports' From domain."""

    outbound: OutboundSigner
    domain: str

    def sign(self, message: bytes) -> bytes:
        return self.outbound.sign(message, self.domain)


def load_signer(config: Config, clock: Callable[[], float] = time.time) -> Signer | None:
    """The DKIM signer of the reports: the ``[[dkim.sign]]`` entry whose domain is the
    submitter's (the From domain of the report mail) or a parent of it (``[tlsrpt]
    dkim_private_key`` is an alias for one such entry, relay.config); None when there is
    none. A bad key raises ConfigError."""
    t = config.tlsrpt
    if t.dkim_private_key is not None and not t.dkim_selector:
        raise ConfigError(str(config.path), "tlsrpt.dkim_selector", "required with a key")
    from relay.auth.signer import OutboundSigner

    outbound = OutboundSigner.from_config(config, SIGNED_HEADERS, clock)
    submitter = report_meta(config).submitter
    if not outbound.covers(submitter):
        return None
    return _DomainSigner(outbound, submitter)


def _b64_lines(data: bytes) -> bytes:
    enc = base64.b64encode(data)
    return b"\r\n".join(enc[i : i + 76] for i in range(0, len(enc), 76))


def build_report_mail(parts: MailParts, gz: bytes, signer: Signer | None = None) -> bytes:
    """The RFC 8460 section 5.3 report message (CRLF line ends), DKIM-signed when a
    signer is given."""
    r = parts.report
    domain = r.policy_domain
    uid = hashlib.sha256(r.report_id.encode()).hexdigest()[:24]
    filename = attachment_filename(parts.submitter, domain, parts.day, uid)
    boundary = "tlsrpt-" + hashlib.sha256((parts.message_id + "b").encode()).hexdigest()[:32]
    text = (
        f"This is an aggregate TLS report (RFC 8460) from {r.organization_name}"
        f" ({parts.submitter}) for {domain}.\r\n"
        f"Period: {r.start_datetime} to {r.end_datetime}\r\n"
        f"Successful sessions: {r.total_successful}\r\n"
        f"Failed sessions: {r.total_failed}\r\n"
        f"Report-ID: {r.report_id}\r\n"
        "The report is attached as gzip'd JSON (application/tlsrpt+gzip).\r\n"
    )
    head = (
        f"From: {parts.from_addr}\r\n"
        f"To: <{parts.to_addr}>\r\n"
        f"Subject: Report Domain: {domain}\r\n"
        f" Submitter: {parts.submitter}\r\n"
        f" Report-ID: <{r.report_id}>\r\n"
        f"Date: {parts.date}\r\n"
        f"Message-ID: {parts.message_id}\r\n"
        f"TLS-Report-Domain: {domain}\r\n"
        f"TLS-Report-Submitter: {parts.submitter}\r\n"
        "TLS-Required: No\r\n"
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type="tlsrpt";\r\n boundary="{boundary}"\r\n'
        "\r\n"
    )
    body = (
        "This is a multipart message in MIME format.\r\n\r\n"
        f"--{boundary}\r\n"
        'Content-Type: text/plain; charset="us-ascii"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        f"{text}\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: {MEDIA_TYPE_GZIP}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment;\r\n filename="{filename}"\r\n\r\n'
    ).encode("ascii")
    body += _b64_lines(gz) + f"\r\n\r\n--{boundary}--\r\n".encode("ascii")
    message = head.encode("ascii") + body
    return signer.sign(message) if signer is not None else message


def _backoff(attempts: int, rng: random.Random) -> float:
    base: float = min(RETRY_FIRST * 2.0 ** max(attempts - 1, 0), RETRY_MAX)
    return base * rng.uniform(0.9, 1.1)


def _shift(day: str, days: int) -> str:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=days)).isoformat()


class TlsRptSender:
    """Builds and delivers the daily reports; see the module docstring."""

    def __init__(
        self,
        config: Config,
        ledger: TlsLedger,
        resolver: Resolver,
        http_client: HttpPoster,
        inject: Inject,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        *,
        signer: Signer | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.resolver = resolver
        self.http = http_client
        self.inject = inject
        self.clock = clock
        self.rng = rng or random.Random()
        self.meta = report_meta(config)
        self.signer = signer if signer is not None else load_signer(config, clock)
        self._delay_day = ""
        self._delay = 0.0
        self._daily_done = ""
        self._wake = asyncio.Event()
        if self.signer is None:
            log.warning("tlsrpt_dkim_no_key", reason=no_key_reason(self.meta.submitter))

    # ---------------------------------------------------------------- the daily loop

    def wake(self) -> None:
        """Make the loop look at the clock and the store again now."""
        self._wake.set()

    def send_time(self, day: str) -> float:
        """When the reports of the days before ``day`` go out: its midnight plus a
        random delay drawn once per day."""
        if self._delay_day != day:
            self._delay_day = day
            self._delay = max(MIN_DELAY, self.rng.uniform(0, self.config.tlsrpt.send_delay_max))
        return day_start(day) + self._delay

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Daily reports and retries until stop is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            now = self.clock()
            today = utc_day(now)
            at = self.send_time(today)
            if now >= at and self._daily_done != today:
                if await self.daily(today, wait_for_nodes=True) is not None:
                    self._daily_done = today
            await self.retry_due()
            wake = day_start(_shift(today, 1)) + MIN_DELAY
            if self._daily_done != today:
                wake = at if now < at else now + SETTLE_POLL
            nxt = await self.ledger.next_due()
            if nxt is not None:
                wake = min(wake, nxt)
            timeout = min(max(wake - self.clock(), 0.5), 60.0)  # never a busy loop
            self._wake.clear()
            stop_wait = asyncio.ensure_future(stop.wait())
            wake_wait = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait(
                    {stop_wait, wake_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for f in (stop_wait, wake_wait):
                    f.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await f

    async def daily(self, today: str, *, wait_for_nodes: bool = False) -> list[ReportRecord] | None:
        """Report every day before today (up to CATCH_UP_DAYS back) not yet reported.
        ``wait_for_nodes``: on a shared store, a day whose counts some node has not
        stored yet (it was counting before the midnight and has not flushed past it:
        the database unreachable from it, say) is left for a later round, at most
        an hour; returns None when a day was left so."""
        with contextlib.suppress(Exception):
            await self.ledger.flush()
        out: list[ReportRecord] = []
        oldest = _shift(today, -CATCH_UP_DAYS)
        waiting = False
        for day in await self.ledger.days(before=today):
            if day < oldest:
                continue
            if wait_for_nodes and not await self.ledger.settled(
                day_start(_shift(day, 1)), self.clock()
            ):
                log.info("tlsrpt_waiting_for_nodes", day=day)
                waiting = True
                continue
            out += await self.prepare_day(day)
        await self.deliver_due()
        try:
            await self.ledger.prune(_shift(today, -KEEP_DAYS))
        except Exception as exc:  # noqa: BLE001 - pruning is housekeeping
            log.warning("tlsrpt_prune_failed", error=str(exc))
        return None if waiting else out

    async def retry_due(self) -> None:
        """Discovery retries and deliveries whose time has come."""
        now = self.clock()
        for rec in await self.ledger.reports():
            if rec.state is ReportState.DISCOVER and rec.next_attempt <= now:
                await self.prepare(rec.day, rec.policy_domain)
        await self.deliver_due()

    # ---------------------------------------------------------------- preparing

    async def prepare_day(
        self, day: str, *, domain: str | None = None, force: bool = False, hold: float = 0.0
    ) -> list[ReportRecord]:
        """Discover and build the reports of day (one domain, or every domain that had
        sessions). ``force``: retry a discovery now even when not due; ``hold``: new
        deliveries are due that many seconds from now."""
        domains = await self.ledger.domains(day)
        if domain is not None:
            domains = [d for d in domains if d == domain.rstrip(".").lower()]
        out = []
        for d in domains:
            rec = await self.prepare(day, d, force=force, hold=hold)
            if rec is not None:
                out.append(rec)
        return out

    async def prepare(
        self, day: str, domain: str, *, force: bool = False, hold: float = 0.0
    ) -> ReportRecord | None:
        """Discovery plus build for one (day, domain); idempotent."""
        now = self.clock()
        rec = await self.ledger.report(day, domain)
        if rec is not None and rec.state is not ReportState.DISCOVER:
            return rec
        if rec is not None and rec.next_attempt > now and not force:
            return rec
        try:
            record = await discover(self.resolver, domain)
        except DnsError as exc:
            first = rec.created if rec is not None else now
            if now - first >= RETRY_WINDOW:
                log.error(
                    "tlsrpt_report_undeliverable",
                    day=day,
                    domain=domain,
                    reason="TLSRPT record lookup kept failing for 24 hours",
                    error=str(exc),
                )
                await self.ledger.set_report_state(day, domain, ReportState.EXPIRED, error=str(exc))
            else:
                attempts = (rec.attempts if rec is not None else 0) + 1
                nxt = now + _backoff(attempts, self.rng)
                log.warning("tlsrpt_discovery_retry", day=day, domain=domain, error=str(exc))
                await self.ledger.set_report_state(
                    day, domain, ReportState.DISCOVER, next_attempt=nxt, error=str(exc)
                )
            return await self.ledger.report(day, domain)
        if record is None:
            log.info("tlsrpt_no_record", day=day, domain=domain)
            await self.ledger.set_report_state(day, domain, ReportState.NO_RECORD)
            return await self.ledger.report(day, domain)
        return await self._build_and_save(day, domain, record, now + hold if hold else 0.0)

    async def _build_and_save(
        self, day: str, domain: str, record: TlsRptRecord, due: float
    ) -> ReportRecord | None:
        rows = await self.ledger.counts(day, domain)
        if not any(r.count > 0 for r in rows):
            return None
        token = f"{self.rng.getrandbits(64):016x}"
        report_id = make_report_id(day, domain, self.meta.submitter, token)
        report = build_report(self.meta, day, domain, rows, report_id)
        problems = validate_report(report.to_dict(), strict=True)
        if problems:  # a bug of ours: log it, still send what we have
            log.error("tlsrpt_report_invalid", day=day, domain=domain, problems=problems)
        saved = await self.ledger.save_report(
            day, domain, report_id, report.to_json(), [str(r) for r in record.rua],
            next_attempt=due,
        )  # fmt: skip
        log.info(
            "tlsrpt_report_built",
            day=day,
            domain=domain,
            report_id=saved.report_id,
            successful=report.total_successful,
            failed=report.total_failed,
            rua=[str(r) for r in record.rua],
        )
        return saved

    async def preview(self, day: str, *, domain: str | None = None) -> list[TlsReport]:
        """The reports of day: the stored ones when built already, else built now (not
        stored, report-id ``preview``). No DNS."""
        out = []
        domains = await self.ledger.domains(day)
        for d in domains:
            if domain is not None and d != domain.rstrip(".").lower():
                continue
            rec = await self.ledger.report(day, d)
            if rec is not None and rec.report_id:
                out.append(parse_report(rec.report_json))
                continue
            rows = await self.ledger.counts(day, d)
            rid = make_report_id(day, d, self.meta.submitter, "preview")
            out.append(build_report(self.meta, day, d, rows, rid))
        return out

    # ---------------------------------------------------------------- delivering

    async def send_day(self, day: str, *, domain: str | None = None) -> list[ReportRecord]:
        """Build and deliver day's reports now (the ``relay tlsrpt send`` command): pending
        deliveries of that day are tried at once, whatever their back-off."""
        with contextlib.suppress(Exception):
            await self.ledger.flush()
        recs = await self.prepare_day(day, domain=domain, force=True, hold=CLI_HOLD)
        for rec in recs:
            for d in rec.deliveries:
                if d.status is DeliveryStatus.PENDING:
                    await self.deliver(d)
        return [r for r in [await self.ledger.report(day, rec.policy_domain) for rec in recs] if r]

    async def deliver_due(self) -> int:
        """Try every delivery whose time has come; returns how many were tried."""
        due = await self.ledger.due_deliveries(self.clock())
        for d in due:
            await self.deliver(d)
        return len(due)

    async def deliver(self, d: Delivery) -> DeliveryStatus:
        """One try of one delivery; records the outcome. The delivery is claimed first:
        on a store several nodes share, the node that gets the claim sends, the others
        skip it (one report per rua URI, not one per node)."""
        claimed = await self.ledger.claim_delivery(d, self.clock() + CLAIM_HOLD)
        if claimed is None:
            log.debug("tlsrpt_delivery_claimed_elsewhere", day=d.day, domain=d.policy_domain)
            return d.status
        d = claimed
        rec = await self.ledger.report(d.day, d.policy_domain)
        if rec is None or not rec.report_id:
            return d.status
        now = self.clock()
        first = d.first_attempt or now
        attempts = d.attempts + 1
        blog = log.bind(
            day=d.day, domain=d.policy_domain, uri=d.uri, report_id=rec.report_id, attempt=attempts
        )
        gz = gzip_bytes(rec.report_json)
        permanent = False
        qid = ""
        try:
            if d.uri.lower().startswith("mailto:"):
                qid = await self._send_mail(rec, d.uri[7:], gz)
                status = DeliveryStatus.QUEUED
            else:
                await self._post(d.uri, gz)
                status = DeliveryStatus.DELIVERED
        except Exception as exc:  # noqa: BLE001 - every failure is retried or logged
            unsigned = isinstance(exc, UnsignedReportError)
            metrics.tlsrpt_report("skipped" if unsigned else "failed", d.uri)
            error = f"{type(exc).__name__}: {exc}"
            permanent = _permanent(exc)
            nxt = now + _backoff(attempts, self.rng)
            if permanent or nxt > first + RETRY_WINDOW:
                blog.error(
                    "tlsrpt_report_undeliverable",
                    error=error,
                    reason="permanent error" if permanent else "retried for 24 hours",
                )
                await self.ledger.update_delivery(
                    d.day, d.policy_domain, d.uri, DeliveryStatus.FAILED,
                    attempts=attempts, first_attempt=first, error=error,
                )  # fmt: skip
                return DeliveryStatus.FAILED
            blog.warning("tlsrpt_delivery_retry", error=error, next_attempt=nxt)
            await self.ledger.update_delivery(
                d.day, d.policy_domain, d.uri, DeliveryStatus.PENDING,
                attempts=attempts, first_attempt=first, next_attempt=nxt, error=error,
            )  # fmt: skip
            self._wake.set()
            return DeliveryStatus.PENDING
        metrics.tlsrpt_report("sent", d.uri)
        blog.info("tlsrpt_report_sent", status=status.value, qid=qid or None)
        await self.ledger.update_delivery(
            d.day, d.policy_domain, d.uri, status,
            attempts=attempts, first_attempt=first, qid=qid,
        )  # fmt: skip
        return status

    async def _post(self, url: str, gz: bytes) -> None:
        await self.http.post(url, gz, MEDIA_TYPE_GZIP, max_bytes=MAX_RESPONSE, timeout=POST_TIMEOUT)

    async def _send_mail(self, rec: ReportRecord, to_addr: str, gz: bytes) -> str:
        if self.signer is None:  # RFC 8460 section 3: never sent unsigned
            log.error(
                "tlsrpt_report_unsigned_not_sent",
                day=rec.day,
                domain=rec.policy_domain,
                report_id=rec.report_id,
                to=to_addr,
                reason=no_key_reason(self.meta.submitter),
            )
            raise UnsignedReportError(no_key_reason(self.meta.submitter))
        report = parse_report(rec.report_json)
        digest = hashlib.sha256(f"{rec.report_id}\0{to_addr}".encode()).hexdigest()[:24]
        parts = MailParts(
            report=report,
            day=rec.day,
            submitter=self.meta.submitter,
            to_addr=to_addr,
            from_addr=f"noreply-smtp-tls-reporting@{self.meta.submitter}",
            message_id=f"<{digest}.tlsrpt@{self.meta.submitter}>",
            date=email.utils.formatdate(self.clock(), usegmt=True),
        )
        message = build_report_mail(parts, gz, self.signer)
        return await self.inject(REPORT_MAIL_FROM, [to_addr], message)


def _permanent(exc: Exception) -> bool:
    """Errors no retry can mend: a bad URL, an address our rules refuse, a mail report
    with no key to sign it."""
    if isinstance(exc, UnsignedReportError):
        return True
    return isinstance(exc, HttpFetchError) and exc.kind in (
        HttpErrorKind.URL,
        HttpErrorKind.REFUSED_ADDRESS,
    )


__all__ = [
    "REPORT_MAIL_FROM",
    "HttpPoster",
    "Inject",
    "MailParts",
    "TlsRptSender",
    "UnsignedReportError",
    "build_report_mail",
    "load_signer",
    "no_key_reason",
    "report_meta",
]
