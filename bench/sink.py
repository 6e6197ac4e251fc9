"""The delivery sink: Postfix's smtp-sink on a loopback port, counting messages.

``smtp-sink -c`` prints running counters (``sess=N quit=N mesg=N``, each ended by CR) on
stdout; a reader thread parses them, so the benchmark knows when every message has
arrived and when the last one did.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

from relay.lab.postfix import SMTP_SINK, wait_port

_MESG = re.compile(rb"mesg=(\d+)")


class Sink:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.count = 0
        self.last_change = 0.0
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> Sink:
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-c", "-u", "postfix", "-m", "1024", f"{self.host}:{self.port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            bufsize=0,
        )
        self._reader = threading.Thread(target=self._read, name="sink-reader", daemon=True)
        self._reader.start()
        wait_port(self.host, self.port)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read(4096)
            if not chunk:
                return
            buf += chunk
            *done, buf = buf.split(b"\r")
            counts = [int(m.group(1)) for line in done if (m := _MESG.search(line))]
            if counts:
                with self._cond:
                    if counts[-1] != self.count:
                        self.count = counts[-1]
                        self.last_change = time.monotonic()
                    self._cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` messages have arrived in all; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._reader is not None:
            self._reader.join(5)

    def cpu_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None
