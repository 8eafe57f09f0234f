"""The baseline a user would write in an afternoon, for side-by-side benchmarks.

Same classification and matching code as the product (``workers.classify.headers``, ``workers.state.sends``,
``workers.state.enrollments``); the difference is the plumbing:

- listener: one thread and one streaming subscription per mailbox (exchangelib's own loop),
  one RQ job per NewMailEvent, no job id, no catch-up after a gap, no leases;
- job: a cold exchangelib Account per job and one GetItem per item (``account.fetch``) with the
  MIME content, then classify, match and act;
- worker: RQ's default forking ``Worker`` (a new process per job), with this module preloaded.

    python bench/baseline.py listen --mailboxes FILE   # settings from EXCHANGE_LISTENER_* env
    python bench/baseline.py work
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import redis
from exchangelib import (
    IMPERSONATION,
    Account,
    Configuration,
)
from exchangelib.properties import NewMailEvent
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from exchange_listener.core import config
from exchange_listener.sources.ews import account as ews_account
from workers.classify import classify_message
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

JOB_FUNC = "baseline.handle_event"
FIELDS = ["mime_content", "message_id", "subject", "datetime_received"]


def _configuration(settings, max_connections: int = 1) -> Configuration:
    """Every baseline account shares one Protocol (one pool), as a straightforward client does."""
    return ews_account.make_configuration(settings, pool="baseline", max_connections=max_connections)


def handle_event(mailbox: str, item_id: str) -> str:
    """One job per new-mail event: fetch the item, classify it, stop/pause/bounce its enrollment."""
    settings = config.load()
    account = Account(mailbox, config=_configuration(settings), autodiscover=False, access_type=IMPERSONATION)
    item = next(iter(account.fetch(ids=[(item_id, None)], only_fields=FIELDS)))
    if isinstance(item, Exception):
        return f"gone: {item}"
    result = classify_message(item.mime_content)
    conn = redis.Redis.from_url(settings.redis_url)
    store = EnrollmentStore(conn, pause_days=settings.pause_days)
    ids = list(result.references)
    if result.original_message_id:
        ids.append(result.original_message_id)
    cause = result.message_id or item_id
    for send in SendRegistry(conn).lookup_many(ids):
        common = {"by": result.from_address, "item_id": item_id, "message_id": result.message_id, "mailbox": mailbox}
        if result.kind == "human_reply":
            store.transition(send.enrollment_id, "stopped", "replied", event_key=f"replied:{cause}", **common)
        elif result.kind == "auto_reply":
            store.transition(send.enrollment_id, "paused", "out_of_office", event_key=f"ooo:{cause}",
                             until=result.return_date, **common)
        elif result.kind == "bounce" and result.bounce_type == "hard":
            store.transition(send.enrollment_id, "stopped", "bounced", event_key=f"bounced:{cause}", **common)
    return result.kind


def _stream(mailbox: str, configuration: Configuration, queue: Queue, stop: threading.Event) -> None:
    account = Account(mailbox, config=configuration, autodiscover=False, access_type=IMPERSONATION)
    while not stop.is_set():
        try:
            subscription = account.inbox.subscribe_to_streaming()
            for notification in account.inbox.get_streaming_events(subscription, connection_timeout=1):
                for event in notification.events:
                    if isinstance(event, NewMailEvent):
                        queue.enqueue(JOB_FUNC, mailbox, event.item_id.id)
        except Exception as exc:  # what an afternoon's code does: print, wait, subscribe again  # noqa: BLE001 - recorded in the report, never fatal
            print(f"{mailbox}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr, flush=True)
            time.sleep(1)


def listen(mailboxes: list[str]) -> None:
    settings = config.load()
    configuration = _configuration(settings, max_connections=len(mailboxes) + 2)  # one stream per mailbox
    queue = Queue(settings.queue_name, connection=redis.Redis.from_url(settings.redis_url), serializer=JSONSerializer)
    stop = threading.Event()
    threads = [threading.Thread(target=_stream, args=(m, configuration, queue, stop), daemon=True) for m in mailboxes]
    for thread in threads:
        thread.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop.set()


def work() -> None:
    import baseline  # noqa: F401  (preload the job's module so each forked horse starts warm)

    settings = config.load()
    conn = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=conn, serializer=JSONSerializer)
    Worker([queue], connection=conn, serializer=JSONSerializer).work(logging_level="WARNING")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["listen", "work"])
    parser.add_argument("--mailboxes", help="file with one mailbox address per line (listen)")
    args = parser.parse_args()
    if args.role == "listen":
        with open(args.mailboxes) as fh:
            listen([line.strip() for line in fh if line.strip()])
    else:
        work()
    return 0


if __name__ == "__main__":
    sys.exit(main())
