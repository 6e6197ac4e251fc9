"""An authenticated session in the later stages: it may relay (RCPT rules), its
"TLS-Required: No" is honoured like a trusted client's, its Received says ESMTPSA and
the user, and the verdict stage does not refuse it on SPF/DMARC (Postfix's
permit_sasl_authenticated) but records auth=pass (RFC 8601 section 2.7.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.auth.pipeline import Authenticator
from relay.errors import SmtpReplyError
from relay.intake import honour_tls_required_no, received_header
from relay.message import ParsedMessage
from relay.model import ConnInfo, Envelope
from relay.smtp.rules import RELAY_DENIED, RelayRules
from tests.auth.test_pipeline_real import MESSAGE, _config, _resolver, keys
from tests.smtp.test_inbound_harness import make_config

__all__ = ["keys"]

STRANGER = ConnInfo(peer_ip="203.0.113.66", peer_port=1, helo="laptop.home")
ALICE = ConnInfo(
    peer_ip="203.0.113.66",
    peer_port=1,
    helo="laptop.home",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
    auth_user="alice@example.org",
)


def test_authenticated_may_relay_stranger_may_not(tmp_path: Path) -> None:
    rules = RelayRules(make_config(tmp_path))
    assert rules.check_rcpt(STRANGER, "bob@remote.test") == RELAY_DENIED
    assert rules.check_rcpt(ALICE, "bob@remote.test") is None
    assert not STRANGER.may_relay and ALICE.may_relay


def test_tls_required_no_honoured_for_authenticated() -> None:
    assert honour_tls_required_no("trusted", ALICE)
    assert not honour_tls_required_no("trusted", STRANGER)
    assert not honour_tls_required_no("never", ALICE)


def test_received_says_esmtpsa_and_the_user() -> None:
    env = Envelope("alice@example.org", ("bob@remote.test",))
    text = received_header(ALICE, env, "relay.test", "QID1", 0).decode()
    assert text.startswith("Received: from laptop.home ([203.0.113.66])\r\n")
    assert "\t(authenticated user alice@example.org)\r\n" in text
    assert "with ESMTPSA id QID1" in text
    plain = received_header(STRANGER, env, "relay.test", "Q", 0).decode()
    assert "with ESMTP id" in plain and "authenticated" not in plain
    utf8 = Envelope("alice@example.org", ("bob@remote.test",), smtputf8=True)
    assert "with UTF8SMTPSA id" in received_header(ALICE, utf8, "relay.test", "Q", 0).decode()


async def test_verdict_skips_dmarc_rejection_for_authenticated(keys: dict[str, Any]) -> None:
    auth = Authenticator(_config(()), _resolver(keys))
    env = Envelope(mail_from="ann@example.com", rcpt_tos=("x@example.net",))
    forged = b"Authentication-Results: relay.example.net; dmarc=pass\r\n" + MESSAGE
    with pytest.raises(SmtpReplyError):  # the same message from a stranger: refused
        await auth.judge(STRANGER, env, ParsedMessage.parse(forged))
    judged = await auth.judge(ALICE, env, ParsedMessage.parse(forged))
    raw = judged.message.raw
    assert raw.startswith(
        b"Authentication-Results: relay.example.net;\r\n\tauth=pass smtp.auth=alice@example.org\r\n"
    )
    assert b"dmarc=pass" not in raw  # the forged A-R is still removed
    assert judged.ar_value == "relay.example.net; auth=pass smtp.auth=alice@example.org"
