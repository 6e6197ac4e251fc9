"""``[submission]`` config: defaults, validation errors naming the key, the users
tables, ``relay config show`` writing them back, and ``relay config check`` refusing a
malformed users file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.cli import main as cli_main
from relay.config import HostPort, SubmissionUser, parse_config, write_config
from relay.errors import ConfigError


def _doc(tmp_path: Path, **submission: Any) -> dict[str, Any]:
    pem = tmp_path / "cert.pem"
    if not pem.exists():
        trustme.CA().issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return {
        "server": {"tls_cert": str(pem), "tls_key": str(pem)},
        "storage": {"path": str(tmp_path / "var" / "relay.sqlite3")},
        "submission": submission,
    }


def test_defaults_are_off(tmp_path: Path) -> None:
    cfg = parse_config({"storage": {"path": "var/r.db"}}, tmp_path / "config.toml")
    s = cfg.submission
    assert not s.enabled and s.listen == () and s.implicit_tls_listen == ()
    assert s.users_file == tmp_path / "var" / "submission-users"  # beside the store
    assert (s.max_failures, s.failure_window, s.lockout, s.failure_delay) == (5, 900, 900, 1.0)


def test_listeners_and_users(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        listen=["0.0.0.0:587"],
        implicit_tls_listen=["[::]:465"],
        users_file="users.txt",
        users={"Alice@Example.org": {"senders": ["Alice@example.org", "*@example.org", "<>"]}},
    )
    s = parse_config(doc, tmp_path / "config.toml").submission
    assert s.enabled
    assert s.listen == (HostPort("0.0.0.0", 587),)
    assert s.implicit_tls_listen == (HostPort("::", 465),)
    assert s.users_file == tmp_path / "users.txt"
    assert s.users == {
        "alice@example.org": SubmissionUser(("alice@example.org", "*@example.org", "<>"))
    }


@pytest.mark.parametrize(
    ("submission", "key", "problem"),
    [
        ({"listen": ["0.0.0.0"]}, "submission.listen", "needs a port"),
        ({"max_failures": 0}, "submission.max_failures", ">= 1"),
        ({"users": {"a b": {}}}, "submission.users.a b", "no spaces"),
        ({"users": {"a": {"senders": ["x"]}}}, "submission.users.a.senders", "not an address"),
        ({"users": {"a": {"sender": []}}}, "submission.users.a.sender", "unknown key"),
        ({"users": {"a": {}, "A": {}}}, "submission.users.A", "defined twice"),
        ({"users": []}, "submission.users", "must be tables"),
        ({"bogus": 1}, "submission.bogus", "unknown key"),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, submission: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_doc(tmp_path, **submission), tmp_path / "config.toml")
    assert f": {key}: " in str(e.value) and problem in str(e.value)


def test_needs_a_certificate(tmp_path: Path) -> None:
    doc = {"submission": {"implicit_tls_listen": ["127.0.0.1:465"]}}
    with pytest.raises(ConfigError, match="implicit_tls_listen: needs server.tls_cert"):
        parse_config(doc, tmp_path / "config.toml")


def test_config_show_writes_the_users_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _doc(
        tmp_path,
        listen=["127.0.0.1:587"],
        users={"alice@example.org": {"senders": ["*@example.org"]}},
    )
    path = tmp_path / "config.toml"
    write_config(path, doc)
    assert cli_main(["config", "show", "--config", str(path)]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["submission"]["users"] == {"alice@example.org": {"senders": ["*@example.org"]}}
    again = parse_config(shown, path).submission
    assert again.users == parse_config(doc, path).submission.users


def test_config_check_refuses_a_malformed_users_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    doc = _doc(tmp_path, listen=["127.0.0.1:587"], users_file="users")
    doc.update({"srs": {"enabled": False}, "arc": {"enabled": False}})
    doc.update({"tlsrpt": {"enabled": False}})
    write_config(path, doc)
    (tmp_path / "users").write_text("alice:not-a-hash\n")
    assert cli_main(["config", "check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "submission.users_file" in err and "users:1:" in err
