"""CPU time and memory of a process tree, read from /proc (Linux).

CPU: utime + stime of every live process in the tree plus cutime + cstime (children
that exited and were reaped inside the tree), so the difference of two snapshots is the
CPU the tree used in between, including short-lived processes (Postfix's smtpd, smtp).
Memory: a sampler thread records the peak of the summed RSS and of the summed PSS
(proportional set size: shared pages divided among the processes that map them, the
fairer figure for Postfix's many small processes). RSS comes from /proc/PID/statm every
half second (cheap); PSS from /proc/PID/smaps_rollup only every 5 s and at the end,
because the kernel walks every page of a process to sum it: for rspamd's three
processes (about 500 MB resident) one such read cost ~60 ms of CPU, which at four
samples a second took a quarter of a core from the system being measured here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from relay.lab.postfix import descendants

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree(root: int) -> list[int]:
    return [root, *descendants(root)]


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime + cutime + cstime summed over ``pids``."""
    ticks = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is None:
            continue
        # after "pid (comm)": state=0 ... utime=11 stime=12 cutime=13 cstime=14
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / _TICK


def context_switches(pids: list[int]) -> int:
    """Voluntary + involuntary context switches of ``pids`` (every thread): how often the
    processes slept and woke, a cost that grows as a load is split over more of them."""
    n = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if "ctxt_switches:" in line:
                    n += int(line.split()[-1])
    return n


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(summed RSS, summed PSS) in KiB."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def rss_kib(pids: list[int]) -> int:
    """Summed RSS in KiB from /proc/PID/statm (no page walk)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE_KIB
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakMemory:
    """Samples the tree's memory in a thread and keeps the peak: RSS every ``interval``
    seconds, PSS every ``pss_every`` samples and once more at the end."""

    def __init__(
        self, pids: Callable[[], list[int]], interval: float = 0.5, pss_every: int = 10
    ) -> None:
        self.pids = pids
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self._n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self, pss: bool | None = None) -> None:
        pids = self.pids()
        if pss is None:
            pss = self._n % self.pss_every == 0
        self._n += 1
        if pss:
            rss, pss_kib = memory_kib(pids)
            self.peak_pss_kib = max(self.peak_pss_kib, pss_kib)
        else:
            rss = rss_kib(pids)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_processes = max(self.peak_processes, len(pids))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(pss=True)


def now() -> float:
    return time.monotonic()
