"""relay keygen through the CLI: key file, mode, TXT record, and the key works."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest

from relay.auth.arc import ArcSealer, validate_arc
from relay.auth.dkim import DkimSigner, verify_dkim
from relay.auth.types import ArcCv, ArcResult
from relay.cli import main
from relay.dns import StaticResolver

MESSAGE = b"From: a@example.net\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n"


def _record(out: str) -> tuple[str, str]:
    m = re.search(r'^(\S+)\. IN TXT ((?:"[^"]*" ?)+)$', out, re.MULTILINE)
    assert m, out
    return m.group(1), "".join(re.findall(r'"([^"]*)"', m.group(2)))


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_keygen_default_path_and_key_works(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    algorithm: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(
        ["keygen", "--domain", "Example.NET.", "--selector", "s1", "--algorithm", algorithm]
    )
    assert code == 0
    path = tmp_path / "keys" / "s1._domainkey.example.net.pem"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    name, record = _record(capsys.readouterr().out)
    assert name == "s1._domainkey.example.net"
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")
    assert base64.b64decode(record.split("p=")[1])
    resolver = StaticResolver({(name, "TXT"): record})
    pem = path.read_bytes()
    (res,) = await verify_dkim(resolver, DkimSigner("example.net", "s1", pem).sign(MESSAGE))
    assert res.result == "pass"
    sealed = ArcSealer("example.net", "s1", pem, "example.net").seal(
        MESSAGE, "example.net; none", ArcResult(ArcCv.NONE)
    )
    assert (await validate_arc(resolver, sealed)).cv == ArcCv.PASS


def test_keygen_out_bits_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deep" / "dir" / "k.pem"
    args = ["keygen", "--domain", "d.example", "--selector", "s", "--out", str(out)]
    assert main([*args, "--bits", "3072"]) == 0
    _, record = _record(capsys.readouterr().out)
    assert len(base64.b64decode(record.split("p=")[1])) > 384  # a 3072-bit SPKI
    assert main(args) == 1  # never overwrites a key
    assert "exists" in capsys.readouterr().err
    assert (
        main(
            [
                "keygen",
                "--domain",
                "d.example",
                "--selector",
                "s",
                "--out",
                str(tmp_path / "x.pem"),
                "--bits",
                "1024",
            ]
        )
        == 2
    )
    assert "at least 2048" in capsys.readouterr().err
    assert not (tmp_path / "x.pem").exists()
