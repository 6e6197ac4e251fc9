"""A lost outcome write no longer strands a recipient until a restart (in-process relay with
its real SMTP server, a real lab DNS server and a receiving MTA on loopback).

The receiving MTA tempfails the first RCPT; the store then fails every write for a moment,
so the outcome of that attempt is lost and the recipient stays in flight under the
relay's lease. The running relay's sweeper finds the expired lease and the message is
delivered, with no restart.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.lab.mta import LabMta, _Handler
from relay.model import RecipientState
from tests.e2e.test_core_e2e import Lab, queue_state
from tests.labutil import message, send


class TempfailOnceMta(LabMta):
    """Answers the first RCPT with 451, then accepts; remembers when it refused."""

    refused_at = 0.0

    def _factory(self) -> SMTP:
        proto = super()._factory()
        mta = self

        class Once(_Handler):
            async def handle_RCPT(
                self,
                server: SMTP,
                session: Session,
                envelope: Envelope,
                address: str,
                options: list[str],
            ) -> str:
                if not mta.refused_at:
                    mta.refused_at = time.monotonic()
                    return "451 4.3.0 try again later"
                return await super().handle_RCPT(server, session, envelope, address, options)

        once = Once(self)
        proto.event_handler = once
        proto._handle_hooks["RCPT"] = once.handle_RCPT  # aiosmtpd binds hooks at init
        return proto


async def test_lost_outcome_write_is_delivered_by_the_running_relay(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        mx = TempfailOnceMta("127.0.0.2", 0, hostname="mx.dest.test")
        await mx.start()
        lab.mtas["127.0.0.2"] = mx
        lab.port = mx.port
        lab.domain("dest.test", "mx.dest.test", "127.0.0.2")
        app = await lab.start_relay(delivery={"retry_first": 3600})
        assert app.scheduler is not None
        app.scheduler.lease = 1.0  # [queue] lease: sweeps every 1/3 s
        failed_writes = []

        def store_down() -> bool:  # every write for 0.3 s after the tempfail
            down = bool(mx.refused_at) and time.monotonic() - mx.refused_at < 0.3
            if down:
                failed_writes.append(1)
            return down

        app.store.fail_writes = store_down
        host, port = lab.relay_addr
        errors, _ = await send(host, port, "alice@sender.test", ["bob@dest.test"], message())
        assert errors == {}
        async with asyncio.timeout(5):
            while not failed_writes:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.35)
        # the deferral was never written: in flight under the lease, not deferred for 1 h
        assert [(a, s) for a, s, _ in await queue_state(lab)] == [
            ("bob@dest.test", RecipientState.INFLIGHT)
        ]
        [got] = await mx.wait_for(1, timeout=10)  # swept, loaded, delivered: no restart
        assert got.rcpt_tos == ("bob@dest.test",)
        async with asyncio.timeout(5):
            while await queue_state(lab):
                await asyncio.sleep(0.05)
    finally:
        await lab.close()
