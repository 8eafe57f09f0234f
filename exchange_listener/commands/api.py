"""``exchange-listener api [serve]`` runs the HTTP API; ``api hash-token TOKEN`` prints a token's hash.

The API (``exchange_listener.api``, docs/api.md) serves on ``api_listen`` and accepts the bearer
tokens whose SHA-256 hashes are in ``api_tokens``; ``hash-token`` prints the value to put there
(``-`` reads the token from stdin, keeping it out of the shell history and the process list).
Once listening, ``serve`` prints one line with the base URL.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from exchange_listener.commands import add_config_argument, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    serve = sub.add_parser("serve", help="serve the API on api_listen (the default action)")
    # SUPPRESS: a --config given before `serve` is not reset by the subcommand's default
    serve.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="TOML settings file (default: $EXCHANGE_LISTENER_CONFIG)")
    hashing = sub.add_parser("hash-token", help="print the SHA-256 hash of a token, for api_tokens")
    hashing.add_argument("token", metavar="TOKEN", help="the bearer token ('-': read it from stdin)")


def run(args: argparse.Namespace) -> int:
    from exchange_listener.api.access import hash_token

    if args.action == "hash-token":
        token = sys.stdin.readline().strip() if args.token == "-" else args.token
        if not token:
            print("exchange-listener api hash-token: the token is empty", file=sys.stderr)
            return 2
        print(hash_token(token))
        return 0
    from exchange_listener.api.server import serve

    settings = load_settings(args)

    def ready(url: str) -> None:
        print(f"exchange-listener API serving {url}", flush=True)

    try:
        asyncio.run(serve(settings, ready))
    except OSError as exc:  # the address is taken or cannot be bound
        print(f"exchange-listener api: cannot listen on {settings.api_listen}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
