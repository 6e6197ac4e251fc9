"""Builds, from Config, the intake transform that authenticates and seals each message,
and the SRS routing hooks.

The transform runs the verdict (SPF, DKIM, DMARC, ARC validation → one
Authentication-Results header; reject/quarantine actions), then seals an ARC set over the
result, once, at intake; the sealed bytes are what the queue stores and sends.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from relay.config import Config
from relay.dns import Resolver
from relay.errors import ConfigError, SmtpReplyError
from relay.intake import Routing, Transform
from relay.model import ConnInfo, Envelope, SmtpReply
from relay.store import Store

if TYPE_CHECKING:
    from relay.auth.replay import ArcReplayGuard

log = structlog.get_logger("relay.auth")

LocalCheck = Callable[[str], SmtpReply | None]


@dataclass
class AuthWiring:
    transforms: list[Transform] = field(default_factory=list)
    routing: Routing = field(default_factory=Routing)
    local_check: LocalCheck | None = None
    executor: Executor | None = None

    async def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


def _reply_error(reply: str) -> SmtpReplyError:
    parts = reply.split(" ", 2)
    try:
        code = int(parts[0])
    except ValueError:
        return SmtpReplyError(550, "5.7.1", reply)
    if len(parts) >= 2 and parts[1][:1] in "245" and parts[1].count(".") == 2:
        return SmtpReplyError(code, parts[1], parts[2] if len(parts) > 2 else "")
    return SmtpReplyError(code, f"{code // 100}.7.1", " ".join(parts[1:]))


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


def build_auth(config: Config, resolver: Resolver, store: Store | None = None) -> AuthWiring:
    """The auth wiring; with a store, ARC overrides are counted there (relay.auth.replay)."""
    wiring = AuthWiring(routing=Routing())
    if config.auth.enabled or config.arc.enabled:
        wiring.executor = crypto_executor(config)
    _build_srs(config, wiring)
    transform = _build_transform(config, resolver, wiring.executor, store)
    if transform is not None:
        wiring.transforms.append(transform)
    return wiring


def _build_transform(
    config: Config, resolver: Resolver, executor: Executor | None, store: Store | None
) -> Transform | None:
    authenticator = None
    if config.auth.enabled:
        from relay.auth.pipeline import Authenticator

        authenticator = Authenticator(
            config, resolver, executor=executor, replay_guard=_replay_guard(config, store)
        )
    spec = None
    if config.arc.enabled:
        from relay.auth.arc import ArcSealer, SealerSpec

        key_path = config.arc.private_key
        if not config.arc.domain or not config.arc.selector:
            raise ConfigError(
                str(config.path), "arc.domain", "ARC sealing needs domain and selector"
            )
        if key_path is None or not key_path.is_file():
            raise ConfigError(
                str(config.path),
                "arc.private_key",
                f"file not found: {key_path} (create one with `relay keygen`)",
            )
        pem = key_path.read_bytes()
        try:  # load once here so a bad key is a config error, not a failure per message
            ArcSealer(config.arc.domain, config.arc.selector, pem, config.authserv_id)
        except Exception as exc:  # noqa: BLE001 - any key problem is a config error
            raise ConfigError(str(config.path), "arc.private_key", str(exc)) from None
        spec = SealerSpec(config.arc.domain, config.arc.selector, pem, config.authserv_id)
    if authenticator is None and spec is None:
        return None

    async def transform(conn: ConnInfo, env: Envelope, message: bytes) -> bytes:
        from relay.auth.arc import seal_async, validate_arc
        from relay.auth.types import ArcCv, ArcResult

        chain = ArcResult(cv=ArcCv.NONE)
        ar_value = f"{config.authserv_id}; none"
        if authenticator is not None:
            verdict = await authenticator.evaluate(conn, env, message)
            if verdict.action == "reject":
                log.info(
                    "rejected",
                    client=conn.peer_ip,
                    mail_from=env.mail_from,
                    reply=verdict.reply,
                    header=verdict.header,
                )
                raise _reply_error(verdict.reply or "550 5.7.1 Message rejected by policy")
            message = verdict.message
            ar_value = verdict.ar_value
            if verdict.results.arc is not None:
                chain = verdict.results.arc
        elif spec is not None:
            chain = await validate_arc(resolver, message, executor=executor)
        if spec is not None:
            message = await seal_async(spec, message, ar_value, chain, executor=executor)
        return message

    return transform


def _replay_guard(config: Config, store: Store | None) -> ArcReplayGuard | None:
    a = config.arc
    if store is None or not a.trusted_sealers:
        return None
    if not a.override_max_recipients and not a.override_per_sealer_hour:
        return None
    from relay.auth.replay import ArcReplayGuard, ReplayLimits

    limits = ReplayLimits(a.override_max_recipients, a.override_window, a.override_per_sealer_hour)
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

    wiring.routing = Routing(srs_forward=forward, srs_reverse=reverse)
    wiring.local_check = local_check
