"""Start-up checks in the ``relay serve`` parent, before any worker starts.

Everything a worker would otherwise find out on its own (and die of, over and over,
with several workers) is checked here once, so a wrong setup is one line and exit 2:
the SRS secret, the ARC key, the TLS-RPT DKIM key, the TLS certificate and key, the CA
file, the outbound source address and the store directory, or (``storage.url``) that the
database answers and, behind pgbouncer, commits synchronously by default. Then the listen
sockets are bound here (the workers share them): an address in use is one line naming it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from relay.config import Config, HostPort
from relay.errors import ConfigError, StartupError

# the secret shipped in config.toml and shown in the README: anyone can forge with it
SHIPPED_SRS_SECRETS = frozenset({"change-me"})


def check(config: Config) -> None:
    """Raise ConfigError (or StartupError) for the first thing that would stop a worker."""
    check_srs(config)
    check_arc(config)
    check_tlsrpt(config)
    check_tls(config)
    check_delivery(config)
    check_store_dir(config)
    check_database(config)
    check_submission(config)


def check_database(config: Config) -> None:
    """``storage.url``: open the store once and close it (a refused connection, a wrong
    password, or synchronous_commit off behind pgbouncer is StartupError, one line)."""
    if not config.storage.postgresql:
        return
    import asyncio

    from relay.errors import StoreError
    from relay.pgstore import store_for

    async def probe() -> None:
        store = await store_for(config.storage, pool_size=1).open()
        await store.close()

    try:
        asyncio.run(probe())
    except StoreError as exc:
        raise StartupError(str(exc)) from exc


def _err(config: Config, key: str, problem: str) -> ConfigError:
    return ConfigError(str(config.path), key, problem)


def check_srs(config: Config) -> None:
    s = config.srs
    if not s.enabled:
        return
    if not s.domain:
        raise _err(config, "srs.domain", "SRS needs a domain (or set srs.enabled = false)")
    if not s.secret and s.secret_file is not None:
        raise _err(
            config,
            "srs.secret_file",
            f"missing or empty: {s.secret_file} (scripts/serve writes a random one)",
        )
    if not s.secret:
        raise _err(config, "srs.secret", "SRS needs a secret (scripts/serve writes a random one)")
    if s.secret in SHIPPED_SRS_SECRETS:
        # with a published secret anyone can build a valid SRS0 address and relay through us
        raise _err(
            config, "srs.secret", "the shipped example secret must be replaced by a random one"
        )


def _read(config: Config, key: str, path: Path | None, hint: str = "") -> bytes:
    if path is None:
        raise _err(config, key, f"not set{hint}")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _err(config, key, f"file not found: {path}{hint}") from None
    except OSError as exc:
        raise _err(config, key, f"cannot read {path}: {exc.strerror}") from None


def check_arc(config: Config) -> None:
    a = config.arc
    if not a.enabled:
        return
    if not a.domain or not a.selector:
        raise _err(config, "arc.domain", "ARC sealing needs domain and selector")
    pem = _read(config, "arc.private_key", a.private_key, " (create one with `relay keygen`)")
    from relay.auth.arc import ArcSealer

    try:  # the same load the workers do, so a bad key fails here and not in each of them
        ArcSealer(a.domain, a.selector, pem, config.authserv_id)
    except Exception as exc:  # noqa: BLE001 - any key problem is a config error
        raise _err(config, "arc.private_key", f"{a.private_key}: {exc}") from None


def check_tlsrpt(config: Config) -> None:
    if not config.tlsrpt.enabled:
        return
    from relay.tlsrpt.sender import load_signer, report_meta

    report_meta(config)
    load_signer(config)


def check_tls(config: Config) -> None:
    s = config.server
    if s.tls_cert is None or s.tls_key is None:
        return
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
    except (ssl.SSLError, OSError) as exc:
        raise _err(config, "server.tls_cert", f"cannot load certificate and key: {exc}") from None


def check_delivery(config: Config) -> None:
    d = config.delivery
    if d.ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(d.ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise _err(config, "delivery.ca_file", f"cannot load {d.ca_file}: {exc}") from None
    if d.source_ip:
        try:
            ip = ipaddress.ip_address(d.source_ip)
        except ValueError:
            bad = f"not an IP address: {d.source_ip!r}"
            raise _err(config, "delivery.source_ip", bad) from None
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((str(ip), 0))
            except OSError as exc:
                raise _err(
                    config, "delivery.source_ip", f"not an address of this host: {exc.strerror}"
                ) from None


def check_store_dir(config: Config) -> None:
    if config.storage.postgresql:  # a database server's own disk: nothing local to check
        return
    parent = config.storage.path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _err(config, "storage.path", f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _err(config, "storage.path", f"directory not writable: {parent}")


def check_submission(config: Config) -> None:
    """A users file the relay could not parse is a start-up error (a missing one is
    not: no user can authenticate until ``relay user add``)."""
    if not config.submission.enabled:
        return
    from relay.submission.users import UsersFileError, load

    try:
        load(config.submission.users_file)
    except UsersFileError as exc:
        raise _err(config, "submission.users_file", str(exc)) from None


def bind_listeners(listen: tuple[HostPort, ...]) -> list[socket.socket]:
    """Bind every listen address (non-blocking, for the workers to share); an address in
    use or not ours is one StartupError naming it."""
    out: list[socket.socket] = []
    try:
        for hp in listen:
            out.append(_bind(hp))
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


def _bind(hp: HostPort) -> socket.socket:
    try:
        infos = socket.getaddrinfo(hp.host, hp.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {hp}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"cannot listen on {hp}: address already in use") from None
        raise StartupError(f"cannot listen on {hp}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


__all__ = ["SHIPPED_SRS_SECRETS", "bind_listeners", "check"]
