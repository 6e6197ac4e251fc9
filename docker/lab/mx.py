"""The container lab's good MX: relay.lab.mta.LabMta with STARTTLS, printing each message
it receives (envelope and whether TLS was used). Runs until SIGTERM."""

import argparse
import asyncio
import signal
import ssl

from relay.lab.mta import LabMta


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="0.0.0.0:2525")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)
    mta = await LabMta(host, int(port), tls_context=ctx, hostname="mx.lab").start()
    print(f"mx: listening on {host}:{mta.port} with STARTTLS", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    seen = 0
    while not stop.is_set():
        for m in mta.messages[seen:]:
            tls = m.tls_version or "CLEAR TEXT"
            print(f"mx: from {m.peer} <{m.mail_from}> -> {list(m.rcpt_tos)} over {tls}", flush=True)
        seen = len(mta.messages)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass
    await mta.stop()


asyncio.run(main())
