"""``exchange-listener listen``: watch the mailboxes of the configured source (EWS, Microsoft
Graph or IMAP) and enqueue every new mail.

For EWS the endpoint is checked before anything starts (``sources.ews.account.check_at_start``):
autodiscover when ``ews_url`` is empty, and a certificate that is not trusted or names another
host is one line and a non-zero exit, never a loop of retried handshakes."""
from __future__ import annotations

import argparse

from exchange_listener import commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands.add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    settings = commands.load_settings(args)
    needs = {"graph": ("graph_url", "client_id"), "imap": ("imap_host",)}
    if settings.source == "ews":
        if not settings.autodiscover_email:
            settings.require("ews_url")
        from exchange_listener.sources.ews import account

        settings = account.check_at_start(settings)  # ews_url filled in (autodiscover), certificate checked
    else:
        settings.require(*needs[settings.source])
    from exchange_listener.listener import runner as listener

    return listener.run(settings)
