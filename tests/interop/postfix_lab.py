"""Helpers for the Postfix interop test: trustme certificates on disk, and private Postfix
instances (relay.lab.postfix) started and stopped off the event loop."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import trustme

from relay.lab.postfix import PostfixInstance, PostfixSpec


def write_cert(ca: trustme.CA, name: str, directory: Path) -> tuple[Path, Path]:
    """A leaf certificate for ``name`` from ``ca``: (chain PEM, key PEM) files."""
    leaf = ca.issue_cert(name)
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / f"{name}.crt"
    key = directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    cert.chmod(0o644)
    key.chmod(0o600)  # smtpd reads it as root, before dropping privileges
    return cert, key


def shared_tempdir(prefix: str) -> Path:
    """A temporary directory that the ``postfix`` user can traverse (pytest's tmp_path
    sits below a 0700 directory, which Postfix daemons, once unprivileged, cannot enter)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


async def start_postfix(spec: PostfixSpec, name: str) -> PostfixInstance:
    """Start an instance in its own temporary directory, in a thread (postfix check and
    start take a few seconds); on failure everything is cleaned up and the error raised."""
    pf = PostfixInstance(spec, name=name)
    try:
        await asyncio.to_thread(pf.start)
    except BaseException:
        await asyncio.to_thread(pf.cleanup)
        raise
    return pf


async def stop_postfix(pf: PostfixInstance) -> None:
    await asyncio.to_thread(pf.cleanup)
