"""Parse config.toml into frozen, validated dataclasses; the only code that reads the file.

A wrong config raises ConfigError naming the file, the key and the problem; the CLI
turns that into one line on stderr and exit code 2. Relative paths are relative to
the directory of the config file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 2525),)
    hostname: str = "relay.example.net"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_header_size: int = 102400
    max_received_headers: int = 50
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    session_timeout: float = 300.0  # idle time between commands
    max_session_time: float = 1800.0  # total time of one connection
    max_junk_commands: int = 20  # NOOP/RSET/HELP/bad commands per session
    min_free_space: int = 0  # bytes; 0: 1.5 x max_message_size
    workers: int = 1  # processes sharing the listen sockets; config default 0 = one per CPU
    event_loop: str = "auto"  # "auto" (uvloop when importable) | "uvloop" | "asyncio"
    node_id: str = field(default_factory=socket.gethostname)  # lease owners on a shared store


@dataclass(frozen=True)
class RelayConfig:
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
    )
    local_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class StorageConfig:
    path: Path = Path("var/relay.sqlite3")
    log_retention: float = 7 * 86400.0  # seconds a message's history outlives it
    url: str = ""  # postgresql://user@host/db (no password in it); "" = the SQLite store at path
    passfile: Path | None = None  # the database password, when RELAY_DB_PASSWORD is not set
    # seconds a claimed recipient stays this process's without renewal: on a shared store,
    # how soon another node takes over the mail of a node that died
    lease: float = 60.0
    # seconds between the loader's reads of the store for due mail nobody woke it for
    # (retries coming due; on PostgreSQL, mail of a NOTIFY that was lost)
    poll_interval: float = 1.0
    # connections of each process's PostgreSQL pool (url only; the leader's LISTEN
    # connection is one of them): max_connections must cover nodes x workers x pool_size
    pool_size: int = 16
    # url is a pgbouncer in transaction pooling mode: no prepared-statement cache, no
    # per-session settings (synchronous_commit must be the role's or database's default,
    # checked at start), LISTEN only over listen_url (a direct connection), else polling
    pgbouncer: bool = False
    listen_url: str = ""

    @property
    def postgresql(self) -> bool:
        return bool(self.url)

    def password(self) -> str | None:
        """The database password: $RELAY_DB_PASSWORD, else the passfile's first line; read
        when connecting, never kept in the config (so never in a repr or a log line)."""
        env = os.environ.get("RELAY_DB_PASSWORD")
        if env:
            return env
        if self.passfile is not None:
            try:
                lines = self.passfile.read_text().splitlines()
            except OSError as exc:
                raise ConfigError(str(self.passfile), "storage.passfile", str(exc)) from exc
            return lines[0] if lines else None
        return None


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[HostPort, ...] = ()  # empty: the system's
    timeout: float = 5.0
    cache_max_ttl: float = 300.0  # answers kept for their TTL, at most this; 0 = no cache
    cache_negative_ttl: float = 30.0  # NXDOMAIN / no records kept this long; 0 = not kept
    # DNSSEC: "off" | "trust-ad" (trust the AD bit of the resolver); None = "trust-ad"
    # when every nameserver is on loopback, else "off"
    dnssec: str | None = None
    dnssec_trusted: bool = False  # trust AD from non-loopback nameservers too


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25
    ca_file: Path | None = None
    connect_timeout: float = 30.0
    attempt_timeout: float = 600.0  # total deadline of one attempt to one host
    max_mx: int = 5
    concurrency: int = 100  # outbound connections in all
    concurrency_per_domain: int = 10
    retry_first: float = 300.0  # seconds before the first retry
    retry_max: float = 14400.0  # back-off ceiling
    retry_jitter: float = 0.2  # +- fraction
    queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0  # seconds; 0 disables delay DSNs
    active_window: int = 1000  # messages held in memory for delivery
    dead_after: int = 3  # consecutive connect failures that mark a destination dead
    dead_backoff: float = 300.0
    source_ip: str = ""  # bind outbound connections here (optional)
    bounce_sender: str = ""  # From of DSNs; default MAILER-DAEMON@hostname
    # whose "TLS-Required: No" (RFC 8689) is honoured: trusted (trusted networks and
    # authenticated senders) | all | never
    tls_required_no: str = "trusted"
    # MX addresses on loopback/unspecified that are not ours: None = allowed only when
    # port != 25 (a lab); False never; True always (threats.md row 30)
    allow_loopback_mx: bool | None = None


@dataclass(frozen=True)
class MtaStsConfig:
    enabled: bool = True
    https_port: int = 443
    fetch_timeout: float = 60.0
    refresh_interval: float = 3600.0
    refresh_concurrency: int = 4
    failed_fetch_backoff: float = 300.0


@dataclass(frozen=True)
class HttpConfig:
    allow_private_addresses: bool = False


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = True
    # action per result: accept | reject | quarantine
    dmarc_reject: str = "reject"  # DMARC fail under p=reject
    dmarc_quarantine: str = "quarantine"  # DMARC fail under p=quarantine
    spf_fail: str = "accept"
    authserv_id: str = ""  # default: [server] hostname
    # where DKIM/ARC crypto runs, off the event loop: with one relay worker a process pool
    # of crypto_workers; with several, crypto_threads threads in each worker (OpenSSL
    # releases the GIL while it signs and hashes). 0 = inline on the loop.
    crypto_workers: int = 1
    crypto_threads: int = 2
    # how DMARC finds the policy and the organizational domain: "treewalk" (RFC 9989
    # section 4.10, DNS tree walk) or "psl" (RFC 7489, the Public Suffix List), to compare
    dmarc_discovery: str = "treewalk"


@dataclass(frozen=True)
class ArcConfig:
    enabled: bool = True
    domain: str = ""
    selector: str = ""
    private_key: Path | None = None
    trusted_sealers: tuple[str, ...] = ()
    # ARC replay guard (RFC 8617 section 9.5: a sealed message can be replayed): recipients
    # one seal may carry under a DMARC override within override_window seconds (0 = no
    # limit), and overrides a trusted sealer may earn per hour (0 = no limit)
    override_max_recipients: int = 50
    override_window: float = 7 * 86400.0
    override_per_sealer_hour: int = 0


@dataclass(frozen=True)
class SrsConfig:
    enabled: bool = True
    domain: str = ""
    secret: str = ""  # the secret itself, or read from secret_file
    secret_file: Path | None = None
    max_age_days: int = 21


@dataclass(frozen=True)
class TlsRptConfig:
    enabled: bool = True
    organization: str = ""
    contact: str = ""
    submitter: str = ""
    dkim_selector: str = ""
    dkim_private_key: Path | None = None
    max_failure_details: int = 100
    send_delay_max: float = 3600.0  # random delay after UTC midnight


@dataclass(frozen=True)
class ListConfig:
    """One mailing list, ``[lists."dev@lists.example.org"]`` (members live in the store)."""

    address: str  # dev@lists.example.org (lower-cased domain)
    name: str = ""  # display name: List-Id, munged From; default: the local part
    subject_prefix: str = ""
    posting: str = "members"  # members | anyone | moderated
    dmarc_mitigation: str = "munge"  # munge | wrap | none
    mitigate_always: bool = False  # mitigate whatever the author's DMARC policy
    reply_to: str = "author"  # author | list
    owners: tuple[str, ...] = ()
    footer: str = ""
    archive: bool = True  # each post kept as distributed (`relay list archive`)
    archive_public: bool = True  # and served at BASE/lists/archive/ (archive = true)
    max_message_size: int = 10485760
    bounce_threshold: float = 5.0

    @property
    def local(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def display_name(self) -> str:
        return self.name or self.local


@dataclass(frozen=True)
class ListsHttpConfig:
    base_url: str = ""  # where the one-click and confirm links point


@dataclass(frozen=True)
class HttpServerConfig:
    listen: tuple[HostPort, ...] = ()  # empty: no HTTP listener
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True)
class PolicyServerConfig:
    """``[policy_server]``: Postfix's smtp_tls_policy_maps socketmap (relay.policyserver)."""

    listen: tuple[HostPort, ...] = ()  # empty: `relay serve` runs no policy server
    map_name: str = "postfix"  # the name in socketmap:inet:host:port:NAME
    lookup_timeout: float = 30.0  # answer TEMP before Postfix's 100 s socketmap timeout


@dataclass(frozen=True)
class DkimSignConfig:
    """One outbound DKIM key, ``[[dkim.sign]]``: signs mail whose From domain is domain or
    a subdomain of it."""

    domain: str
    selector: str
    private_key: Path


@dataclass(frozen=True)
class SubmissionUser:
    """``[submission.users."NAME"]``: the MAIL FROM addresses this user may send as:
    ``local@domain``, ``*@domain``, ``*`` (any address) or ``<>`` (the null sender)."""

    senders: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubmissionConfig:
    """``[submission]``: authenticated submission (RFC 4954, RFC 6409, RFC 8314)."""

    listen: tuple[HostPort, ...] = ()  # STARTTLS, then AUTH (port 587)
    implicit_tls_listen: tuple[HostPort, ...] = ()  # TLS from the first byte (port 465)
    users_file: Path = Path("var/submission-users")  # default: beside the store
    max_failures: int = 5  # failed AUTHs per client IP or user within failure_window
    failure_window: float = 900.0
    lockout: float = 900.0  # seconds an IP or user is refused (454 4.7.0) past max_failures
    failure_delay: float = 1.0  # first back-off before a 535, doubling per failure
    users: dict[str, SubmissionUser] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.implicit_tls_listen)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # json | console | auto (json when not a terminal)


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    storage: StorageConfig = field(default_factory=StorageConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    arc: ArcConfig = field(default_factory=ArcConfig)
    srs: SrsConfig = field(default_factory=SrsConfig)
    tlsrpt: TlsRptConfig = field(default_factory=TlsRptConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lists: dict[str, ListConfig] = field(default_factory=dict)
    lists_http: ListsHttpConfig = field(default_factory=ListsHttpConfig)
    http_server: HttpServerConfig = field(default_factory=HttpServerConfig)
    policy_server: PolicyServerConfig = field(default_factory=PolicyServerConfig)
    dkim_sign: tuple[DkimSignConfig, ...] = ()  # [[dkim.sign]], then the [tlsrpt] alias
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)

    @property
    def authserv_id(self) -> str:
        return self.auth.authserv_id or self.server.hostname


# ---------------------------------------------------------------- parsing helpers


class _Section:
    """Typed access to one table of the TOML document, raising ConfigError."""

    def __init__(self, path: Path, name: str, data: Any, known: set[str] | None = None) -> None:
        self.path = path
        self.name = name
        if not isinstance(data, dict):
            raise ConfigError(str(path), name, "must be a table")
        self.data: dict[str, Any] = data
        if known is not None:
            for k in data:
                if k not in known:
                    raise ConfigError(str(path), f"{name}.{k}", "unknown key")

    def err(self, key: str, problem: str) -> ConfigError:
        return ConfigError(str(self.path), f"{self.name}.{key}", problem)

    def get(self, key: str, kind: type[T], default: T) -> T:
        if key not in self.data:
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            raise self.err(key, "must be an integer")
        if not isinstance(value, kind):
            raise self.err(key, f"must be {kind.__name__}, not {type(value).__name__}")
        return value

    def positive(self, key: str, kind: type[T], default: T, minimum: float = 0) -> T:
        value = self.get(key, kind, default)
        if isinstance(value, int | float) and value < minimum:
            raise self.err(key, f"must be >= {minimum}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.err(key, "must be a list of strings")
        return tuple(value)

    def path_value(self, key: str, default: Path | None) -> Path | None:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise self.err(key, "must be a path string")
        if value == "":
            return None
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.path.parent / p)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.err(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value


def parse_hostport(
    text: str,
    default_port: int | None,
    on_error: Callable[[str], ConfigError],
    allow_zero: bool = False,
) -> HostPort:
    """host:port, [v6]:port or (with a default_port) a bare host; None: a port is needed."""
    text = text.strip()
    host, port_s = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise on_error(f"bad address {text!r}")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest.startswith(":"):
            port_s = rest[1:]
        elif rest:
            raise on_error(f"bad address {text!r}")
    elif text.count(":") == 1:
        host, port_s = text.split(":")
    if not port_s and default_port is None:
        raise on_error(f"{text!r} needs a port (host:port, [v6]:port)")
    try:
        port = int(port_s) if port_s else int(default_port or 0)
    except ValueError:
        raise on_error(f"bad port in {text!r}") from None
    if not host or not (0 if allow_zero else 1) <= port < 65536:
        raise on_error(f"bad address {text!r}")
    return HostPort(host, port)


_ACTIONS = ("accept", "reject", "quarantine")
TLS_REQUIRED_NO = ("trusted", "all", "never")
_EVENT_LOOPS = ("auto", "uvloop", "asyncio")

_KNOWN = {
    "server": {
        "listen",
        "hostname",
        "tls_cert",
        "tls_key",
        "max_message_size",
        "max_recipients",
        "max_header_size",
        "max_received_headers",
        "max_connections",
        "max_connections_per_ip",
        "session_timeout",
        "max_session_time",
        "max_junk_commands",
        "min_free_space",
        "workers",
        "event_loop",
        "node_id",
    },
    "relay": {"trusted_networks", "local_domains"},
    "storage": {
        "path",
        "log_retention",
        "url",
        "passfile",
        "lease",
        "poll_interval",
        "pool_size",
        "pgbouncer",
        "listen_url",
    },
    "dns": {
        "nameservers",
        "timeout",
        "cache_max_ttl",
        "cache_negative_ttl",
        "dnssec",
        "dnssec_trusted",
    },
    "delivery": {
        "port",
        "ca_file",
        "connect_timeout",
        "attempt_timeout",
        "max_mx",
        "concurrency",
        "concurrency_per_domain",
        "retry_first",
        "retry_max",
        "retry_jitter",
        "queue_lifetime",
        "delay_warning",
        "active_window",
        "dead_after",
        "dead_backoff",
        "source_ip",
        "bounce_sender",
        "tls_required_no",
    },
    "mta_sts": {
        "enabled",
        "https_port",
        "fetch_timeout",
        "refresh_interval",
        "refresh_concurrency",
        "failed_fetch_backoff",
    },
    "http": {"allow_private_addresses"},
    "auth": {
        "enabled",
        "dmarc_reject",
        "dmarc_quarantine",
        "spf_fail",
        "authserv_id",
        "crypto_workers",
        "crypto_threads",
        "dmarc_discovery",
    },
    "arc": {
        "enabled",
        "domain",
        "selector",
        "private_key",
        "trusted_sealers",
        "override_max_recipients",
        "override_window",
        "override_per_sealer_hour",
    },
    "srs": {"enabled", "domain", "secret", "secret_file", "max_age_days"},
    "tlsrpt": {
        "enabled",
        "organization",
        "contact",
        "submitter",
        "dkim_selector",
        "dkim_private_key",
        "max_failure_details",
        "send_delay_max",
    },
    "logging": {"level", "format"},
    # [lists."ADDRESS"]: the keys of each list's table
    "lists": {
        "name",
        "subject_prefix",
        "posting",
        "dmarc_mitigation",
        "mitigate_always",
        "reply_to",
        "owners",
        "footer",
        "archive",
        "max_message_size",
        "bounce_threshold",
    },
    "lists_http": {"base_url"},
    "http_server": {"listen", "tls_cert", "tls_key"},
    "policy_server": {"listen", "map_name", "lookup_timeout"},
    # [[dkim.sign]]: the keys of each entry
    "dkim.sign": {"domain", "selector", "private_key"},
    "submission": {
        "listen",
        "implicit_tls_listen",
        "users_file",
        "max_failures",
        "failure_window",
        "lockout",
        "failure_delay",
        "users",
    },
    # [submission.users."NAME"]: the keys of each user's table
    "submission.users": {"senders"},
}
# read by their own readers, not as one flat table
_NESTED = {"lists", "dkim.sign", "submission.users"}
POSTING = ("members", "anyone", "moderated")
MITIGATION = ("munge", "wrap", "none")
REPLY_TO = ("author", "list")
# list addresses a list's own address implies (RFC 2369 targets, VERP, confirmations)
LIST_SUFFIXES = ("-subscribe", "-unsubscribe", "-owner", "-bounces", "-confirm", "-request")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate config.toml; raise ConfigError on any problem."""
    p = Path(path).resolve()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "-", f"cannot read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "-", f"not valid TOML: {exc}") from None
    return parse_config(doc, p)


def parse_config(doc: dict[str, Any], p: Path) -> Config:
    """Validate a TOML document read from p: one reader per section, in dependency order
    (aliases need relay.local_domains)."""
    known_tables = (set(_KNOWN) - _NESTED) | {"aliases", "lists", "dkim"}
    for k in doc:
        if k not in known_tables:
            raise ConfigError(str(p), k, "unknown section")

    def sec(name: str) -> _Section:
        return _Section(p, name, doc.get(name, {}), _KNOWN[name])

    relay = read_relay(sec("relay"))
    lists = read_lists(p, doc.get("lists", {}))
    relay = _with_list_domains(relay, lists)
    tlsrpt = read_tlsrpt(sec("tlsrpt"))
    lists_http = _lists_http_for(read_lists_http(sec("lists_http")), lists, p)
    server = read_server(sec("server"))
    return Config(
        path=p,
        server=server,
        relay=relay,
        aliases=read_aliases(p, doc.get("aliases", {}), relay),
        storage=(storage := read_storage(sec("storage"))),  # submission's default path
        dns=read_dns(sec("dns")),
        delivery=read_delivery(sec("delivery")),
        mta_sts=read_mta_sts(sec("mta_sts")),
        http=read_http(sec("http")),
        auth=read_auth(sec("auth")),
        arc=read_arc(sec("arc")),
        srs=read_srs(sec("srs")),
        tlsrpt=tlsrpt,
        logging=read_logging(sec("logging")),
        lists=lists,
        lists_http=lists_http,
        http_server=read_http_server(sec("http_server")),
        policy_server=read_policy_server(sec("policy_server")),
        dkim_sign=read_dkim_sign(p, doc.get("dkim", {}), tlsrpt, server.hostname),
        submission=read_submission(sec("submission"), server, storage),
    )


def _lists_http_for(
    lists_http: ListsHttpConfig, lists: Mapping[str, ListConfig], p: Path
) -> ListsHttpConfig:
    """[lists_http] as read; lists need its base_url (their links point there)."""
    if lists and not lists_http.base_url:
        raise lists_http_needed(p)
    return lists_http


def read_server(s: _Section) -> ServerConfig:
    listen_raw = s.strings("listen", ("127.0.0.1:2525",))
    if not listen_raw:
        raise s.err("listen", "needs at least one address")
    # no default port: a bare "127.0.0.1" silently meaning port 25 surprised operators
    listen = tuple(
        parse_hostport(x, None, lambda m: s.err("listen", m), allow_zero=True) for x in listen_raw
    )
    server = ServerConfig(
        listen=listen,
        hostname=s.get("hostname", str, "relay.example.net"),
        tls_cert=s.path_value("tls_cert", None),
        tls_key=s.path_value("tls_key", None),
        max_message_size=s.positive("max_message_size", int, 26214400, 1024),
        max_recipients=s.positive("max_recipients", int, 100, 1),
        max_header_size=s.positive("max_header_size", int, 102400, 1024),
        max_received_headers=s.positive("max_received_headers", int, 50, 1),
        max_connections=s.positive("max_connections", int, 1000, 1),
        max_connections_per_ip=s.positive("max_connections_per_ip", int, 50, 1),
        session_timeout=s.positive("session_timeout", float, 300.0, 0.1),
        max_session_time=s.positive("max_session_time", float, 1800.0, 0.1),
        max_junk_commands=s.positive("max_junk_commands", int, 20, 1),
        min_free_space=s.positive("min_free_space", int, 0, 0),
        workers=s.positive("workers", int, 0, 0) or (os.cpu_count() or 1),  # 0 = one per CPU
        event_loop=s.choice("event_loop", "auto", _EVENT_LOOPS),
        node_id=read_node_id(s),
    )
    if (server.tls_cert is None) != (server.tls_key is None):
        raise s.err(
            "tls_key" if server.tls_key is None else "tls_cert",
            "tls_cert and tls_key must be set together",
        )
    for key in ("tls_cert", "tls_key"):
        fp = getattr(server, key)
        if fp is not None and not fp.is_file():
            raise s.err(key, f"file not found: {fp}")
    return server


def read_relay(r: _Section) -> RelayConfig:
    nets = []
    for n in r.strings("trusted_networks", ("127.0.0.1/32",)):
        try:
            nets.append(ipaddress.ip_network(n, strict=False))
        except ValueError:
            raise r.err("trusted_networks", f"not a network: {n!r}") from None
    return RelayConfig(
        trusted_networks=tuple(nets),
        local_domains=tuple(d.lower().rstrip(".") for d in r.strings("local_domains", ())),
    )


def read_aliases(p: Path, aliases_raw: Any, relay: RelayConfig) -> dict[str, tuple[str, ...]]:
    if not isinstance(aliases_raw, dict):
        raise ConfigError(str(p), "aliases", "must be a table")
    aliases: dict[str, tuple[str, ...]] = {}
    for k, v in aliases_raw.items():
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and "@" in x for x in v):
            raise ConfigError(str(p), f"aliases.{k}", "must be a non-empty list of addresses")
        if "@" not in k:
            raise ConfigError(str(p), f"aliases.{k}", "alias must be an address local@domain")
        local, _, dom = k.rpartition("@")
        if dom.lower() not in relay.local_domains:
            raise ConfigError(
                str(p), f"aliases.{k}", f"domain {dom!r} is not in relay.local_domains"
            )
        aliases[f"{local}@{dom.lower()}"] = tuple(v)
    return aliases


_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


def read_node_id(s: _Section) -> str:
    """[server] node_id: this node's name in the leases of a shared store (default: the
    host name); letters, digits, '.', '_', '-' (a lease owner is node_id:pid:random)."""
    value = s.get("node_id", str, "") or socket.gethostname()
    if not _NODE_ID_RE.match(value):
        raise s.err("node_id", f"must be 1-253 of letters, digits, '.', '_', '-'; got {value!r}")
    return value


def read_storage(st: _Section) -> StorageConfig:
    """[storage]: exactly one of path (SQLite, the default) and url (PostgreSQL)."""
    if "path" in st.data and "url" in st.data:
        raise st.err("url", "set exactly one of storage.path and storage.url")
    path = st.path_value("path", Path("var/relay.sqlite3")) or Path("var/relay.sqlite3")
    path = path if path.is_absolute() else st.path.parent / path
    log_retention = st.positive("log_retention", float, 7 * 86400.0, 0.0)
    lease = st.positive("lease", float, 60.0, 1.0)
    poll = st.positive("poll_interval", float, 1.0, 0.05)
    if poll > 60:
        raise st.err("poll_interval", f"must be at most 60 seconds; got {poll}")
    url = st.get("url", str, "")
    passfile = st.path_value("passfile", None)
    # the leader's LISTEN connection and the group-commit writer each hold one while busy
    pool_size = st.positive("pool_size", int, 16, 4)
    if pool_size > 1000:
        raise st.err("pool_size", f"must be at most 1000; got {pool_size}")
    if not url:
        if "url" in st.data:
            raise st.err("url", "must not be empty (omit it for the SQLite store)")
        if passfile is not None:
            raise st.err("passfile", "only with storage.url")
        for key in ("pool_size", "pgbouncer", "listen_url"):
            if key in st.data:
                raise st.err(key, "only with storage.url")
        return StorageConfig(
            path=path, log_retention=log_retention, lease=lease, poll_interval=poll
        )
    _check_pg_url(st, url)
    pgbouncer = st.get("pgbouncer", bool, False)
    listen_url = st.get("listen_url", str, "")
    if listen_url:
        problem = pg_url_problem(listen_url)
        if problem is not None:
            raise st.err("listen_url", problem)
    return StorageConfig(
        path=path,
        url=url,
        passfile=passfile,
        log_retention=log_retention,
        lease=lease,
        poll_interval=poll,
        pool_size=pool_size,
        pgbouncer=pgbouncer,
        listen_url=listen_url,
    )


def pg_url_problem(url: str) -> str | None:
    """What is wrong with a PostgreSQL store URL (None: nothing)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return "must be a postgresql://user@host/database URL"
    if parts.password is not None or "password=" in parts.query:
        # a password in the URL would end up in process listings and logs
        return "must not hold a password: use RELAY_DB_PASSWORD or storage.passfile"
    if not parts.path.strip("/"):
        return "must name the database (postgresql://user@host/database)"
    return None


def _check_pg_url(st: _Section, url: str) -> None:
    problem = pg_url_problem(url)
    if problem is not None:
        raise st.err("url", problem)


def read_dns(d: _Section) -> DnsConfig:
    nameservers = tuple(
        parse_hostport(x, 53, lambda m: d.err("nameservers", m))
        for x in d.strings("nameservers", ())
    )
    dnssec = d.choice("dnssec", "", ("off", "trust-ad")) if "dnssec" in d.data else None
    trusted = d.get("dnssec_trusted", bool, False)
    if dnssec == "trust-ad" and not trusted:
        # RFC 7672 section 2.1 / RFC 4035 section 4.9.3: the AD bit means something only
        # over a trusted path; a remote resolver must be marked trusted explicitly
        remote = [str(n) for n in nameservers if not _loopback(n.host)]
        if remote:
            raise d.err(
                "dnssec",
                f'"trust-ad" with non-loopback nameservers ({", ".join(remote)}) needs '
                "dnssec_trusted = true",
            )
    return DnsConfig(
        nameservers=nameservers,
        timeout=d.positive("timeout", float, 5.0, 0.1),
        cache_max_ttl=d.positive("cache_max_ttl", float, 300.0, 0.0),
        cache_negative_ttl=d.positive("cache_negative_ttl", float, 30.0, 0.0),
        dnssec=dnssec,
        dnssec_trusted=trusted,
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def read_delivery(dl: _Section) -> DeliveryConfig:
    port = dl.get("port", int, 25)
    if not 0 < port < 65536:
        raise dl.err("port", "must be 1..65535")
    ca_file = dl.path_value("ca_file", None)
    if ca_file is not None and not ca_file.is_file():
        raise dl.err("ca_file", f"file not found: {ca_file}")
    delivery = DeliveryConfig(
        port=port,
        ca_file=ca_file,
        connect_timeout=dl.positive("connect_timeout", float, 30.0, 0.1),
        attempt_timeout=dl.positive("attempt_timeout", float, 600.0, 0.1),
        max_mx=dl.positive("max_mx", int, 5, 1),
        concurrency=dl.positive("concurrency", int, 100, 1),
        concurrency_per_domain=dl.positive("concurrency_per_domain", int, 10, 1),
        retry_first=dl.positive("retry_first", float, 300.0, 0.0),
        retry_max=dl.positive("retry_max", float, 14400.0, 0.0),
        retry_jitter=dl.positive("retry_jitter", float, 0.2, 0.0),
        queue_lifetime=dl.positive("queue_lifetime", float, 5 * 86400.0, 0.0),
        delay_warning=dl.positive("delay_warning", float, 0.0, 0.0),
        active_window=dl.positive("active_window", int, 1000, 1),
        dead_after=dl.positive("dead_after", int, 3, 1),
        dead_backoff=dl.positive("dead_backoff", float, 300.0, 0.0),
        source_ip=dl.get("source_ip", str, ""),
        bounce_sender=dl.get("bounce_sender", str, ""),
        tls_required_no=dl.choice("tls_required_no", "trusted", TLS_REQUIRED_NO),
        allow_loopback_mx=(
            dl.get("allow_loopback_mx", bool, False) if "allow_loopback_mx" in dl.data else None
        ),
    )
    if delivery.retry_jitter >= 1:
        raise dl.err("retry_jitter", "must be below 1")
    return delivery


def read_mta_sts(m: _Section) -> MtaStsConfig:
    return MtaStsConfig(
        enabled=m.get("enabled", bool, True),
        https_port=m.positive("https_port", int, 443, 1),
        fetch_timeout=m.positive("fetch_timeout", float, 60.0, 0.1),
        refresh_interval=m.positive("refresh_interval", float, 3600.0, 1.0),
        refresh_concurrency=m.positive("refresh_concurrency", int, 4, 1),
        failed_fetch_backoff=m.positive("failed_fetch_backoff", float, 300.0, 0.0),
    )


def read_http(h: _Section) -> HttpConfig:
    return HttpConfig(allow_private_addresses=h.get("allow_private_addresses", bool, False))


def read_auth(a: _Section) -> AuthConfig:
    return AuthConfig(
        enabled=a.get("enabled", bool, True),
        dmarc_reject=a.choice("dmarc_reject", "reject", _ACTIONS),
        dmarc_quarantine=a.choice("dmarc_quarantine", "quarantine", _ACTIONS),
        spf_fail=a.choice("spf_fail", "accept", _ACTIONS),
        authserv_id=a.get("authserv_id", str, ""),
        crypto_workers=a.positive("crypto_workers", int, 1, 0),
        crypto_threads=a.positive("crypto_threads", int, 2, 0),
        dmarc_discovery=read_dmarc_discovery(a),
    )


DMARC_DISCOVERIES = ("treewalk", "psl")


def read_dmarc_discovery(a: _Section) -> str:
    """[auth] dmarc_discovery: "treewalk" (RFC 9989, the default) or "psl" (RFC 7489)."""
    return a.choice("dmarc_discovery", "treewalk", DMARC_DISCOVERIES)


def read_arc(ac: _Section) -> ArcConfig:
    return ArcConfig(
        enabled=ac.get("enabled", bool, True),
        domain=ac.get("domain", str, ""),
        selector=ac.get("selector", str, ""),
        private_key=ac.path_value("private_key", None),
        trusted_sealers=tuple(x.lower() for x in ac.strings("trusted_sealers", ())),
        override_max_recipients=ac.positive("override_max_recipients", int, 50, 0),
        override_window=ac.positive("override_window", float, 7 * 86400.0, 1.0),
        override_per_sealer_hour=ac.positive("override_per_sealer_hour", int, 0, 0),
    )


def read_srs(sr: _Section) -> SrsConfig:
    secret = sr.get("secret", str, "")
    secret_file = sr.path_value("secret_file", None)
    if secret and secret_file is not None:
        raise sr.err("secret_file", "set secret or secret_file, not both")
    if secret_file is not None:
        try:  # a missing file leaves the secret empty: `relay serve` refuses that
            secret = secret_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            secret = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise sr.err("secret_file", f"cannot read {secret_file}: {exc}") from None
    return SrsConfig(
        enabled=sr.get("enabled", bool, True),
        domain=sr.get("domain", str, ""),
        secret=secret,
        secret_file=secret_file,
        max_age_days=sr.positive("max_age_days", int, 21, 1),
    )


def read_tlsrpt(t: _Section) -> TlsRptConfig:
    return TlsRptConfig(
        enabled=t.get("enabled", bool, True),
        organization=t.get("organization", str, ""),
        contact=t.get("contact", str, ""),
        submitter=t.get("submitter", str, ""),
        dkim_selector=t.get("dkim_selector", str, ""),
        dkim_private_key=t.path_value("dkim_private_key", None),
        max_failure_details=t.positive("max_failure_details", int, 100, 1),
        send_delay_max=t.positive("send_delay_max", float, 3600.0, 0.0),
    )


_LIST_LOCAL = re.compile(r"[a-z0-9][a-z0-9._]*")
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")


def _with_list_domains(relay: RelayConfig, lists: dict[str, ListConfig]) -> RelayConfig:
    """The list domains count as local domains."""
    extra = tuple(sorted({c.domain for c in lists.values()} - set(relay.local_domains)))
    return dataclasses.replace(relay, local_domains=relay.local_domains + extra)


def lists_http_needed(p: Path) -> ConfigError:
    return ConfigError(str(p), "lists_http.base_url", "required when lists are defined")


def read_lists(p: Path, raw: Any) -> dict[str, ListConfig]:
    """``[lists."local@domain"]`` tables; a list's local part is plain (letters, digits,
    dots, underscores: its -subscribe, -bounces+TOKEN ... addresses derive from it)."""
    if not isinstance(raw, dict):
        raise ConfigError(str(p), "lists", "must be a table of lists")
    out: dict[str, ListConfig] = {}
    for address, table in raw.items():
        name = f"lists.{address}"
        local, at, domain = str(address).rpartition("@")
        local, domain = local.lower(), domain.lower().rstrip(".")
        if not at or not _LIST_LOCAL.fullmatch(local) or not _DOMAIN.fullmatch(domain):
            raise ConfigError(
                str(p), name, "a list is named by its address local@domain (local: a-z 0-9 . _)"
            )
        if any(local.endswith(sfx) for sfx in LIST_SUFFIXES):
            raise ConfigError(str(p), name, "a list address may not end in a list suffix")
        s = _Section(p, name, table, _KNOWN["lists"])
        owners = s.strings("owners", ())
        if not owners:
            raise s.err("owners", "a list needs at least one owner address")
        for o in owners:
            if "@" not in o or o.startswith("@") or o.endswith("@"):
                raise s.err("owners", f"not an address: {o!r}")
        for k in ("name", "subject_prefix"):
            if any(c in s.get(k, str, "") for c in '\r\n"<>'):
                raise s.err(k, "must be one line without quotes or angle brackets")
        archive = s.data.get("archive", True)
        if not isinstance(archive, bool) and archive != "private":
            raise s.err("archive", f'must be true, false or "private"; got {archive!r}')
        cfg = ListConfig(
            address=f"{local}@{domain}",
            name=s.get("name", str, ""),
            subject_prefix=s.get("subject_prefix", str, ""),
            posting=s.choice("posting", "members", POSTING),
            dmarc_mitigation=s.choice("dmarc_mitigation", "munge", MITIGATION),
            mitigate_always=s.get("mitigate_always", bool, False),
            reply_to=s.choice("reply_to", "author", REPLY_TO),
            owners=owners,
            footer=s.get("footer", str, ""),
            archive=archive is not False,
            archive_public=archive is True,
            max_message_size=s.positive("max_message_size", int, 10485760, 1024),
            bounce_threshold=s.positive("bounce_threshold", float, 5.0, 0.5),
        )
        if cfg.address in out:
            raise ConfigError(str(p), name, "defined twice")
        out[cfg.address] = cfg
    return out


def read_lists_http(h: _Section) -> ListsHttpConfig:
    base = h.get("base_url", str, "").rstrip("/")
    if base and not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", base):
        raise h.err("base_url", f"must be an http(s) URL; got {base!r}")
    return ListsHttpConfig(base_url=base)


SOCKETMAP_TIMEOUT = 100.0  # Postfix dict_sockmap's fixed connect/read/write timeout


def read_policy_server(ps: _Section) -> PolicyServerConfig:
    listen = tuple(
        parse_hostport(x, None, lambda m: ps.err("listen", m), allow_zero=True)
        for x in ps.strings("listen", ())
    )
    name = ps.get("map_name", str, "postfix")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ps.err("map_name", f"must be 1 to 64 letters, digits, '.', '_' or '-'; got {name!r}")
    timeout = ps.positive("lookup_timeout", float, 30.0, 0.1)
    if timeout >= SOCKETMAP_TIMEOUT:
        raise ps.err(
            "lookup_timeout",
            f"must be under Postfix's {SOCKETMAP_TIMEOUT:g} s socketmap timeout; got {timeout:g}",
        )
    return PolicyServerConfig(listen=listen, map_name=name, lookup_timeout=timeout)


def read_http_server(h: _Section) -> HttpServerConfig:
    listen = tuple(
        parse_hostport(x, None, lambda m: h.err("listen", m), allow_zero=True)
        for x in h.strings("listen", ())
    )
    cfg = HttpServerConfig(
        listen=listen,
        tls_cert=h.path_value("tls_cert", None),
        tls_key=h.path_value("tls_key", None),
    )
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise h.err(
            "tls_key" if cfg.tls_key is None else "tls_cert", "tls_cert and tls_key go together"
        )
    for key in ("tls_cert", "tls_key"):
        fp = getattr(cfg, key)
        if fp is not None and not fp.is_file():
            raise h.err(key, f"file not found: {fp}")
    return cfg


def read_dkim_sign(
    p: Path, raw: Any, tlsrpt: TlsRptConfig, hostname: str = ""
) -> tuple[DkimSignConfig, ...]:
    """``[[dkim.sign]]`` entries, then ``[tlsrpt] dkim_private_key`` as one more entry for
    the submitter domain (its alias; the submitter defaults to the server's hostname, as
    the reports' From does)."""
    if not isinstance(raw, dict):
        raise ConfigError(str(p), "dkim", "must be a table")
    for k in raw:
        if k != "sign":
            raise ConfigError(str(p), f"dkim.{k}", "unknown key")
    entries = raw.get("sign", [])
    if not isinstance(entries, list):
        raise ConfigError(str(p), "dkim.sign", "must be an array of tables ([[dkim.sign]])")
    out: list[DkimSignConfig] = []
    for i, entry in enumerate(entries):
        s = _Section(p, f"dkim.sign[{i}]", entry, _KNOWN["dkim.sign"])
        domain = s.get("domain", str, "").lower().rstrip(".")
        if not _DOMAIN.fullmatch(domain):
            raise s.err("domain", f"must be a domain name; got {domain!r}")
        selector = s.get("selector", str, "")
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", selector):
            raise s.err("selector", f"must be a selector name; got {selector!r}")
        key = s.path_value("private_key", None)
        if key is None:
            raise s.err("private_key", "required")
        if not key.is_file():
            raise s.err("private_key", f"file not found: {key} (create one with `relay keygen`)")
        out.append(DkimSignConfig(domain, selector, key))
    submitter = (tlsrpt.submitter or hostname).lower().rstrip(".")
    if tlsrpt.dkim_private_key is not None and tlsrpt.dkim_selector and submitter:
        out.append(DkimSignConfig(submitter, tlsrpt.dkim_selector, tlsrpt.dkim_private_key))
    return tuple(out)


_USER_NAME = re.compile(r"[^\x00-\x20\x7f:]{1,255}")
_SENDER = re.compile(r"<>|\*|(\*|[^\x00-\x20\x7f@<>]+)@[^\x00-\x20\x7f@<>]+")


def read_submission(s: _Section, server: ServerConfig, storage: StorageConfig) -> SubmissionConfig:
    """``[submission]`` and its ``[submission.users."NAME"]`` tables. User names are
    case-insensitive (kept lower-cased); AUTH is only ever offered over TLS, so a
    listener needs ``server.tls_cert``."""

    def addresses(key: str) -> tuple[HostPort, ...]:
        def bad(problem: str) -> ConfigError:
            return s.err(key, problem)

        return tuple(parse_hostport(x, None, bad, allow_zero=True) for x in s.strings(key, ()))

    listens = {key: addresses(key) for key in ("listen", "implicit_tls_listen")}
    cfg = SubmissionConfig(
        listen=listens["listen"],
        implicit_tls_listen=listens["implicit_tls_listen"],
        users_file=s.path_value("users_file", None) or storage.path.parent / "submission-users",
        max_failures=s.positive("max_failures", int, 5, 1),
        failure_window=s.positive("failure_window", float, 900.0, 1.0),
        lockout=s.positive("lockout", float, 900.0, 0.0),
        failure_delay=s.positive("failure_delay", float, 1.0, 0.0),
        users=read_submission_users(s),
    )
    if cfg.enabled and server.tls_cert is None:
        key = "listen" if cfg.listen else "implicit_tls_listen"
        raise s.err(key, "needs server.tls_cert and server.tls_key (AUTH is offered over TLS only)")
    return cfg


def read_submission_users(s: _Section) -> dict[str, SubmissionUser]:
    """``[submission.users."NAME"]`` tables inside ``[submission]`` (names lower-cased)."""
    users_raw = s.data.get("users", {})
    if not isinstance(users_raw, dict):
        raise s.err("users", 'must be tables: [submission.users."alice@example.org"]')
    users: dict[str, SubmissionUser] = {}
    for name, table in users_raw.items():
        if not _USER_NAME.fullmatch(name):
            raise s.err(f"users.{name}", "a user name has no spaces, control characters or ':'")
        u = _Section(s.path, f"submission.users.{name}", table, _KNOWN["submission.users"])
        senders = tuple(x.lower() for x in u.strings("senders", ()))
        for x in senders:
            if not _SENDER.fullmatch(x):
                raise u.err("senders", f"not an address, *@domain, * or <>: {x!r}")
        if name.lower() in users:
            raise s.err(f"users.{name}", "defined twice (user names are case-insensitive)")
        users[name.lower()] = SubmissionUser(senders)
    return users


def read_logging(lg: _Section) -> LoggingConfig:
    return LoggingConfig(
        level=lg.choice("level", "info", ("debug", "info", "warning", "error")),
        format=lg.choice("format", "auto", ("auto", "json", "console")),
    )


# ---------------------------------------------------------------- writing (labs, tests)


def toml_value(v: Any, other: Callable[[Any], str] | None = None) -> str:
    """``v`` as a TOML value: a boolean, number, string or array of them; anything else
    is written by ``other`` (``relay config show``'s inline tables), TypeError without."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x, other) for x in v) + "]"
    if other is not None:
        return other(v)
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_key(k: str) -> str:
    """``k`` as a TOML key: bare when it can be, else quoted."""
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def dump_toml(doc: dict[str, dict[str, Any]]) -> str:
    """The subset of TOML a config needs: tables of scalars and lists; a table value that
    is a table is a sub-table (``[lists."dev@x"]``), one that is a list of tables an array
    of tables (``[[dkim.sign]]``)."""
    lines = []
    for section, table in doc.items():
        scalars = {k: v for k, v in table.items() if not _is_tables(v)}
        if scalars or not table:
            lines.append(f"[{section}]")
            lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append(dump_toml({f"{section}.{toml_key(k)}": v}))
            elif _is_tables(v):
                for entry in v:
                    lines.append(f"[[{section}.{toml_key(k)}]]")
                    lines.extend(f"{toml_key(a)} = {toml_value(b)}" for a, b in entry.items())
                    lines.append("")
    return "\n".join(lines)


def _is_tables(v: Any) -> bool:
    return isinstance(v, dict) or (
        isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
    )


def write_config(path: Path, doc: dict[str, dict[str, Any]]) -> Config:
    """Write doc as a config file at path and load it the ordinary way (labs, tests)."""
    path.write_text(dump_toml(doc))
    return load_config(path)
