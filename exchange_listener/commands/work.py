"""``exchange-listener work [--config FILE] [--burst] [--name NAME]``: run one RQ worker."""
from __future__ import annotations

import argparse

from exchange_listener.commands import add_config_argument, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--burst", action="store_true", help="process what is queued, then exit (tests, benchmarks)")
    parser.add_argument("--name", help="worker name shown in status (default: host-pid)")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    # imported here: only this command pays for rq and exchangelib
    from exchange_listener.sources.ews.account import check_at_start
    from workers import worker

    # EWS jobs: autodiscover once at start, and a certificate that is not trusted or names another
    # host is one line and a non-zero exit here, not a failure of every job retried by RQ
    settings = check_at_start(settings)

    return worker.run(settings, burst=args.burst, name=args.name)
