"""Every key the config reader accepts is documented: in docs/contract.md (with its type
and default, under its section) and in the README's configuration table; the README does
not send readers to files outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.config import _KNOWN

ROOT = Path(__file__).parent.parent
KEYS = [(section, key) for section, keys in _KNOWN.items() for key in sorted(keys)]


def _contract_section(section: str) -> str:
    text = (ROOT / "docs" / "contract.md").read_text()
    start = text.index(f"### [{section}]")
    end = text.find("\n### ", start + 1)
    return text[start : end if end > 0 else None]


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


@pytest.mark.parametrize(("section", "key"), KEYS)
def test_every_key_is_in_the_contract_with_type_and_default(section: str, key: str) -> None:
    rows = [r for r in _contract_section(section).splitlines() if r.startswith("| ")]
    row = next((r for r in rows if re.search(rf"`{re.escape(key)}`", _cells(r)[0])), None)
    assert row is not None, f"{section}.{key} is not in docs/contract.md"
    cells = _cells(row)
    assert len(cells) == 4 and all(cells[:3]), row  # key, type, default, meaning


@pytest.mark.parametrize(("section", "key"), KEYS)
def test_every_key_is_in_the_readme_table(section: str, key: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"`{section}.{key}`" in readme, f"{section}.{key} missing from the README"


def test_readme_points_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    assert "docs/contract.md" in readme
