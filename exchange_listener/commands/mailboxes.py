"""``exchange-listener mailboxes add|remove|list``: the mailboxes running listeners watch."""
from __future__ import annotations

import argparse
import datetime
import sys

import redis

from exchange_listener import commands
from exchange_listener.core import redis_conn
from exchange_listener.listener import mailboxes

INTERMIXED = True  # `add --source graph ADDR` and `add ADDR --source graph` both work (cli.main)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands.add_config_argument(parser)
    parser.add_argument("action", choices=("add", "remove", "list"))
    parser.add_argument("addresses", nargs="*", metavar="ADDRESS")
    parser.add_argument("--source", dest="mailbox_source", choices=mailboxes.SOURCES, default=None,
                        help="add: watch through EWS, Microsoft Graph or IMAP (default: the setting `source`); "
                             "adding a watched address with another source moves it")


def run(args: argparse.Namespace) -> int:
    settings = commands.load_settings(args)
    if args.action != "list" and not args.addresses:
        print(f"exchange-listener mailboxes {args.action}: give at least one ADDRESS", file=sys.stderr)
        return 2
    try:
        addresses = [mailboxes.normalize(a) for a in args.addresses]
    except mailboxes.BadAddress as exc:
        print(f"exchange-listener mailboxes: {exc} (nothing changed)", file=sys.stderr)
        return 2
    conn = redis_conn.connect(settings.redis_url)
    if args.action == "add":
        source = args.mailbox_source or settings.source
        before, before_sources = mailboxes.list_all(conn), mailboxes.sources(conn)
        added = mailboxes.add(conn, addresses, source=source)
        _forget_left_sources(conn, [(a, before_sources.get(a, "ews")) for a in added if a in before])
        for address in addresses:
            word = ("moved to " + source if address in before else "added") if address in added else "already watched"
            print(f"{word}: {address}")
    elif args.action == "remove":
        removed = mailboxes.remove(conn, addresses)
        # sync_state imports exchangelib: only pay for it here
        from exchange_listener.core import keys
        from exchange_listener.sources.ews.catch_up import SyncStore
        from exchange_listener.sources.graph.delta import DeltaStore
        from exchange_listener.sources.graph.subscriptions import SubscriptionStore
        from exchange_listener.sources.imap.cursor import CursorStore
        from exchange_listener.sources.ledger import Ledger

        sync, delta, ledger, subs = SyncStore(conn), DeltaStore(conn), Ledger(conn), SubscriptionStore(conn)
        cursors = CursorStore(conn)
        for address in removed:  # re-adding later starts from then, not from the old sync state
            sync.forget_mailbox(address)
            delta.forget_mailbox(address)
            cursors.forget_mailbox(address)
            ledger.forget_mailbox(address)
            if conn.get(keys.lease(address)) is None:
                # no listener holds it to delete its Graph subscription: forgotten here, Graph ends
                # it at its expiry and receivers refuse its notifications meanwhile
                subs.forget(address)
        for address in addresses:
            print(f"{'removed' if address in removed else 'not watched'}: {address}")
    else:
        of = mailboxes.sources(conn)
        for address, added_at in sorted(mailboxes.list_all(conn).items()):
            when = datetime.datetime.fromtimestamp(added_at, datetime.UTC).isoformat(timespec="seconds")
            print(f"{address}\tadded {when}\t{of.get(address, 'ews')}")
    return 0


def _forget_left_sources(conn: redis.Redis, moved: list[tuple[str, str]]) -> None:
    """A mailbox moved to another source starts there afresh: the sync state of the source it left
    goes (kept, it would mark where a move back much later resumes, and mail the other source
    handled meanwhile would look new). Its Graph subscription is deleted by the listener that held it."""
    if not moved:
        return
    # (SyncStore imports exchangelib: only here)
    from exchange_listener.sources.ews.catch_up import SyncStore
    from exchange_listener.sources.graph.delta import DeltaStore
    from exchange_listener.sources.imap.cursor import CursorStore

    for address, left in moved:
        if left == "graph":
            DeltaStore(conn).forget_mailbox(address)
        elif left == "imap":
            CursorStore(conn).forget_mailbox(address)
        elif left == "ews":
            SyncStore(conn).forget_mailbox(address)
