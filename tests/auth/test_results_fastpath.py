"""relay.auth.results' fast paths: the remembered authserv-id rendering is the fresh one
(a bad id still raises on every call); comments, reasons and quoted-strings of printable
ASCII text come out as the per-character filters made them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth.results import MAX_VALUE, REASON_MAX, _authserv, _comment, _quoted, _reason


@pytest.mark.parametrize("authserv_id", ["relay.example.net", "Relay.Example.NET.", "x y", "a"])
def test_remembered_authserv_id_is_the_fresh_rendering(authserv_id: str) -> None:
    assert _authserv(authserv_id) == _authserv.__wrapped__(authserv_id)
    assert _authserv(authserv_id) == _authserv.__wrapped__(authserv_id)


def test_an_unwritable_authserv_id_raises_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot be written"):
            _authserv("bad\r\nid")


def reference_quoted(text: str) -> str | None:
    if len(text) > MAX_VALUE or not all(0x20 <= ord(c) < 0x7F for c in text):
        return None
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def reference_comment(text: str) -> str:
    clean = "".join(c for c in text if 0x20 <= ord(c) < 0x7F and c not in "()\\")
    return f"({clean.strip()})" if clean.strip() else ""


def reference_reason(text: str) -> str:
    clean = "".join(c for c in text if 0x20 <= ord(c) < 0x7F)[:REASON_MAX]
    q = reference_quoted(clean)
    return f"reason={q}" if clean and q else ""


texts = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(["a", " ", "(", ")", "\\", '"', "\t", "\x7f", "é", "~", "p=x"])).map(
        "".join
    ),
)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_comment_reason_and_quoted_strings_are_the_per_character_versions(text: str) -> None:
    assert _comment(text) == reference_comment(text)
    assert _reason(text) == reference_reason(text)
    assert _quoted(text) == reference_quoted(text)
