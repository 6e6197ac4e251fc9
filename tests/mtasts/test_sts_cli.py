"""`relay sts check` and `relay sts cache` against the lab DNS server and a real HTTPS
policy host: JSON shape (design.md), exit codes, human output."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from relay.cli import main
from relay.store import Store
from tests.mtasts.conftest import StsLab
from tests.mtasts.sts_https_server import Answer


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI points structlog at the (captured) stderr; put the defaults back."""
    yield
    structlog.reset_defaults()


POLICY = "version: STSv1\nmode: enforce\nmx: *.mail.example.com\nmax_age: 86400\n"


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()  # drop what the test itself logged
    code = await asyncio.to_thread(main, list(argv))
    return code, capsys.readouterr().out


def zone_mx(lab: StsLab, domain: str, *hosts: str) -> None:
    lab.zone.set(domain, "MX", [(10 * (i + 1), h) for i, h in enumerate(hosts)])


async def test_check_valid_policy_json(lab: StsLab, capsys: pytest.CaptureFixture[str]) -> None:
    lab.publish("example.com", POLICY, "20260101")
    zone_mx(lab, "example.com", "a.mail.example.com", "backup.other.example")
    lab.config()
    code, out = await cli(
        capsys, "sts", "check", "example.com", "--config", str(lab.tmp / "config.toml"), "--json"
    )
    assert code == 0
    data: dict[str, Any] = json.loads(out)
    assert data == {
        "domain": "example.com",
        "txt": {"id": "20260101"},
        "policy": {"mode": "enforce", "mx": ["*.mail.example.com"], "max_age": 86400},
        "error": None,
        "mx_hosts": [
            {"host": "a.mail.example.com", "matches": True},
            {"host": "backup.other.example", "matches": False},
        ],
        "verdict": "enforce",
    }


async def test_check_human_output(lab: StsLab, capsys: pytest.CaptureFixture[str]) -> None:
    lab.publish("example.com", POLICY, "20260101")
    zone_mx(lab, "example.com", "a.mail.example.com", "backup.other.example")
    lab.config()
    code, out = await cli(
        capsys, "sts", "check", "example.com", "--config", str(lab.tmp / "config.toml")
    )
    assert code == 0
    assert 'TXT:       _mta-sts.example.com "v=STSv1; id=20260101"' in out
    assert "mode:    enforce" in out and "max_age: 86400" in out
    assert "a.mail.example.com  matches the policy" in out
    assert "backup.other.example  does NOT match the policy" in out
    assert out.rstrip().endswith("verdict:   enforce")


async def test_check_no_policy_exit_1(lab: StsLab, capsys: pytest.CaptureFixture[str]) -> None:
    zone_mx(lab, "plain.example", "mx.plain.example")
    lab.config()
    code, out = await cli(
        capsys, "sts", "check", "plain.example", "--config", str(lab.tmp / "config.toml"), "--json"
    )
    data = json.loads(out)
    assert code == 1
    assert (data["txt"], data["policy"], data["error"], data["verdict"]) == (
        None,
        None,
        None,
        "no-policy",
    )
    assert data["mx_hosts"] == [{"host": "mx.plain.example", "matches": None}]


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (Answer(404, b""), "sts-policy-fetch-error"),
        (Answer(200, b"version: STSv1\nmode: enforce\nmax_age: 1\n"), "sts-policy-invalid"),
    ],
)
async def test_check_error_exit_2(
    lab: StsLab, capsys: pytest.CaptureFixture[str], answer: Answer, verdict: str
) -> None:
    lab.publish("bad.example", None, "x1", answer=answer)
    lab.config()
    code, out = await cli(
        capsys, "sts", "check", "bad.example", "--config", str(lab.tmp / "config.toml"), "--json"
    )
    data = json.loads(out)
    assert code == 2
    assert data["txt"] == {"id": "x1"} and data["policy"] is None
    assert data["verdict"] == verdict and data["error"]


async def test_check_dns_failure_exit_2(lab: StsLab, capsys: pytest.CaptureFixture[str]) -> None:
    lab.zone.fail("_mta-sts.broken.example", "SERVFAIL")
    lab.config()
    code, out = await cli(
        capsys, "sts", "check", "broken.example", "--config", str(lab.tmp / "config.toml"), "--json"
    )
    assert code == 2
    assert json.loads(out)["verdict"] == "dns-error"


async def test_cache_lists_policies(
    lab: StsLab, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    lab.publish("example.com", POLICY, "v1")
    m = lab.manager(store)
    await m.get_policy("example.com")
    code, out = await cli(
        capsys, "sts", "cache", "--config", str(lab.tmp / "config.toml"), "--json"
    )
    assert code == 0
    assert json.loads(out) == [
        {
            "domain": "example.com",
            "id": "v1",
            "mode": "enforce",
            "mx": ["*.mail.example.com"],
            "fetched_at": "2027-01-15T08:00:00Z",
            "expires_at": "2027-01-16T08:00:00Z",
        }
    ]
    code, out = await cli(capsys, "sts", "cache", "--config", str(lab.tmp / "config.toml"))
    assert code == 0 and "example.com  id=v1  mode=enforce" in out


async def test_real_process_exit_code_and_config_error(lab: StsLab, tmp_path: Path) -> None:
    zone_mx(lab, "plain.example", "mx.plain.example")
    lab.config()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "sts",
        "check",
        "plain.example",
        "--config",
        str(lab.tmp / "config.toml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, err
    assert b"verdict:   no-policy" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[mta_sts]\nhttps_port = 'x'\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "sts",
        "cache",
        "--config",
        str(bad),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"mta_sts.https_port" in err
