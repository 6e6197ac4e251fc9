"""The README's table of stable `relay check` ids lists exactly the ids the code can emit:
every ``Finding(...)`` built in relay/check/ and relay/commands/check.py, read from the
source with ``ast`` (so an id that is not a string literal fails here too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((ROOT / "relay" / "check").glob("*.py")), ROOT / "relay/commands/check.py"]
ID = re.compile(r"`([a-z]+\.[a-z_]+)`")


def emitted_ids() -> dict[str, str]:
    """id -> the file:line that builds it."""
    found: dict[str, str] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Finding"):
                continue
            arg = node.args[1] if len(node.args) > 1 else None
            arg = arg or next((k.value for k in node.keywords if k.arg == "id"), None)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), (
                f"{where}: the check id must be a string literal"
            )
            found[arg.value] = where
    return found


def readme_ids() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("Check ids (stable):", 1)[1].split("\n\n", 2)[1]
    ids: list[str] = []
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) >= 3 and not set(cells[1].strip()) <= {"-", " "}:
            ids += ID.findall(cells[2])
    return ids


def test_every_finding_in_the_code_is_found() -> None:
    ids = emitted_ids()
    # the source really is read: one id of every area, including fetch.py's own
    for i in ("mx.dnssec_bogus", "spf.ok", "dmarc.found", "probe.old_tls", "dane.dns_failed"):
        assert i in ids
    assert len(ids) > 60


def test_readme_table_lists_exactly_the_emitted_ids() -> None:
    listed = readme_ids()
    assert len(listed) == len(set(listed)), "an id listed twice"
    emitted = emitted_ids()
    missing = {i: w for i, w in emitted.items() if i not in listed}
    extra = sorted(set(listed) - set(emitted))
    assert not missing, f"emitted but not in the README table: {missing}"
    assert not extra, f"in the README table but never emitted: {extra}"
