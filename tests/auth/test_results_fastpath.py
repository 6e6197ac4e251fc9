"""relay.auth.results: the remembered authserv-id rendering is the fresh one, and a bad
id still raises on every call."""

from __future__ import annotations

import pytest

from relay.auth.results import _authserv


@pytest.mark.parametrize("authserv_id", ["relay.example.net", "Relay.Example.NET.", "x y", "a"])
def test_remembered_authserv_id_is_the_fresh_rendering(authserv_id: str) -> None:
    assert _authserv(authserv_id) == _authserv.__wrapped__(authserv_id)
    assert _authserv(authserv_id) == _authserv.__wrapped__(authserv_id)


def test_an_unwritable_authserv_id_raises_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot be written"):
            _authserv("bad\r\nid")
