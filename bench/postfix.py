"""The baseline: a private Postfix (relay.lab.postfix) as a relay with a durable queue.

It accepts mail from 127.0.0.0/8 on its own loopback address and port and relays
everything to the sink. Postfix's defaults otherwise (queue files fsync'd before the 250,
connection caching, 20 parallel deliveries per destination, in_flow_delay 1s).
"""

from __future__ import annotations

from relay.lab.postfix import PostfixInstance, PostfixSpec, free_port


class PostfixSystem:
    name = "postfix"

    def __init__(self, host: str, sink: tuple[str, int], extra: dict[str, str]) -> None:
        self.host = host
        self.port = free_port(host)
        spec = PostfixSpec(
            listen=(host, self.port),
            nexthop=sink,
            hostname="postfix.bench.test",
            smtp_tls_security_level="may",
            extra=extra,
        )
        self.instance = PostfixInstance(spec, name="bench-postfix")

    def start(self) -> None:
        self.instance.start()

    def pids(self) -> list[int]:
        return self.instance.pids()

    def stop(self) -> None:
        self.instance.cleanup()

    def log_tail(self, n: int = 2000) -> str:
        return self.instance.log_text()[-n:]
