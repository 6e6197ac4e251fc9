"""Crash points for the kill -9 tests: inert unless RELAY_TEST_CRASH_AT names one.

``RELAY_TEST_CRASH_AT=after_fail_commit`` kills the process with SIGKILL right after an
attempt's failures are committed and before their DSN is queued, the window a crash-safe
queue must survive; ``lists_prepared`` right before intake writes a message that has
list and other recipients. Read once at import; nothing else in the relay reads it.
"""

from __future__ import annotations

import os
import signal

from relay import logs

log = logs.get("relay.queue")

CRASH_AT = os.environ.get("RELAY_TEST_CRASH_AT", "")

AFTER_FAIL_COMMIT = "after_fail_commit"
# intake: the list recipients' part of a message is ready (not yet written), before the
# one write that stores it with the message's other recipients
LISTS_PREPARED = "lists_prepared"


def crash_point(name: str, **context: object) -> None:
    """SIGKILL this process when the test environment asked to crash at ``name``."""
    if CRASH_AT and CRASH_AT == name:
        log.warning("test_crash_point", point=name, **context)
        os.kill(os.getpid(), signal.SIGKILL)
