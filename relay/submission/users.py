"""The submission users file: one ``name:argon2-hash`` line per user (argon2id PHC
strings, like an htpasswd file), blank lines and ``#`` comments allowed.

Written only by ``relay user`` (atomically: a temporary file, fsync, rename, then the
directory fsync'd; mode 0600). Read by the relay, which checks the file's identity
(inode, size, mtime) before each AUTH and reads it again when it changed, so ``relay
user add`` takes effect without a restart.

Verification costs tens of milliseconds by design (argon2); the caller runs ``verify``
in a thread. An unknown user is checked against a dummy hash made with the same
parameters as the file's first hash, so a wrong name and a wrong password take the same
time (no user enumeration by timing).
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

NAME = re.compile(r"[^\x00-\x20\x7f:]{1,255}")
MODE = 0o600


class UsersFileError(Exception):
    """A users file that cannot be read or parsed; the message names the file (and line)."""


def check_name(name: str) -> str:
    """The canonical (lower-cased) user name; ValueError for one the file cannot hold."""
    if not NAME.fullmatch(name):
        raise ValueError(f"bad user name {name!r}: no spaces, control characters or ':'")
    return name.lower()


def parse(text: str, path: Path) -> dict[str, str]:
    """name -> hash, in file order."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not NAME.fullmatch(name) or not hashed.startswith("$argon2"):
            raise UsersFileError(f"{path}:{n}: not a 'user:$argon2id$...' line")
        try:
            extract_parameters(hashed)
        except InvalidHashError:
            raise UsersFileError(f"{path}:{n}: not a valid argon2 hash") from None
        out[name.lower()] = hashed
    return out


def load(path: Path) -> dict[str, str]:
    """The users in the file; {} when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"{path}: cannot read: {exc}") from None
    return parse(text, path)


def dump(users: dict[str, str]) -> str:
    head = "# relay submission users: name:argon2 hash (written by `relay user`)\n"
    return head + "".join(f"{name}:{hashed}\n" for name, hashed in users.items())


def save(path: Path, users: dict[str, str]) -> None:
    """Replace the file atomically, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump(users))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _unlink_quietly(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    return (hasher or PasswordHasher()).hash(password)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    key: tuple[int, int, int, int] | None  # (device, inode, size, mtime_ns); None: absent
    users: dict[str, str]
    dummy: str  # a hash of a random password, with the file's parameters


class UserDb:
    """The users file as the relay reads it (thread-safe; see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._snap: _Snapshot | None = None
        self._dummies: dict[str, str] = {}

    def _key(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UsersFileError(f"{self.path}: cannot read: {exc.strerror}") from None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _dummy_for(self, users: dict[str, str]) -> str:
        hasher = PasswordHasher()
        if users:
            hasher = PasswordHasher.from_parameters(extract_parameters(next(iter(users.values()))))
        tag = repr(
            (hasher.time_cost, hasher.memory_cost, hasher.parallelism, hasher.hash_len, hasher.type)
        )
        if tag not in self._dummies:
            self._dummies[tag] = hasher.hash(secrets.token_urlsafe(24))
        return self._dummies[tag]

    def snapshot(self) -> _Snapshot:
        key = self._key()
        with self._lock:
            if self._snap is None or self._snap.key != key:
                users = load(self.path) if key is not None else {}
                self._snap = _Snapshot(key, users, self._dummy_for(users))
            return self._snap

    def names(self) -> list[str]:
        return list(self.snapshot().users)

    def verify(self, user: str, password: str) -> bool:
        """Whether password is user's; as slow for an unknown user as for a known one.
        Raises UsersFileError when the file cannot be read."""
        snap = self.snapshot()
        hashed = snap.users.get(user.lower())
        try:
            PasswordHasher().verify(hashed or snap.dummy, password)
        except (VerificationError, InvalidHashError):
            return False
        return hashed is not None
