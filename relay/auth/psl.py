"""Organizational Domain (RFC 7489 section 3.2) from the Public Suffix List.

The list is the one shipped inside the ``publicsuffixlist`` package (ICANN and private
sections); it is never fetched at run time. Names are compared in A-label form; a name
given in U-labels gets its answer in U-labels.
"""

from __future__ import annotations

from functools import lru_cache

from publicsuffixlist import PublicSuffixList


@lru_cache(maxsize=1)
def _list() -> PublicSuffixList:
    return PublicSuffixList()


def _to_ascii(label: str) -> str | None:
    if label.isascii():
        return label
    try:
        return label.encode("idna").decode("ascii")
    except UnicodeError:
        return None


@lru_cache(maxsize=4096)
def registrable_domain(name: str | None) -> str | None:
    """The public suffix plus one label (lower case), or None when name is empty, starts
    with a dot, is itself a public suffix, or cannot be encoded."""
    if not name:
        return None
    name = name.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or name.startswith(".") or ".." in name:
        return None
    labels = name.split(".")
    ascii_labels = [_to_ascii(label) for label in labels]
    if any(a is None or not a for a in ascii_labels):
        return None
    ascii_name = ".".join(a for a in ascii_labels if a)
    found = _list().privatesuffix(ascii_name)
    if found is None:
        return None
    count = found.count(".") + 1
    return ".".join(labels[-count:])


def org_domain(name: str) -> str:
    """RFC 7489 Organizational Domain of name; a public suffix (or an unusable name) is its
    own Organizational Domain."""
    clean = name.strip().lower().rstrip(".")
    return registrable_domain(clean) or clean
