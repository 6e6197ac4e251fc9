"""Builds the intake transforms (authentication verdict, ARC seal) and SRS routing from Config."""

from __future__ import annotations

from typing import Any

from relay.config import Config
from relay.dns import Resolver
from relay.intake import Routing, Transform


def build_auth(config: Config, resolver: Resolver) -> tuple[list[Transform], Routing, Any]:
    return [], Routing(local_domains=config.relay.local_domains), None
