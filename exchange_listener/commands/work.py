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

    # EWS configured (ews_url or autodiscover_email): autodiscover once and check the certificate
    # at start. A problem refuses to start, in one line: a worker that took EWS jobs anyway would
    # fail each of them, retried until they land in the failed registry, while they could wait in
    # the queue for a worker that can read them (status then says none is running). A worker for
    # Graph and IMAP only has no EWS settings and is not checked.
    try:
        settings = check_at_start(settings)
    except ConfigError as exc:
        log.error("EWS is configured but unusable from this host; not starting", error=str(exc))
        return 2

    return worker.run(settings, burst=args.burst, name=args.name)
