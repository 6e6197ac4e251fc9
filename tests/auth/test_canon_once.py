"""canonical_body: dkimpy's body canonicalisation, remembered for the same body."""

from __future__ import annotations

from dkim.canonicalization import CanonicalizationPolicy

from relay.auth.fastrsa import canonical_body

RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
SIMPLE = CanonicalizationPolicy.from_c_value(b"simple/simple")
BODY = b"Hello  \t world \r\n\r\nsecond line\t\r\n\r\n\r\n"


def test_same_as_dkimpy_for_each_algorithm_in_turn() -> None:
    for _ in range(2):  # the second pass is served from the remembered result
        for policy in (RELAXED, SIMPLE, RELAXED):
            assert canonical_body(policy, BODY) == policy.canonicalize_body(BODY)


def test_a_different_body_is_not_served_the_last_result() -> None:
    first = canonical_body(RELAXED, BODY)
    other = BODY.replace(b"world", b"there")
    assert canonical_body(RELAXED, other) == RELAXED.canonicalize_body(other) != first
    assert canonical_body(RELAXED, b"") == RELAXED.canonicalize_body(b"")
