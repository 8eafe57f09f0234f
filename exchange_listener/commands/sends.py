"""``exchange-listener sends record|import|show|new-id``: the send registry for sending platforms.

``record`` prints the stored send as JSON; ``show`` prints the send a Message-ID belongs to
(exit 1 if none); ``new-id`` prints a fresh, unguessable Message-ID for a domain.
Bad input (no usable Message-ID, no recipient, id owned by another enrollment) exits 2 with
a message naming the problem, and stores nothing.

``import FILE`` (``-``: stdin) records one send per JSON line, ``{"message_id": ID or
"message_ids": [...], "enrollment", "sequence", "mailbox", "to": [...], "cc": [...], "sent_at"}``
(cc and sent_at optional; message_id and message_ids together are one send's ids; any other
field is an error), checked exactly as ``record`` checks its flags, and prints
``{"recorded": N, "rejected": [{"line": K, "error": "..."}]}`` (K counts physical lines from 1;
blank lines are skipped). A rejected line stores nothing and the others are recorded; exit 0 when
every line was recorded, 2 when any was rejected (3 when Redis cannot be reached, 1 when it
refuses a write: what was recorded before stays). Sends are written in batches, each one
transaction (a send is never half-written), so importing the same file again changes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, BinaryIO

import redis

from exchange_listener.commands import add_config_argument, load_settings
from exchange_listener.core import redis_conn

if TYPE_CHECKING:
    from workers.state.sends import SendDraft, SendRegistry



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
    bulk = sub.add_parser("import", help="record sends from a JSON-lines file")
    add_config_argument(bulk)
    bulk.add_argument("file", metavar="FILE", help="one send per line as a JSON object ('-': stdin)")
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
    if args.action == "import":
        return _import(registry, args.file)
    found = registry.get(args.message_id)
    if found is None:
        print(f"exchange-listener sends show: no recorded send has Message-ID {args.message_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(found.as_dict()))
    return 0


def _draft(registry: SendRegistry, line: bytes) -> SendDraft:
    """One line as the send ``sends record`` would take (``SendRegistry.draft`` checks the
    object); ValueError naming the field if not."""
    try:
        text = line.decode("utf-8-sig")  # strict (json.loads(bytes) would let encoded surrogates through)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    return registry.draft(data)


@contextmanager
def _lines(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
    else:
        with open(path, "rb") as fh:
            yield fh


def _import(registry: SendRegistry, path: str) -> int:
    recorded = 0
    rejected: list[tuple[int, str]] = []  # (line, error)
    numbers: deque[list[int]] = deque()  # the line numbers of each batch handed over, oldest first

    def batches(lines: BinaryIO) -> Iterator[list[SendDraft]]:
        """The checked lines, the registry's BATCH_LIMIT at a time (the registry takes the next
        batch while Redis writes the one before, so this checking overlaps Redis's work)."""
        from workers.state.sends import BATCH_LIMIT

        batch: list[SendDraft] = []
        at: list[int] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                batch.append(_draft(registry, line))
            except ValueError as exc:
                rejected.append((number, str(exc)))
                continue
            at.append(number)
            if len(batch) >= BATCH_LIMIT:
                numbers.append(at)
                yield batch
                batch, at = [], []
        if batch:
            numbers.append(at)
            yield batch

    try:
        with _lines(path) as lines:
            for results in registry.record_batches(batches(lines)):
                for number, result in zip(numbers.popleft(), results, strict=True):
                    if isinstance(result, ValueError):
                        rejected.append((number, str(result)))
                    else:
                        recorded += 1
    except OSError as exc:
        print(f"exchange-listener sends import: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except redis.exceptions.RedisError as exc:
        print(f"exchange-listener sends import: stopped after {recorded} sends recorded, each whole (the batch in "
              "flight may or may not be); importing the file again is safe", file=sys.stderr)
        if isinstance(exc, redis.exceptions.ConnectionError):
            raise  # the command's usual "cannot reach Redis", exit 3
        print(f"exchange-listener sends import: Redis refused a batch: {exc}", file=sys.stderr)
        return 1
    rejected.sort()  # refusals by stored sends come after their batch's bad lines
    print(json.dumps({"recorded": recorded, "rejected": [{"line": n, "error": e} for n, e in rejected]}))
    return 2 if rejected else 0
