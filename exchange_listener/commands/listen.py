"""``exchange-listener listen``: watch the mailboxes of the configured source (EWS, Microsoft
Graph or IMAP) and enqueue every new mail."""
from __future__ import annotations

import argparse

from exchange_listener import commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands.add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    settings = commands.load_settings(args)
    needs = {"graph": ("graph_url", "client_id"), "imap": ("imap_host",)}
    settings.require(*needs.get(settings.source, ("ews_url",)))
    from exchange_listener.listener import runner as listener

    return listener.run(settings)
