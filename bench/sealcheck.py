"""Check on copies the next hop really received that a system did the authentication work.

Before a system's first measured round, a few of the bench's DKIM-signed messages go
through it to ``user@probe.test``; that domain's mail reaches a second smtp-sink that dumps
each message to a file (``smtp-sink -d``). Each copy is then checked with dkimpy, the
reference implementation, with DNS answered from the bench's lab zone:

- its newest ARC set verifies (``dkim.arc_verify``: the chain is ``pass``, which for an
  i=1 set means its AMS and its AS with cv=none verify) and was sealed by the expected
  domain;
- it carries an ``Authentication-Results`` header with spf=pass, dkim=pass and
  dmarc=pass, so the verdicts were computed, not skipped.

A system that fails this is not doing the work it is measured for: the bench stops with
the reason (``SealCheckError``).
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path

import dkim

from relay.lab.dnsserver import Zone
from relay.lab.postfix import SMTP_SINK, wait_port

PROBE_RCPT = "user@probe.test"
_ENVELOPE = (b"X-Client-Addr:", b"X-Client-Proto:", b"X-Helo-Args:", b"X-Mail-Args:")
_RESULT = re.compile(r"\b(spf|dkim|dmarc)=([a-z]+)", re.IGNORECASE)
_TAG_D = re.compile(r"\bd=([^;\s]+)")
_TAG_I = re.compile(r"\bi=(\d+)")


class SealCheckError(RuntimeError):
    """A system's copies show that it did not seal or did not compute its verdicts."""


@dataclass(frozen=True)
class CopyCheck:
    """What one received copy shows."""

    arc_cv: str  # dkimpy's chain validation: pass, fail, none
    arc_reason: str
    seal_domain: str  # d= of the newest ARC-Seal ("" if none)
    seal_instance: int  # its i= (0 if none)
    auth_results: tuple[str, ...]  # Authentication-Results values, unfolded

    def verdicts(self) -> dict[str, str]:
        """method -> result from the first Authentication-Results header."""
        if not self.auth_results:
            return {}
        return {m.lower(): r.lower() for m, r in _RESULT.findall(self.auth_results[0])}


def txt_lookup(zone: Zone) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering TXT queries from ``zone``."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        key = name.decode().rstrip(".").lower()
        with zone.lock:
            records = list(zone.records.get(key, []))
        for rdtype, value in records:
            if rdtype == "TXT":
                return ("".join(value) if isinstance(value, list) else str(value)).encode()
        return None

    return dnsfunc


def from_dump(data: bytes) -> bytes:
    """The message as received, from an ``smtp-sink -d`` file: without the envelope lines
    and the Received header smtp-sink puts first, and with CRLF line ends again."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    i = 0
    while i < len(lines) and lines[i].startswith((*_ENVELOPE, b"X-Rcpt-Args:")):
        i += 1
    if i < len(lines) and lines[i].startswith(b"Received:"):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


def check_copy(raw: bytes, zone: Zone) -> CopyCheck:
    headers = BytesHeaderParser().parsebytes(raw)

    def values(name: str) -> list[str]:
        return [" ".join(str(v).split()) for v in headers.get_all(name, [])]

    seals = values("ARC-Seal")
    newest = max(seals, key=lambda s: int(m.group(1)) if (m := _TAG_I.search(s)) else 0, default="")
    d = _TAG_D.search(newest)
    i = _TAG_I.search(newest)
    cv, _results, reason = dkim.arc_verify(raw, dnsfunc=txt_lookup(zone))
    return CopyCheck(
        arc_cv=cv.decode() if isinstance(cv, bytes) else str(cv),
        arc_reason=str(reason),
        seal_domain=d.group(1) if d else "",
        seal_instance=int(i.group(1)) if i else 0,
        auth_results=tuple(values("Authentication-Results")),
    )


def problems(check: CopyCheck, seal_domain: str) -> list[str]:
    """Why a copy does not show the work done ([] when it does)."""
    out = []
    if check.seal_instance == 0:
        out.append("no ARC-Seal")
    elif check.arc_cv != "pass":
        out.append(f"ARC chain {check.arc_cv} ({check.arc_reason})")
    if check.seal_instance and check.seal_domain != seal_domain:
        out.append(f"sealed by {check.seal_domain!r}, expected {seal_domain!r}")
    if not check.auth_results:
        out.append("no Authentication-Results")
    else:
        got = check.verdicts()
        for method in ("spf", "dkim", "dmarc"):
            if got.get(method) != "pass":
                out.append(f"{method}={got.get(method, 'missing')} in A-R")
    return out


def catch_copies(
    system: tuple[str, int],
    probe: tuple[str, int],
    messages: list[bytes],
    timeout: float = 60.0,
) -> list[bytes]:
    """Send ``messages`` through ``system`` to PROBE_RCPT; the copies a dumping smtp-sink on
    ``probe`` received (in arrival order; fewer than sent when ``timeout`` passed)."""
    dump = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    dump.chmod(0o777)
    sink = subprocess.Popen(
        [SMTP_SINK, "-u", "postfix", "-d", f"{dump}/%H%M%S.", f"{probe[0]}:{probe[1]}", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_port(*probe)
        for raw in messages:
            with smtplib.SMTP(system[0], system[1], timeout=30) as s:
                s.sendmail("bench@sender.test", [PROBE_RCPT], raw)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(list(dump.iterdir())) >= len(messages):
                break
            time.sleep(0.1)
        time.sleep(0.3)  # let the last file be closed
        files = sorted(dump.iterdir(), key=lambda p: p.stat().st_mtime)
        return [from_dump(p.read_bytes()) for p in files]
    finally:
        sink.terminate()
        sink.wait(5)
        shutil.rmtree(dump, ignore_errors=True)


def verify_system(
    name: str,
    system: tuple[str, int],
    probe: tuple[str, int],
    messages: list[bytes],
    zone: Zone,
    seal_domain: str,
) -> dict[str, object]:
    """Catch copies of ``messages`` through ``system`` and check each; raise
    SealCheckError naming the system and the first problem when any copy fails."""
    copies = catch_copies(system, probe, messages)
    if len(copies) < len(messages):
        raise SealCheckError(
            f"{name}: only {len(copies)} of {len(messages)} probe messages reached the probe sink"
        )
    checks = [check_copy(raw, zone) for raw in copies]
    for n, check in enumerate(checks):
        found = problems(check, seal_domain)
        if found:
            raise SealCheckError(
                f"{name} did not do the authentication work on probe copy {n + 1}: "
                + "; ".join(found)
                + f"\n  Authentication-Results: {check.auth_results}"
            )
    first = checks[0]
    return {
        "copies": len(checks),
        "arc_cv": [c.arc_cv for c in checks],
        "seal": f"i={first.seal_instance} d={first.seal_domain}",
        "authentication_results": list(first.auth_results),
    }
