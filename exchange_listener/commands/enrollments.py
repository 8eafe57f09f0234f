"""``exchange-listener enrollments show|resume|outbox``: enrollment state for platforms and operators.

``show E`` prints one JSON object (status, reason, updated_at, ...; with ``--history`` also the
audit trail); an unknown enrollment exits 1. ``resume E`` lifts a pause (``--force`` also
reopens a stopped enrollment). ``outbox`` lists notifications still pending or failed, and
``--retry-failed`` puts the failed ones back.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys

from exchange_listener.commands import add_config_argument, load_settings
from exchange_listener.core import redis_conn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="the enrollment's state as one JSON object")
    add_config_argument(show)
    show.add_argument("enrollment", metavar="E")
    show.add_argument("--history", action="store_true", help="include the audit trail (key 'history')")
    resume = sub.add_parser("resume", help="make a paused enrollment active again")
    add_config_argument(resume)
    resume.add_argument("enrollment", metavar="E")
    resume.add_argument("--by", default=None, help="who resumes it (default: the current user)")
    resume.add_argument("--force", action="store_true", help="also reopen a stopped enrollment")
    outbox = sub.add_parser("outbox", help="notifications not yet delivered (pending, failed, counters)")
    add_config_argument(outbox)
    outbox.add_argument("--retry-failed", action="store_true", help="put failed notifications back in the outbox")


def run(args: argparse.Namespace) -> int:
    from workers.state.enrollments import EnrollmentStore

    settings = load_settings(args)
    conn = redis_conn.connect(settings.redis_url)
    store = EnrollmentStore(conn, retention_days=settings.retention_days, pause_days=settings.pause_days)
    if args.action == "outbox":
        from workers.sinks.webhooks import Notifier

        notifier = Notifier(conn)  # visibility only: no channel needed
        retried = notifier.retry_failed() if args.retry_failed else 0
        print(json.dumps({"pending": notifier.pending(), "failed": notifier.failed(), "stats": notifier.stats(),
                          "retried": retried}))
        return 0
    state = store.get(args.enrollment)
    if state is None:
        print(f"exchange-listener enrollments {args.action}: unknown enrollment {args.enrollment!r}", file=sys.stderr)
        return 1
    if args.action == "resume":
        by = args.by or f"operator:{getpass.getuser()}"
        transition = store.resume(args.enrollment, by, force=args.force)
        if transition is None:
            why = "stopped (use --force to reopen it)" if state["status"] == "stopped" else state["status"]
            print(f"exchange-listener enrollments resume: nothing to do, enrollment is {why}", file=sys.stderr)
            return 1
        state = store.get(args.enrollment)
    elif args.history:
        state["history"] = [t.to_fields() for t in store.transitions(args.enrollment)]  # workers.state.transitions
    print(json.dumps(state))
    return 0
