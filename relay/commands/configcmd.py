"""`relay config show [--all]` and `relay config check`: the configuration as the relay sees it.

``show`` prints, as TOML, the keys the file sets with the values the relay uses after
parsing (paths made absolute, ``workers = 0`` resolved), like ``postconf -n``; ``--all``
adds every other key with its default, like ``postconf``. Secrets (any key whose name
says secret or password, except the name of a file holding one) are printed as
``"********"``. ``check`` validates the file and everything it names (keys, certificates,
the SRS secret, the store directory: the checks `relay serve` makes before it starts)
without starting anything, like ``postfix check``: ``config OK`` and exit 0, else one
line naming the file, the key and the problem, and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import ipaddress
import json
import tomllib
from pathlib import Path
from typing import Any

from relay.config import Config, HostPort, load_config, toml_key, toml_value

MASK = "********"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="show or check the configuration")
    cs = p.add_subparsers(dest="config_command", required=True)
    show = cs.add_parser("show", help="print the effective configuration (secrets masked)")
    show.add_argument("--config", required=True, help="config.toml")
    show.add_argument("--all", action="store_true", help="every key, with the defaults")
    show.set_defaults(func=run_show)
    chk = cs.add_parser("check", help="validate the configuration without starting")
    chk.add_argument("--config", required=True, help="config.toml")
    chk.set_defaults(func=run_check)


def is_secret(key: str) -> bool:
    """A key whose value is a secret itself (not the path of a file that holds one)."""
    k = key.lower()
    if k.endswith(("_file", "_path")):
        return False
    return "secret" in k or "password" in k


def plain(value: Any) -> Any:
    """A config value as TOML can write it."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, HostPort):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, tuple | list | frozenset | set):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if value is None:
        return ""  # TOML has no null; the config reads "" as "not set"
    return value


def effective(config: Config, set_keys: dict[str, set[str]] | None) -> dict[str, Any]:
    """{section: {key: value}} of the parsed config; with set_keys only those keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name == "path":
            continue
        value = getattr(config, f.name)
        table = plain(value)
        if not isinstance(table, dict):
            continue
        if set_keys is not None:
            if f.name not in set_keys:
                continue
            if dataclasses.is_dataclass(value):  # a plain table (aliases) is shown whole
                table = {k: v for k, v in table.items() if k in set_keys[f.name]}
        out[f.name] = _mask(table)
    return out


def _mask(table: dict[str, Any]) -> dict[str, Any]:
    masked: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            masked[k] = _mask(v)
        elif is_secret(k) and v not in ("", None):
            masked[k] = MASK
        else:
            masked[k] = v
    return masked


def keys_set(path: Path) -> dict[str, set[str]]:
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    return {s: set(t) if isinstance(t, dict) else set() for s, t in doc.items()}


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """TOML for the config's shape: tables of scalars, lists and sub-tables."""
    lines: list[str] = []
    subs: list[tuple[str, dict[str, Any]]] = []
    for section, table in doc.items():
        name = f"{prefix}{toml_key(section)}"
        lines.append(f"[{name}]")
        for k, v in table.items():
            if isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()) and v:
                subs.append((f"{name}.{toml_key(k)}", v))
            else:
                lines.append(f"{toml_key(k)} = {_value(v)}")
        lines.append("")
    text = "\n".join(lines)
    for name, nested in subs:
        text += to_toml(nested, prefix=f"{name}.")
    return text


def _value(v: Any) -> str:
    return toml_value(v, _inline)


def _inline(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def run_show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    doc = effective(config, None if args.all else keys_set(config.path))
    print(f"# {config.path}" + (" (every key, defaults included)" if args.all else ""))
    print(to_toml(doc), end="")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from relay import preflight

    config = load_config(args.config)
    preflight.check(config)
    print(f"config OK: {config.path}")
    return 0
