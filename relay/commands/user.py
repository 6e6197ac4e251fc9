"""``relay user add|remove|list``: the submission users file (relay.submission.users).

``add`` reads the password from the terminal without echo (asked twice) or, when stdin
is not a terminal, as its first line; never from the command line, where other users
could read it in the process list. Adding an existing user replaces its password. The
file is rewritten atomically with mode 0600; a running relay reads it again at the next
AUTH.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from relay.config import Config, load_config
from relay.submission.senders import default_senders
from relay.submission.users import UsersFileError, check_name, hash_password, load, save

MIN_PASSWORD = 8


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("user", help="manage the submission users (AUTH)")
    usub = p.add_subparsers(dest="user_command", required=True)
    add = usub.add_parser("add", help="add a user or change its password")
    add.add_argument("name", help="user name (usually the address, e.g. alice@example.org)")
    add.add_argument("--config", required=True, help="path to config.toml")
    add.set_defaults(func=run_add)
    rm = usub.add_parser("remove", help="remove a user")
    rm.add_argument("name")
    rm.add_argument("--config", required=True, help="path to config.toml")
    rm.set_defaults(func=run_remove)
    ls = usub.add_parser("list", help="list the users")
    ls.add_argument("--json", action="store_true", help="JSON output")
    ls.add_argument("--config", required=True, help="path to config.toml")
    ls.set_defaults(func=run_list)


def _fail(text: str, code: int = 2) -> int:
    print(f"relay: {text}", file=sys.stderr)
    return code


def read_password() -> str | None:
    """From the terminal (twice, no echo) or stdin's first line; None when they differ."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            return None
        return first
    return sys.stdin.readline().rstrip("\r\n")


def run_add(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = config.submission.users_file
    try:
        name = check_name(args.name)
        users = load(path)
    except (ValueError, UsersFileError) as exc:
        return _fail(str(exc))
    password = read_password()
    if password is None:
        return _fail("the passwords do not match")
    if len(password) < MIN_PASSWORD:
        return _fail(f"the password needs at least {MIN_PASSWORD} characters")
    existed = name in users
    users[name] = hash_password(password)
    save(path, users)
    print(f"{'updated' if existed else 'added'} {name} in {path}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = config.submission.users_file
    try:
        users = load(path)
    except UsersFileError as exc:
        return _fail(str(exc))
    name = args.name.lower()
    if name not in users:
        return _fail(f"no such user: {name}", 1)
    del users[name]
    save(path, users)
    print(f"removed {name} from {path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        users = load(config.submission.users_file)
    except UsersFileError as exc:
        return _fail(str(exc))
    rows = [(name, _senders(config, name)) for name in sorted(users)]
    if args.json:
        print(json.dumps([{"user": n, "senders": list(s)} for n, s in rows], indent=2))
        return 0
    for name, senders in rows:
        print(f"{name}\t{', '.join(senders) or '(none: every MAIL FROM is refused)'}")
    return 0


def _senders(config: Config, name: str) -> tuple[str, ...]:
    entry = config.submission.users.get(name)
    return entry.senders if entry is not None else default_senders(name)
