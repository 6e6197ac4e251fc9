"""Builds, from Config, the authentication stages intake runs (relay.stages) and the SRS
routing hooks.

The verdict stage (``VerdictStage``: SPF, DKIM, DMARC, ARC validation → one
Authentication-Results header; reject/quarantine actions; ``Authenticator`` when
``[auth]`` is on, ARC validation alone when only ``[arc]`` is) and the seal stage
(``SealStage``: one ARC set over the result, at intake; the sealed message is what the
queue stores and sends).

Where the crypto runs (``crypto_executor``), never on the event loop unless asked: with
one relay process (``[server] workers = 1``) in a process pool of ``[auth]
crypto_workers`` processes, so a second core does the signing and the Python around it;
with several relay processes in a pool of ``[auth] crypto_threads`` threads in each.
OpenSSL (``cryptography``) releases the GIL while it signs, verifies and hashes, so the
RSA work runs beside the loop at the cost of a thread hand-off, where a process pool
would add pickling and pipes for no gain (the worker processes already use every core;
docs/benchmark.md). ``0`` for the setting in use means inline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from relay import metrics
from relay.config import Config
from relay.dns import Resolver
from relay.errors import ConfigError
from relay.intake import Transform
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope, SmtpReply
from relay.stages import AcceptAll, Judged, NoSeal, SealStage, VerdictStage
from relay.store import Store

if TYPE_CHECKING:
    from relay.auth.arc import SealerSpec
    from relay.auth.replay import ReplayGuard
    from relay.pgstore import PgStore

log = structlog.get_logger("relay.auth")

LocalCheck = Callable[[str], SmtpReply | None]


@dataclass
class AuthWiring:
    """What the auth wiring hands to ``relay.app``: the verdict and seal stages, the SRS
    hooks (for the route stage and the DSN address), the SRS RCPT check and the crypto
    executor (closed with the relay)."""

    verdict: VerdictStage
    sealer: SealStage
    srs_forward: Callable[[str], str] | None = None
    srs_reverse: Callable[[str], str | None] | None = None
    local_check: LocalCheck | None = None
    executor: Executor | None = None

    @property
    def transforms(self) -> list[Transform]:
        """The verdict and the seal as one call over bytes, the same stage objects
        intake runs (for bench/auth_profile.py); [] when both are off."""
        if isinstance(self.verdict, AcceptAll) and isinstance(self.sealer, NoSeal):
            return []
        return [self.process]

    async def process(self, conn: ConnInfo, env: Envelope, data: bytes) -> bytes:
        judged = await self.verdict.judge(conn, env, ParsedMessage.parse(data))
        return (await self.sealer.seal(judged)).raw

    async def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


class ArcChainVerdict:
    """The verdict stage with ``[auth]`` off and ``[arc]`` on: no decision, the chain
    validated only for the cv the seal states (RFC 8617 section 5.1.1)."""

    def __init__(self, resolver: Resolver, executor: Executor | None, authserv_id: str) -> None:
        self.resolver = resolver
        self.executor = executor
        self.ar_value = f"{authserv_id}; none"

    async def judge(self, conn: ConnInfo, env: Envelope, message: ParsedMessage) -> Judged:
        from relay.auth.arc import validate_arc

        chain = await validate_arc(self.resolver, message, executor=self.executor)
        metrics.arc_verdict(chain.cv)
        return Judged(message, self.ar_value, chain)


class ArcSeal:
    """The seal stage: one ARC set (RFC 8617 section 5.1) with our key, in the crypto
    executor; only the new fields are parsed into the sealed message."""

    def __init__(self, spec: SealerSpec, executor: Executor | None) -> None:
        self.spec = spec
        self.executor = executor

    async def seal(self, judged: Judged) -> ParsedMessage:
        from relay.auth.arc import seal_async

        return await seal_async(
            self.spec, judged.message, judged.ar_value, judged.chain, executor=self.executor
        )


def crypto_pool_size(config: Config) -> int:
    """Processes of the crypto pool: with one relay worker only; 0 = none."""
    if config.server.workers > 1:
        return 0
    return max(config.auth.crypto_workers, 0)


def crypto_thread_count(config: Config) -> int:
    """Crypto threads in each relay worker: with several relay workers only; 0 = none."""
    if config.server.workers > 1:
        return max(config.auth.crypto_threads, 0)
    return 0


def crypto_executor(config: Config) -> Executor | None:
    """Where DKIM/ARC crypto runs (see the module docstring); None = inline."""
    processes = crypto_pool_size(config)
    if processes > 0:
        from relay.auth.offload import make_crypto_pool

        return make_crypto_pool(processes)
    threads = crypto_thread_count(config)
    if threads > 0:
        return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="relay-crypto")
    return None


def build_auth(
    config: Config, resolver: Resolver, store: Store | PgStore | None = None
) -> AuthWiring:
    """The auth stages; with a store, ARC overrides are counted there (relay.auth.replay,
    or relay.auth.replay_pg on the shared PostgreSQL store)."""
    executor = crypto_executor(config) if config.auth.enabled or config.arc.enabled else None
    spec = _sealer_spec(config)
    verdict: VerdictStage
    if config.auth.enabled:
        from relay.auth.pipeline import Authenticator

        verdict = Authenticator(
            config, resolver, executor=executor, replay_guard=_replay_guard(config, store)
        )
    elif spec is not None:
        verdict = ArcChainVerdict(resolver, executor, config.authserv_id)
    else:
        verdict = AcceptAll(config.authserv_id)
    sealer: SealStage = ArcSeal(spec, executor) if spec is not None else NoSeal()
    wiring = AuthWiring(verdict, sealer, executor=executor)
    _build_srs(config, wiring)
    return wiring


def _sealer_spec(config: Config) -> SealerSpec | None:
    """The seal's key and names, checked here so a bad key is a config error, not a
    failure per message; None when ``[arc]`` is off."""
    if not config.arc.enabled:
        return None
    from relay.auth.arc import ArcSealer, SealerSpec

    key_path = config.arc.private_key
    if not config.arc.domain or not config.arc.selector:
        raise ConfigError(str(config.path), "arc.domain", "ARC sealing needs domain and selector")
    if key_path is None or not key_path.is_file():
        raise ConfigError(
            str(config.path),
            "arc.private_key",
            f"file not found: {key_path} (create one with `relay keygen`)",
        )
    pem = key_path.read_bytes()
    try:  # load once here
        ArcSealer(config.arc.domain, config.arc.selector, pem, config.authserv_id)
    except Exception as exc:  # noqa: BLE001 - any key problem is a config error
        raise ConfigError(str(config.path), "arc.private_key", str(exc)) from None
    return SealerSpec(config.arc.domain, config.arc.selector, pem, config.authserv_id)


def _replay_guard(config: Config, store: Store | PgStore | None) -> ReplayGuard | None:
    a = config.arc
    if store is None or not a.trusted_sealers:
        return None
    if not a.override_max_recipients and not a.override_per_sealer_hour:
        return None
    from relay.auth.replay import ArcReplayGuard, ReplayLimits

    limits = ReplayLimits(a.override_max_recipients, a.override_window, a.override_per_sealer_hour)
    if not isinstance(store, Store):  # the shared store (migrated by relay.pgschema)
        from relay.auth.replay_pg import PgArcReplayGuard

        return PgArcReplayGuard(store, limits)
    return ArcReplayGuard(store, limits)


def _build_srs(config: Config, wiring: AuthWiring) -> None:
    if not config.srs.enabled:
        return
    if not config.srs.domain or not config.srs.secret:
        raise ConfigError(str(config.path), "srs.secret", "SRS needs domain and secret")
    from relay.srs import SrsError, SrsRewriter

    rewriter = SrsRewriter(
        config.srs.domain, config.srs.secret, max_age_days=config.srs.max_age_days
    )
    srs_domain = config.srs.domain.lower()

    def ours(address: str) -> bool:
        return address.rpartition("@")[2].lower().rstrip(".") == srs_domain and rewriter.is_srs(
            address
        )

    def reverse(address: str) -> str | None:
        if not ours(address):
            return None
        with contextlib.suppress(SrsError):
            return rewriter.reverse(address)
        return None

    def local_check(address: str) -> SmtpReply | None:
        if address.rpartition("@")[2].lower().rstrip(".") != srs_domain:
            return None
        if not rewriter.is_srs(address):
            return None  # not an SRS address: ordinary rules apply
        try:
            rewriter.reverse(address)
        except SrsError as exc:
            return SmtpReply(550, f"5.1.1 Invalid SRS address: {exc}")
        return SmtpReply(250, "2.1.5 OK")

    def forward(address: str) -> str:
        try:
            return rewriter.forward(address)
        except SrsError as exc:
            log.warning("srs_forward_failed", address=address, error=str(exc))
            return address

    wiring.srs_forward = forward
    wiring.srs_reverse = reverse
    wiring.local_check = local_check
