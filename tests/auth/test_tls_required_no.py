"""RFC 8689 section 5: whether "TLS-Required: No" is honoured is the operator's choice
(delivery.tls_required_no); by default only from trusted clients."""

from __future__ import annotations

import pytest

from relay.intake import honour_tls_required_no
from relay.model import ConnInfo

TRUSTED = ConnInfo(peer_ip="127.0.0.1", peer_port=1, trusted=True)
STRANGER = ConnInfo(peer_ip="203.0.113.9", peer_port=1)


@pytest.mark.parametrize(
    ("setting", "conn", "honoured"),
    [
        ("trusted", TRUSTED, True),
        ("trusted", STRANGER, False),
        ("all", STRANGER, True),
        ("all", TRUSTED, True),
        ("never", TRUSTED, False),
        ("never", STRANGER, False),
    ],
)
def test_the_setting_decides(setting: str, conn: ConnInfo, honoured: bool) -> None:
    assert honour_tls_required_no(setting, conn) is honoured
