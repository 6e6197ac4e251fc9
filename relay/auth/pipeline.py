"""The authentication verdict of one message: checks, DMARC, the A-R header, the action.

``Authenticator.evaluate`` first removes incoming Authentication-Results fields that claim
our authserv-id (RFC 8601 section 5), then runs SPF (client IP from ConnInfo.peer_ip,
Envelope.mail_from, ConnInfo.helo), DKIM and ARC validation concurrently, then DMARC on
the merged results, and builds one A-R header (relay.auth.results) prepended to the
message. Checks are injected (defaults: relay.auth.spf/dkim/arc, imported lazily), so
tests hand in fixed results.

Actions (``[auth]`` dmarc_reject, dmarc_quarantine, spf_fail: accept | reject |
quarantine; quarantine = header only, ``X-Relay-Quarantine: <reason>``): the strongest
wins. A DMARC fail under ``p=reject`` is refused with 550 5.7.1 by default, unless the ARC
override applies:

- the chain validates (cv=pass), the latest sealer (i=N, who handed us the message) is
  listed in ``[arc] trusted_sealers``, and the oldest AAR of the unbroken run of trusted
  sealers ending at N says ``dmarc=pass`` (when every sealer is trusted, that is the
  AAR of i=1). An untrusted sealer's claims are never believed: an attacker could seal
  a spoofed message saying dmarc=pass and then pass it through a trusted list.

An override is recorded in the A-R: ``dmarc=fail (p=reject dis=none arc-sealer=<d>)
header.from=... policy.override=trusted_forwarder`` (RFC 7489 Appendix C override type)
and ``AuthResults.dmarc_override`` holds the trusted sealer domain whose AAR was used.

A replayed seal earns no override: with a replay guard (relay.auth.replay) each override
is counted per seal and per sealer, and past ``[arc] override_max_recipients`` /
``override_per_sealer_hour`` the DMARC policy applies as if no chain were there (the
refusal says why).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal, TypeVar

import structlog

from relay import metrics
from relay.auth.arcfields import AAR, aar_dmarc, arc_instance
from relay.auth.dmarc import DmarcEvaluation, check_dmarc
from relay.auth.replay import ReplayGuard, seal_fingerprint
from relay.auth.results import (
    auth_resinfo,
    format_header,
    format_value,
    resinfos,
    strip_ours,
)
from relay.auth.types import (
    ArcCv,
    ArcResult,
    AuthResults,
    DkimResult,
    DmarcResultCode,
    SpfResult,
    SpfResultCode,
)
from relay.config import Config
from relay.dns import Resolver
from relay.errors import SmtpReplyError
from relay.message import Message, ParsedMessage, as_parsed
from relay.model import ConnInfo, Envelope
from relay.stages import Judged

log = structlog.get_logger("relay.auth.pipeline")

T = TypeVar("T")
Action = Literal["accept", "reject", "quarantine"]
SpfCheck = Callable[[str, str, str], Awaitable[SpfResult]]  # (client ip, mail from, helo)
DkimCheck = Callable[[ParsedMessage], Awaitable[tuple[DkimResult, ...]]]
ArcCheck = Callable[[ParsedMessage], Awaitable[ArcResult]]

QUARANTINE_HEADER = "X-Relay-Quarantine"
CHECK_TIMEOUT = 30.0
_RANK = {"accept": 0, "quarantine": 1, "reject": 2}
_DISPOSITION = {"accept": "none", "quarantine": "quarantine", "reject": "reject"}


@dataclass(frozen=True, slots=True)
class Verdict:
    results: AuthResults
    header: str  # "Authentication-Results: ...\r\n", folded ("" when [auth] is disabled)
    parsed: ParsedMessage  # forged A-R removed, our A-R (and a quarantine mark) prepended
    action: Action
    reply: str | None  # "550 5.7.1 ..." when rejected
    reason: str = ""  # why the action is not accept, plain words
    ar_value: str = ""  # the A-R value on one line (authserv-id; resinfos) for the AAR
    dmarc: DmarcEvaluation | None = None  # how DMARC came out (for relay diagnose)
    removed: int = 0  # forged A-R fields removed

    @property
    def message(self) -> bytes:
        return self.parsed.raw


def aar_by_instance(message: Message) -> dict[int, str]:
    """ARC-Authentication-Results values by instance (first of each instance)."""
    out: dict[int, str] = {}
    for f in as_parsed(message).get_all("arc-authentication-results"):
        inst = arc_instance(AAR, f.unfolded())
        if inst is not None:
            out.setdefault(inst, f.value)
    return out


def arc_override(arc: ArcResult | None, message: Message, trusted: tuple[str, ...]) -> str:
    """The trusted sealer whose AAR vouches for dmarc=pass, or "" (see module docstring)."""
    if arc is None or arc.cv is not ArcCv.PASS or not arc.sealers or not trusted:
        return ""
    trusted_set = {t.strip().lower().rstrip(".") for t in trusted}
    sealers = [s.lower().rstrip(".") for s in arc.sealers]
    if sealers[-1] not in trusted_set:
        return ""
    first = len(sealers)
    while first > 1 and sealers[first - 2] in trusted_set:
        first -= 1
    aar = aar_by_instance(message).get(first, "")
    return sealers[first - 1] if aar_dmarc(aar) == "pass" else ""


class Authenticator:
    """Evaluates SPF, DKIM, ARC and DMARC for one message and decides what to do."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        executor: Executor | None = None,
        *,
        spf_check: SpfCheck | None = None,
        dkim_check: DkimCheck | None = None,
        arc_check: ArcCheck | None = None,
        rng: Callable[[], float] = random.random,
        timeout: float = CHECK_TIMEOUT,
        replay_guard: ReplayGuard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.executor = executor
        self.authserv_id = config.authserv_id
        self.rng = rng
        self.timeout = timeout
        self.replay_guard = replay_guard
        self.clock = clock
        self._spf = spf_check or self._default_spf
        self._dkim = dkim_check
        self._arc = arc_check

    # ---- default checks (imported lazily) ----

    async def _default_spf(self, ip: str, mail_from: str, helo: str) -> SpfResult:
        from relay.auth.spf import check_spf

        return await check_spf(self.resolver, ip, mail_from, helo, receiver=self.authserv_id)

    async def _dkim_and_arc(
        self, message: ParsedMessage
    ) -> tuple[tuple[DkimResult, ...], ArcResult]:
        if self._dkim is None and self._arc is None:
            from relay.auth.arc import verify_dkim_and_arc

            return await verify_dkim_and_arc(self.resolver, message, executor=self.executor)
        if self._dkim is None:
            from relay.auth.dkim import verify_dkim

            dkim_task: Awaitable[tuple[DkimResult, ...]] = verify_dkim(
                self.resolver, message, executor=self.executor
            )
        else:
            dkim_task = self._dkim(message)
        if self._arc is None:
            from relay.auth.arc import validate_arc

            arc_task: Awaitable[ArcResult] = validate_arc(
                self.resolver, message, executor=self.executor
            )
        else:
            arc_task = self._arc(message)
        dkim, arc = await asyncio.gather(dkim_task, _arc_or_fail(arc_task))
        return dkim, arc

    async def _checks(
        self, conn: ConnInfo, env: Envelope, message: ParsedMessage
    ) -> tuple[SpfResult, tuple[DkimResult, ...], ArcResult]:
        helo = conn.helo.strip()
        mail_from = env.mail_from
        spf_domain = mail_from.rpartition("@")[2] if mail_from else helo
        spf_identity = "mailfrom" if mail_from else "helo"
        spf_r, both = await asyncio.gather(
            _within(self._spf(conn.peer_ip, mail_from, helo), self.timeout),
            _within(self._dkim_and_arc(message), self.timeout),
            return_exceptions=True,
        )
        if isinstance(spf_r, BaseException):
            if not isinstance(spf_r, Exception):
                raise spf_r
            log.warning("spf_check_error", error=repr(spf_r), client=conn.peer_ip)
            spf_r = SpfResult(
                SpfResultCode.TEMPERROR, spf_domain, spf_identity, f"SPF check failed: {spf_r!r}"
            )
        if isinstance(both, BaseException):
            if not isinstance(both, Exception):
                raise both
            log.warning("dkim_arc_check_error", error=repr(both), client=conn.peer_ip)
            dkim: tuple[DkimResult, ...] = (
                DkimResult("temperror", reason=f"DKIM check failed: {both!r}"),
            )
            arc = ArcResult(ArcCv.FAIL, reason=f"ARC check failed: {both!r}")
        else:
            dkim, arc = both
        return spf_r, dkim, arc

    # ---- the verdict ----

    def _action_for(self, results: AuthResults) -> tuple[Action, str, str | None]:
        cfg = self.config.auth
        action: Action = "accept"
        reason = ""
        reply: str | None = None
        d = results.dmarc
        if d is not None and d.result is DmarcResultCode.FAIL and not results.dmarc_override:
            chosen = {"reject": cfg.dmarc_reject, "quarantine": cfg.dmarc_quarantine}.get(
                d.policy, "accept"
            )
            if chosen != "accept":
                action = _as_action(chosen)
                reason = f"dmarc=fail policy={d.policy} from={d.header_from}"
                reply = (
                    f"550 5.7.1 Message rejected: {d.header_from} publishes a DMARC reject "
                    "policy and this message failed DMARC authentication"
                )
        spf = results.spf
        if spf is not None and spf.result is SpfResultCode.FAIL and cfg.spf_fail != "accept":
            spf_action = _as_action(cfg.spf_fail)
            if _RANK[spf_action] > _RANK[action]:
                action = spf_action
                reason = f"spf=fail domain={spf.domain}"
                reply = f"550 5.7.23 SPF validation failed for {spf.domain}"
        if action != "reject":
            reply = None
        return action, reason, reply

    async def evaluate(self, conn: ConnInfo, env: Envelope, message: Message) -> Verdict:
        """The verdict of one message (bytes from ``relay diagnose`` and tests are parsed
        here; intake hands the value it parsed)."""
        stripped, removed = strip_ours(as_parsed(message), self.authserv_id)
        if removed:
            log.warning("forged_auth_results_removed", count=removed, client=conn.peer_ip)
        if not self.config.auth.enabled:
            empty = AuthResults(None, (), None, None)
            return Verdict(empty, "", stripped, "accept", None, removed=removed)
        if conn.auth_user:
            return self._submitted(conn, stripped, removed)
        spf, dkim, arc = await self._checks(conn, env, stripped)
        dmarc = await check_dmarc(
            self.resolver,
            stripped,
            spf,
            dkim,
            rng=self.rng,
            discovery=self.config.auth.dmarc_discovery,
        )
        override = ""
        replay = ""
        if dmarc.result.result is DmarcResultCode.FAIL:
            override = arc_override(arc, stripped, self.config.arc.trusted_sealers)
            if override and self.replay_guard is not None:
                replay = await self.replay_guard.admit(
                    override,
                    seal_fingerprint(stripped, len(arc.sealers)),
                    len(env.rcpt_tos),
                    self.clock(),
                )
                if replay:
                    log.warning(
                        "arc_override_refused", sealer=override, reason=replay, client=conn.peer_ip
                    )
                    override = ""
        results = AuthResults(spf, dkim, dmarc.result, arc, dmarc_override=override)
        metrics.auth_verdict(results)
        action, reason, reply = self._action_for(results)
        if replay and action != "accept":
            reason = f"{reason} (ARC override refused: {replay})"
            if reply is not None:
                reply = f"{reply} (ARC override refused: {replay})"
        infos = resinfos(
            results,
            mail_from=env.mail_from,
            helo=conn.helo,
            client_ip=conn.peer_ip,
            disposition=_DISPOSITION[action] if dmarc.result.record_policy else "",
        )
        header = format_header(self.authserv_id, infos)
        value = format_value(self.authserv_id, infos)
        extra = b""
        if action == "quarantine":
            extra = f"{QUARANTINE_HEADER}: {reason}\r\n".encode("ascii", "replace")
        out = stripped.prepend(header.encode("ascii") + extra)
        log.info(
            "auth_verdict",
            client=conn.peer_ip,
            spf=str(spf.result),
            dkim=[d.result for d in dkim],
            dmarc=str(dmarc.result.result),
            dmarc_policy=dmarc.result.policy,
            header_from=dmarc.result.header_from,
            arc=str(arc.cv),
            override=override,
            action=action,
        )
        return Verdict(results, header, out, action, reply, reason, value, dmarc, removed)

    def _submitted(self, conn: ConnInfo, message: ParsedMessage, removed: int) -> Verdict:
        """An authenticated submission (AUTH on a submission listener) is not judged by
        SPF/DKIM/DMARC: the client's address says nothing about the sender's domain, and
        its MAIL FROM was already checked against the user's senders (Postfix's
        permit_sasl_authenticated; OpenDMARC and rspamd skip such mail as well). The A-R
        records the AUTH (RFC 8601 section 2.7.4)."""
        infos = [auth_resinfo(conn.auth_user)]
        header = format_header(self.authserv_id, infos)
        out = message.prepend(header.encode("ascii", "replace"))
        log.info("auth_verdict", client=conn.peer_ip, auth_user=conn.auth_user, action="accept")
        empty = AuthResults(None, (), None, None)
        value = format_value(self.authserv_id, infos)
        return Verdict(empty, header, out, "accept", None, "", value, None, removed)

    async def judge(self, conn: ConnInfo, env: Envelope, message: ParsedMessage) -> Judged:
        """The verdict stage (relay.stages.VerdictStage): refused with the verdict's reply
        (SmtpReplyError) on reject, else the message with our A-R for the seal."""
        verdict = await self.evaluate(conn, env, message)
        if verdict.action == "reject":
            log.info(
                "rejected",
                client=conn.peer_ip,
                mail_from=env.mail_from,
                reply=verdict.reply,
                header=verdict.header,
            )
            raise reply_error(verdict.reply or "550 5.7.1 Message rejected by policy")
        chain = verdict.results.arc or ArcResult(ArcCv.NONE)
        d = verdict.results.dmarc
        policy = (d.header_from.lower().rstrip("."), d.record_policy) if d is not None else None
        return Judged(verdict.parsed, verdict.ar_value, chain, policy)


def reply_error(reply: str) -> SmtpReplyError:
    """The SmtpReplyError for a verdict's reply text ("550 5.7.1 ...")."""
    parts = reply.split(" ", 2)
    try:
        code = int(parts[0])
    except ValueError:
        return SmtpReplyError(550, "5.7.1", reply)
    if len(parts) >= 2 and parts[1][:1] in "245" and parts[1].count(".") == 2:
        return SmtpReplyError(code, parts[1], parts[2] if len(parts) > 2 else "")
    return SmtpReplyError(code, f"{code // 100}.7.1", " ".join(parts[1:]))


async def _arc_or_fail(aw: Awaitable[ArcResult]) -> ArcResult:
    """An ARC check's result; its error makes the chain fail (RFC 8617 section 5.2) and
    never reaches the DKIM results gathered beside it."""
    try:
        return await aw
    except Exception as exc:  # noqa: BLE001 - ARC and DKIM verdicts are independent
        log.warning("arc_check_error", error=repr(exc))
        return ArcResult(ArcCv.FAIL, reason=f"ARC check failed: {exc!r}")


async def _within(aw: Awaitable[T], timeout: float) -> T:
    """``asyncio.wait_for(aw, timeout)`` without its extra task (TimeoutError alike)."""
    async with asyncio.timeout(timeout):
        return await aw


def _as_action(value: str) -> Action:
    if value == "reject":
        return "reject"
    if value == "quarantine":
        return "quarantine"
    return "accept"
