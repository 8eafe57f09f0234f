"""The ``exchange-listener`` command: a table of subcommands, each in its own module.

Only the chosen subcommand's module is imported, so ``exchange-listener classify`` does not pay
for aiohttp or exchangelib, and each command's code stays in one place.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

import redis

from exchange_listener.core.config import ConfigError

# name -> (module under exchange_listener.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "emulator": ("emulator", "run the EWS emulator (a real HTTP server speaking EWS SOAP)"),
    "emulator-deliver": ("emulator_deliver", "deliver an RFC 5322 file to an emulator mailbox"),
    "listen": ("listen", "stream watched mailboxes and enqueue every new mail"),
    "mailboxes": ("mailboxes", "add, remove or list the mailboxes to watch"),
    "work": ("work", "run an RQ worker that processes new mail"),
    "sends": ("sends", "record or look up outbound sends"),
    "enrollments": ("enrollments", "show or change enrollment state"),
    "classify": ("classify", "classify message files (human_reply, auto_reply, bounce, ...)"),
    "jobs": ("jobs", "list failed jobs with their errors, requeue them, show queue depth"),
    "status": ("status", "health of listeners, queue and workers (non-zero exit when unhealthy)"),
    "api": ("api", "HTTP API for sending platforms: sends, enrollments, transitions (or: api hash-token TOKEN)"),
    "salesforce-emulator": ("salesforce_emulator", "run the Salesforce REST emulator (token endpoint, SOQL, sObjects)"),
    "graph-emulator": ("graph_emulator", "run the Microsoft Graph emulator (mail, delta, webhooks, $batch; HTTPS token host)"),
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"exchange_listener.commands.{COMMANDS[name][0]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exchange-listener", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _load(name).add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    if chosen and getattr(_load(chosen), "INTERMIXED", False):
        # options anywhere among the positionals (`mailboxes add --source graph ADDR`), which the
        # subcommand form cannot do: argparse gives a `*` positional its words before the first option
        alone = argparse.ArgumentParser(prog=f"exchange-listener {chosen}", description=COMMANDS[chosen][1])
        _load(chosen).add_arguments(alone)
        args = alone.parse_intermixed_args(argv[1:])
        args.command = chosen
    else:
        args = build_parser(chosen).parse_args(argv)
    if not args.command:
        build_parser().print_help()
        return 2
    try:
        return int(_load(args.command).run(args) or 0)
    except ConfigError as exc:
        print(f"exchange-listener: configuration error: {exc}", file=sys.stderr)
        return 2
    except redis.exceptions.ConnectionError as exc:
        print(f"exchange-listener: cannot reach Redis: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
