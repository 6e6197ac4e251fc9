"""``relay lab run --html FILE``: one self-contained page, a row per scenario and a column
per mode, each cell green or red with the expectation, the outcome, the RFC section and
the TLS-RPT report one click away; parsed here, and rendered by headless Chromium (a
screenshot kept in the test's directory)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from relay.cli import main


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, str] = {}  # id -> class
        self.rows = 0
        self.details = 0
        self.external: list[str] = []
        self.transcripts: dict[str, str] = {}  # cell id -> its SMTP transcript text
        self._cell = ""
        self._in_transcript = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and a.get("id"):
            self.cells[str(a["id"])] = str(a.get("class"))
        if tag == "tr":
            self.rows += 1
        if tag == "td" and a.get("id"):
            self._cell = str(a["id"])
        if tag == "details":
            self.details += 1
            self._in_transcript = a.get("class") == "transcript"
        if tag in ("script", "link", "img") or (tag == "a" and a.get("href", "") != ""):
            self.external.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "details":
            self._in_transcript = False

    def handle_data(self, data: str) -> None:
        if self._in_transcript:
            self.transcripts[self._cell] = self.transcripts.get(self._cell, "") + data


@pytest.mark.timeout(120)
async def test_html_matrix_parses_and_renders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lab.html"
    argv = ["lab", "run", "--scenario", "good-tls", "--scenario", "no-starttls"]
    argv += ["--scenario", "dane-ee-match", "--scenario", "dane-ee-mismatch"]
    code = await asyncio.to_thread(main, [*argv, "--html", str(out)])
    assert code == 0, capsys.readouterr().out[-2000:]
    page = out.read_text()
    p = _Cells()
    p.feed(page)
    assert p.external == []  # self-contained
    assert p.rows == 1 + 4  # header + a row per scenario
    assert p.cells["good-tls.enforce"] == "ok" and p.cells["dane-ee-match.dane"] == "ok"
    assert len(p.cells) == 2 * 4 + 2
    assert p.details == 3 * len(p.cells)  # delivery details, TLS-RPT, transcript per cell
    # the relay's outbound session of each cell, one click away: MTA-STS and DANE alike
    good, strip = p.transcripts["good-tls.enforce"], p.transcripts["no-starttls.enforce"]
    assert "C: STARTTLS" in good and "*: TLS TLSv1" in good and "C: RCPT TO:<" in good
    assert "C: STARTTLS" not in strip and "S: 250" in strip and "RCPT" not in strip
    dane_ok, dane_bad = p.transcripts["dane-ee-match.dane"], p.transcripts["dane-ee-mismatch.dane"]
    assert "C: STARTTLS" in dane_ok and "(message content," in dane_ok
    assert "C: STARTTLS" in dane_bad and "DATA" not in dane_bad
    assert "RFC 7672 3.1.1" in page and "policy-type" in page
    chromium = shutil.which("chromium")
    assert chromium, "chromium is needed for the rendering check"
    shot = tmp_path / "lab.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1400,900", out.as_uri()],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
