"""``exchange-listener listen``: watch the mailboxes of the configured source (EWS or Microsoft
Graph) and enqueue every new mail."""
from __future__ import annotations

import argparse

from exchange_listener import commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands.add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    settings = commands.load_settings(args)
    settings.require(*(("graph_url", "client_id") if settings.source == "graph" else ("ews_url",)))
    from exchange_listener.listener import runner as listener

    return listener.run(settings)
