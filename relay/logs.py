"""structlog set-up (JSON lines in production, pretty on a terminal) and mail-event helpers.

Formats: ``json`` (one object a line), ``console`` (aligned, coloured only when the stream
is a terminal), ``auto`` (console on a terminal, else json), ``plain`` (the CLI's: one
uncoloured line ``relay: warning: event key=value`` per warning, on stderr).
``bind_process(worker)`` puts the worker id and pid on every line of this process.

Every line about a message carries its queue id (``qid``).

``get(name)`` gives a logger that builds its structlog logger once per ``setup()`` (not
at every call, as structlog's lazy proxy does when loggers are not cached), so a hot path
pays for its log lines only; ``enabled(logger, level)`` lets a caller skip building the
fields of a line that would be dropped.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Stderr:
    """sys.stderr looked up at each write (it may be replaced, e.g. under a test runner)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _LineLogger:
    """Writes each rendered line, newline included, in ONE write call, so that worker
    processes sharing stderr never interleave halves of their lines (print() writes the
    text and the newline separately)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        self._stream.write(message + "\n")
        self._stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


_generation = 0  # bumped by setup(): cached loggers are rebuilt after a reconfiguration


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    global _generation
    _generation += 1
    # sys.stderr itself is looked up at each write: a command run in process (tests) may
    # be handed a stderr that is replaced and closed after it returns
    stream = _Stderr() if stream is None or stream is sys.stderr else stream
    tty = bool(stream.isatty())
    use_json = fmt == "json" or (fmt == "auto" and not tty)
    renderer: Any
    if fmt == "plain":
        renderer = plain_renderer
    elif use_json:
        renderer = json_renderer
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
    stamp = [] if fmt == "plain" else [iso_utc_stamper]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=lambda *_args: _LineLogger(stream),
        cache_logger_on_first_use=False,
    )


_stamp_second = -1
_stamp_prefix = ""


def iso_utc_stamper(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``timestamp``: ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso",
    utc=True) writes it ("2026-12-02T18:17:15.025522Z"), with the date part formatted once
    a second instead of at every line (a line costs ~45 us with structlog's own stamper and
    renderer; hot paths log three lines a message)."""
    global _stamp_second, _stamp_prefix
    now = time.time()
    second = int(now)
    if second != _stamp_second:
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_second = second
    event["timestamp"] = f"{_stamp_prefix}.{int((now - second) * 1e6):06d}Z"
    return event


_ENCODER = json.JSONEncoder(default=repr)


def json_renderer(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
    """One JSON object, exactly as structlog's JSONRenderer writes it (json.dumps, values
    JSON cannot hold as their repr), through one encoder built once."""
    return _ENCODER.encode(event)


def plain_renderer(_logger: Any, _name: str, event: dict[str, Any]) -> str:
    """``relay: warning: store_reclaim_failed error=...``: one line, no colour, no JSON."""
    level = event.pop("level", "info")
    text = str(event.pop("event", ""))
    exc = event.pop("exception", None)
    fields = " ".join(f"{k}={v}" for k, v in event.items())
    line = f"relay: {level}: {text}" + (f" {fields}" if fields else "")
    if exc:
        line += " | " + " ".join(str(exc).split())
    return line.replace("\n", " ")


def bind_process(worker: int) -> None:
    """Every line this process logs from now on carries its worker id and pid."""
    import os

    structlog.contextvars.bind_contextvars(worker=worker, pid=os.getpid())


class Logger:
    """A structlog logger for ``name``, resolved once per configuration."""

    __slots__ = ("_name", "_gen", "_logger")

    def __init__(self, name: str) -> None:
        self._name = name
        self._gen = -1
        self._logger: Any = None

    def _get(self) -> Any:
        if self._gen != _generation:
            self._logger = structlog.get_logger(self._name).bind()
            self._gen = _generation
        return self._logger

    def __getattr__(self, item: str) -> Any:
        return getattr(self._get(), item)

    def bind(self, **kw: Any) -> Any:
        return self._get().bind(**kw)

    def is_enabled_for(self, level: int) -> bool:
        return enabled(self._get(), level)


def enabled(logger: Any, level: int) -> bool:
    """Would ``logger`` emit a line at ``level`` (a logging.* number)?"""
    check = getattr(logger, "is_enabled_for", None)
    return True if check is None else bool(check(level))


def get(name: str) -> Logger:
    return Logger(name)
