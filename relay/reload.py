"""SIGHUP: reload what can change without a restart, keep the old config when the new one
is invalid.

What is reloaded: ``[aliases]``, ``relay.trusted_networks`` and ``relay.local_domains``
(the RCPT rules and the alias expansion of new transactions); the mailing lists
(``[lists."..."]`` added, removed or changed, and ``[lists_http] base_url``: new
transactions and new posts see them, a fan-out under way keeps the list it started
with); the keys, read again so that a rotated file takes effect: the ARC seal
(``[arc]`` enabled, domain, selector, key file, trusted sealers) and the ``[[dkim.sign]]``
keys (list copies and notices, DSNs, TLS-RPT reports); and the inbound TLS certificate
and key (new connections). Lists can be added by a reload only to a relay that started
with at least one (the list pages and the lists' background task are set up at start);
adding the first one is named as needing a restart. Everything else (listen addresses,
workers, the store, limits...) needs a restart: a change there is logged as
``reload_needs_restart`` with the keys, and the running value stays.

The new file is read and checked in full first (the same reader, and every key file
loaded); on any problem the relay logs one ``reload_failed`` line with the reason and
goes on with the old config, unchanged. On success one ``reloaded`` line names what
changed, and the key files read again. With workers, the parent checks the new file the
same way (so that workers it restarts later start with the reloaded config, or the old
one when the new is invalid) and passes SIGHUP to each worker, which reloads itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from relay import logs
from relay.config import Config, load_config
from relay.errors import ConfigError, RelayError

log = logs.get("relay.reload")

ERRORS = (ConfigError, RelayError, OSError, ValueError)


def differences(old: Config, new: Config, lists_live: bool = True) -> tuple[list[str], list[str]]:
    """(what is reloaded and changed, what changed but needs a restart): dotted keys.
    ``lists_live``: the running relay has its list service (it started with lists)."""
    running = merged(old, new, lists_live)
    changed: list[str] = []
    restart: list[str] = []
    for f in dataclasses.fields(old):
        if f.name == "path":
            continue
        a, b, r = getattr(old, f.name), getattr(new, f.name), getattr(running, f.name)
        if a == b:
            continue
        taken = _keys(f.name, a, r) if a != r else []
        changed.extend(taken)
        restart.extend(k for k in _keys(f.name, a, b) if k not in taken)
    return changed, restart


def _keys(section: str, a: Any, b: Any) -> list[str]:
    if section == "lists":
        return [f'lists."{k}"' for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if section == "dkim_sign":
        return ["dkim.sign"]
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return [
            f"{section}.{f.name}"
            for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(b, f.name)
        ]
    return [section]


def merged(old: Config, new: Config, lists_live: bool = True) -> Config:
    """The running config with the reloadable parts of the new one (the lists only when
    the list service runs: else the old lists, and no local domain for the new ones)."""
    server = dataclasses.replace(
        old.server, tls_cert=new.server.tls_cert, tls_key=new.server.tls_key
    )
    relay, lists, lists_http = new.relay, new.lists, new.lists_http
    if not lists_live and new.lists:
        waiting = {c.domain for c in new.lists.values()} - set(old.relay.local_domains)
        domains = tuple(d for d in relay.local_domains if d not in waiting)
        relay = dataclasses.replace(relay, local_domains=domains)
        lists, lists_http = old.lists, old.lists_http
    return dataclasses.replace(
        old,
        aliases=new.aliases,
        relay=relay,
        arc=new.arc,
        lists=lists,
        lists_http=lists_http,
        dkim_sign=new.dkim_sign,
        server=server,
    )


@dataclasses.dataclass(frozen=True)
class Reloaded:
    """A new running config, checked, with what changed."""

    config: Config
    changed: list[str]
    restart: list[str]


def key_files(config: Config) -> list[str]:
    """The key files a reload reads again (config keys, for the log line)."""
    out = [f"dkim.sign[{i}].private_key" for i in range(len(config.dkim_sign))]
    return (["arc.private_key"] if config.arc.enabled else []) + out


def prepare(old: Config, lists_live: bool = True) -> Reloaded:
    """Read the config file again and check what would be reloaded: every key file is
    loaded (ARC, ``[[dkim.sign]]``) and the TLS certificate. Raises ConfigError (or
    another of ERRORS) naming the problem."""
    from relay.app import server_ssl_context
    from relay.auth.signer import OutboundSigner
    from relay.auth.wiring import _sealer_spec

    new = load_config(old.path)
    config = merged(old, new, lists_live)
    _sealer_spec(config)
    OutboundSigner.from_config(config)
    server_ssl_context(config)
    changed, restart = differences(old, new, lists_live)
    return Reloaded(config, changed, restart)


def reload_config(old: Config, lists_live: bool = True) -> Config:
    """The supervisor's reload (relay.workers): the new running config, or the old one
    when the new is invalid (each worker logs why)."""
    try:
        return prepare(old, lists_live).config
    except ERRORS:
        return old


async def reload_app(app: Any) -> bool:
    """Reload a running RelayApp from its config file; False (old config kept) on error."""
    from relay.app import _dsn_signer, server_ssl_context
    from relay.auth.wiring import ArcSeal, _sealer_spec
    from relay.smtp.rules import RelayRules
    from relay.stages import NoSeal

    old: Config = app.config
    svc = app.lists
    sender = getattr(app, "tlsrpt_sender", None)
    try:
        done = prepare(old, lists_live=svc is not None)
        config = done.config
        spec = _sealer_spec(config)  # the key read and loaded again
        rules = RelayRules(
            config,
            extra_local_check=app.auth.local_check,
            list_check=svc.check_rcpt if svc is not None else None,
        )
        ssl_context = server_ssl_context(config)
        dsn_sign = _dsn_signer(config)
        lists = _list_parts(config) if svc is not None else None
        report_signer = _report_signer(config, sender) if sender is not None else None
    except ERRORS as exc:
        log.error("reload_failed", error=str(exc), kept="the running config")
        return False
    sealer = ArcSeal(spec, app.auth.executor) if spec is not None else NoSeal()
    # swap each reloadable part; sessions and transactions already running keep theirs
    app.config = config
    app.server.config = config
    app.server.rules = rules
    app.server.ssl_context = ssl_context
    app.intake.config = config
    app.intake.router = dataclasses.replace(app.intake.router, expand=rules.expand)
    app.intake.sealer = sealer
    if hasattr(app.intake.verdict, "config"):  # arc.trusted_sealers (auth itself stays)
        app.intake.verdict.config = config
    app.scheduler.sign = dsn_sign
    if lists is not None:
        _swap_lists(app, config, *lists)
    if sender is not None:
        sender.signer = report_signer
    if done.restart:
        log.warning("reload_needs_restart", keys=done.restart)
    log.info("reloaded", changed=done.changed or ["nothing"], keys=key_files(config))
    return True


def _list_parts(config: Config) -> tuple[Any, Any]:
    """The lists' DKIM signer and ARC sealer, the keys loaded now."""
    from relay.auth.signer import OutboundSigner
    from relay.lists.service import build_sealer

    return OutboundSigner.from_config(config), build_sealer(config)


def _report_signer(config: Config, sender: Any) -> Any:
    from relay.tlsrpt.sender import load_signer

    return load_signer(config, sender.clock)


def _swap_lists(app: Any, config: Config, signer: Any, sealer: Any) -> None:
    """The list service, the lists' local delivery and their pages on the new lists and
    keys. The lists' signing processes are replaced: each keeps the keys it loaded."""
    from concurrent.futures import ProcessPoolExecutor

    from relay.lists.local import ListsLocal
    from relay.lists.service import PARALLEL, CopyMaker

    svc = app.lists
    svc.config = config
    svc.lists = config.lists
    svc.base_url = config.lists_http.base_url
    svc.signer = signer
    svc.maker = CopyMaker(config, signer, sealer)
    if isinstance(svc.executor, ProcessPoolExecutor):
        from relay.auth.offload import make_crypto_pool

        old, svc.executor = svc.executor, make_crypto_pool(PARALLEL)
        old.shutdown(wait=False)  # the batches it was given still finish there
        pool = svc.executor

        async def close_pool() -> None:
            pool.shutdown(wait=False, cancel_futures=True)

        app._closers.append(close_pool)
    courier = app.scheduler.courier
    if isinstance(courier, ListsLocal):
        courier.domains = frozenset(c.domain for c in config.lists.values())
