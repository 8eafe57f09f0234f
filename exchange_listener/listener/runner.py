"""``exchange-listener listen``: the listener of the configured source (``settings.source``).

EWS (Exchange Server, and Exchange Online until it switches EWS off) streams mailboxes
(``listener.ews``); Microsoft Graph (Exchange Online) is told of new mail by change
notifications and reads the truth by delta (``listener.graph``). Both run side by side: each
listener takes only the watched mailboxes of its own source (``mailboxes add --source``). IMAP
(Gmail and every other server) keeps an IDLE connection per watched folder (``listener.imap``).
"""
from __future__ import annotations

from exchange_listener.core.config import Settings


def run(settings: Settings) -> int:
    if settings.source == "imap":
        from exchange_listener.listener.imap import ImapListener

        return ImapListener(settings).run()
    if settings.source == "graph":
        from exchange_listener.listener.graph import GraphListener

        return GraphListener(settings).run()
    from exchange_listener.listener.ews import EwsListener

    return EwsListener(settings).run()
