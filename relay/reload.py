"""SIGHUP: reload what can change without a restart, keep the old config when the new one
is invalid.

What is reloaded: ``[aliases]``, ``relay.trusted_networks`` and ``relay.local_domains``
(the RCPT rules and the alias expansion of new transactions), the ARC seal (``[arc]``
enabled, domain, selector, key file: the key is read again, so a rotated key file takes
effect), and the inbound TLS certificate and key (new connections). Everything else
(listen addresses, workers, the store, limits...) needs a restart: a change there is
logged as ``reload_needs_restart`` with the keys, and the running value stays.

The new file is read and checked in full first (the same reader and the checks of the
parts reloaded); on any problem the relay logs ``reload_failed`` with the one-line
reason and goes on with the old config, unchanged. On success one ``reloaded`` line
names what changed. With workers, the parent passes SIGHUP to each worker, and each
reloads itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from relay import logs
from relay.config import Config, load_config
from relay.errors import ConfigError, RelayError

log = logs.get("relay.reload")

RELOADED = ("aliases", "relay", "arc")  # Config sections taken from the new file
RELOADED_KEYS = ("server.tls_cert", "server.tls_key")


def differences(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(what is reloaded and changed, what changed but needs a restart): dotted keys."""
    changed: list[str] = []
    restart: list[str] = []
    for f in dataclasses.fields(old):
        if f.name == "path":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if f.name in RELOADED:
            changed.extend(_keys(f.name, a, b))
        elif f.name == "server":
            for key in _keys("server", a, b):
                (changed if key in RELOADED_KEYS else restart).append(key)
        else:
            restart.extend(_keys(f.name, a, b))
    return changed, restart


def _keys(section: str, a: Any, b: Any) -> list[str]:
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return [
            f"{section}.{f.name}"
            for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(b, f.name)
        ]
    return [section]


def merged(old: Config, new: Config) -> Config:
    """The running config with the reloadable parts of the new one."""
    server = dataclasses.replace(
        old.server, tls_cert=new.server.tls_cert, tls_key=new.server.tls_key
    )
    return dataclasses.replace(
        old, aliases=new.aliases, relay=new.relay, arc=new.arc, server=server
    )


async def reload_app(app: Any) -> bool:
    """Reload a running RelayApp from its config file; False (old config kept) on error."""
    from relay.app import server_ssl_context
    from relay.auth.wiring import ArcSeal, _sealer_spec
    from relay.smtp.rules import RelayRules
    from relay.stages import NoSeal

    old: Config = app.config
    try:
        new = load_config(old.path)
        config = merged(old, new)
        spec = _sealer_spec(config)  # the key read and loaded again
        rules = RelayRules(config, extra_local_check=app.auth.local_check)
        ssl_context = server_ssl_context(config)
    except (ConfigError, RelayError, OSError, ValueError) as exc:
        log.error("reload_failed", error=str(exc), kept="the running config")
        return False
    changed, restart = differences(old, new)
    sealer = ArcSeal(spec, app.auth.executor) if spec is not None else NoSeal()
    # swap each reloadable part; sessions and transactions already running keep theirs
    app.config = config
    app.server.config = config
    app.server.rules = rules
    app.server.ssl_context = ssl_context
    app.intake.config = config
    app.intake.router = dataclasses.replace(app.intake.router, expand=rules.expand)
    app.intake.sealer = sealer
    if restart:
        log.warning("reload_needs_restart", keys=restart)
    log.info("reloaded", changed=changed or ["nothing"])
    return True
