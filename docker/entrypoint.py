"""Container entry point: `relay serve` on /etc/relay/config.toml, with the networks that
may relay taken from RELAY_TRUSTED_NETWORKS (comma-separated) when it is set.

The shipped docker/config.toml trusts no network; the variable (or a mounted config) is
the operator's explicit choice. The merged config is written to $RELAY_RUNTIME_CONFIG
(default /tmp/relay-config.toml) and validated by the relay like any other config: a bad
network is one line and exit 2.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path


def render(config: Path, networks: str, out: Path) -> Path:
    from relay.config import dump_toml

    doc = tomllib.loads(config.read_text(encoding="utf-8"))
    nets = [n.strip() for n in networks.split(",") if n.strip()]
    doc.setdefault("relay", {})["trusted_networks"] = nets
    out.write_text(dump_toml(doc), encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    config = Path(os.environ.get("RELAY_CONFIG", "/etc/relay/config.toml"))
    networks = os.environ.get("RELAY_TRUSTED_NETWORKS", "")
    if networks.strip():
        out = Path(os.environ.get("RELAY_RUNTIME_CONFIG", "/tmp/relay-config.toml"))
        config = render(config, networks, out)
    args = argv or ["serve", "--config", str(config)]
    os.execvp("relay", ["relay", *args])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
