"""The baseline: a private Postfix (relay.lab.postfix) as a relay with a durable queue.

It accepts mail from 127.0.0.0/8 on its own loopback address and port and relays
everything to the sink. Postfix's defaults otherwise (queue files fsync'd before the 250,
connection caching, 20 parallel deliveries per destination, in_flow_delay 1s).

``probe``: mail for the domain ``probe.test`` goes to that ``(ip, port)`` instead (an
``inline:`` transport table; the rest goes to the relayhost, the sink), so that a few
copies can be caught by a dumping sink and checked (bench/sealcheck.py) without slowing
the measured sink.
"""

from __future__ import annotations

from relay.lab.postfix import PostfixInstance, PostfixSpec, free_port

PROBE_DOMAIN = "probe.test"


class PostfixSystem:
    name = "postfix"

    def __init__(
        self,
        host: str,
        sink: tuple[str, int],
        extra: dict[str, str],
        *,
        probe: tuple[str, int] | None = None,
        name: str = "bench-postfix",
    ) -> None:
        self.host = host
        self.port = free_port(host)
        settings = dict(extra)
        if probe is not None and "transport_maps" not in settings:
            # Not with the static: table of relay.lab.postfix: that one answers the full
            # address, which Postfix looks up in every table before the domain.
            # Everything else goes to the relayhost, the sink.
            settings["transport_maps"] = f"inline:{{{PROBE_DOMAIN}=smtp:[{probe[0]}]:{probe[1]}}}"
        spec = PostfixSpec(
            listen=(host, self.port),
            nexthop=sink,
            hostname="postfix.bench.test",
            smtp_tls_security_level="may",
            extra=settings,
        )
        self.instance = PostfixInstance(spec, name=name)

    def start(self) -> None:
        self.instance.start()

    def pids(self) -> list[int]:
        return self.instance.pids()

    def stop(self) -> None:
        self.instance.cleanup()

    def log_tail(self, n: int = 2000) -> str:
        return self.instance.log_text()[-n:]
