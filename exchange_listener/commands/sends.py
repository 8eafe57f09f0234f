"""``exchange-listener sends record|show|new-id``: the send registry for sending platforms.

``record`` prints the stored send as JSON; ``show`` prints the send a Message-ID belongs to
(exit 1 if none); ``new-id`` prints a fresh, unguessable Message-ID for a domain.
Bad input (no usable Message-ID, no recipient, id owned by another enrollment) exits 2 with
a message naming the problem, and stores nothing.
"""
from __future__ import annotations

import argparse
import json
import sys

from exchange_listener.commands import add_config_argument, load_settings
from exchange_listener.core import redis_conn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    record = sub.add_parser("record", help="record an outbound send")
    add_config_argument(record)
    record.add_argument("--message-id", action="append", required=True, metavar="ID",
                        help="Message-ID of the send (repeat for the id the mail server assigned)")
    record.add_argument("--enrollment", required=True, metavar="E")
    record.add_argument("--sequence", required=True, metavar="S")
    record.add_argument("--mailbox", required=True, metavar="M", help="mailbox the send went out from")
    record.add_argument("--to", action="append", required=True, metavar="ADDR")
    record.add_argument("--cc", action="append", default=[], metavar="ADDR")
    record.add_argument("--sent-at", metavar="ISO", help="ISO 8601 send time (default: now; naive = UTC)")
    show = sub.add_parser("show", help="the send a Message-ID belongs to, as JSON")
    add_config_argument(show)
    show.add_argument("message_id", metavar="MESSAGE_ID")
    new_id = sub.add_parser("new-id", help="print a fresh Message-ID for a domain")
    new_id.add_argument("--domain", required=True, metavar="D")


def run(args: argparse.Namespace) -> int:
    from exchange_listener.mail.message_ids import new_message_id

    if args.action == "new-id":
        try:
            print(new_message_id(args.domain))
        except ValueError as exc:
            print(f"exchange-listener sends new-id: {exc}", file=sys.stderr)
            return 2
        return 0
    from workers.state.sends import SendRegistry

    settings = load_settings(args)
    registry = SendRegistry(redis_conn.connect(settings.redis_url), retention_days=settings.retention_days)
    if args.action == "record":
        try:
            send = registry.record(args.message_id, args.enrollment, args.sequence, args.mailbox, args.to,
                                   cc=args.cc, sent_at=args.sent_at)
        except ValueError as exc:
            print(f"exchange-listener sends record: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(send.as_dict()))
        return 0
    found = registry.get(args.message_id)
    if found is None:
        print(f"exchange-listener sends show: no recorded send has Message-ID {args.message_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(found.as_dict()))
    return 0
