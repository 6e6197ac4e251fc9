"""Log output: colour only on a terminal; the CLI's warnings one plain line on stderr."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from relay import logs
from relay.cli import main


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_console_format_is_coloured_only_on_a_terminal(tty: bool) -> None:
    stream = _Stream(tty)
    logs.setup("info", "console", stream)
    logs.get("t").warning("something_odd", qid="Q1")
    text = stream.getvalue()
    assert "something_odd" in text and "Q1" in text
    assert ("\x1b[" in text) is tty
    logs.setup("warning", "auto")


def test_plain_format_is_one_uncoloured_line() -> None:
    stream = _Stream(True)
    logs.setup("warning", "plain", stream)
    logs.get("t").warning("store_reclaim_failed", error="disk\nfull")
    logs.get("t").info("not_shown")
    assert stream.getvalue() == "relay: warning: store_reclaim_failed error=disk full\n"
    logs.setup("warning", "auto")


def test_a_command_warning_is_plain_on_stderr_and_results_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "s.sqlite3"}"\n')
    assert main(["queue", "list", "--config", str(cfg)]) == 2  # no store yet
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and not err.startswith("{")
    logs.get("relay.test").warning("cli_warning", what="x")
    out, err = capsys.readouterr()
    assert out == "" and err == "relay: warning: cli_warning what=x\n"
    logs.setup("warning", "auto")
