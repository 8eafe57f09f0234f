"""``exchange-listener work [--config FILE] [--burst] [--name NAME]``: run one RQ worker."""
from __future__ import annotations

import argparse

from exchange_listener.commands import add_config_argument, load_settings
from exchange_listener.core import logs
from exchange_listener.core.config import ConfigError

log = logs.get_logger(component="work")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--burst", action="store_true", help="process what is queued, then exit (tests, benchmarks)")
    parser.add_argument("--name", help="worker name shown in status (default: host-pid)")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    # imported here: only this command pays for rq and exchangelib
    from exchange_listener.sources.ews.account import check_at_start
    from workers import worker

    # EWS jobs: autodiscover once at start and check the certificate. A worker also serves Graph and
    # IMAP jobs, so an EWS problem is one clear error line here, not a refusal to start: the EWS
    # jobs fail with the same message (and are retried) until it is fixed
    try:
        settings = check_at_start(settings)
    except ConfigError as exc:
        log.error("EWS unusable; serving the other sources' jobs, EWS jobs will fail until fixed", error=str(exc))

    return worker.run(settings, burst=args.burst, name=args.name)
