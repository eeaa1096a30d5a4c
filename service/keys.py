"""`consa keys create|list|revoke`: API keys, stored hashed. Also `python -m service.keys ...`.

A revoked key is refused (401) by the next request: keys are looked up on every request, never cached.
"""

import argparse
import sys

from service.crud import api_keys
from service.db import sessionmaker_for
from service.serve import prepare
from service.settings import get_settings


def _session():
    settings = get_settings()
    prepare(settings)
    return sessionmaker_for(settings.database_url)()


def create_key(name: str) -> str:
    """Create an API key named `name`; print it as the last line of output and return it."""
    with _session() as session:
        key = api_keys.create_api_key(session, name=name)
    print(f"Created API key {name!r}. Store it now; it cannot be shown again:", file=sys.stderr)
    print(key, flush=True)
    return key


def list_keys() -> list:
    """Print one line per key: name, prefix (to tell keys apart), created, revoked."""
    with _session() as session:
        rows = api_keys.list_api_keys(session)
    print(f"{'NAME':<24} {'PREFIX':<14} {'CREATED':<20} REVOKED")
    for row in rows:
        revoked = row.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if row.revoked_at else "-"
        print(f"{row.name:<24} {row.prefix + '…':<14} {row.created_at:%Y-%m-%d %H:%M:%S} {revoked}")
    return rows


def revoke_key(name: str) -> int:
    """Revoke every active key named `name`; return how many were revoked."""
    with _session() as session:
        n = api_keys.revoke_api_keys(session, name=name)
    print(f"revoked {n} key(s) named {name!r}", file=sys.stderr)
    return n


def keys_command(args) -> int:
    """The `consa keys` entry point (group `consa.commands`): args.keys_command is create|list|revoke."""
    if args.keys_command == "create":
        create_key(args.name)
    elif args.keys_command == "list":
        list_keys()
    elif args.keys_command == "revoke":
        if revoke_key(args.name) == 0:
            print(f"consa keys revoke: error: no active key named {args.name!r}", file=sys.stderr)
            return 2
    return 0


def add_keys_commands(keys_parser: argparse.ArgumentParser) -> None:
    """The `keys` sub-commands, for a parser that hands its args to keys_command."""
    sub = keys_parser.add_subparsers(dest="keys_command", required=True)
    sub.add_parser("create", help="create an API key; the key is the last line printed").add_argument("name")
    sub.add_parser("list", help="list the keys: name, prefix, created, revoked")
    sub.add_parser("revoke", help="revoke every key with this name (refused at once)").add_argument("name")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m service.keys", description=__doc__)
    add_keys_commands(parser)
    sys.exit(keys_command(parser.parse_args()))
