"""Reading one folder's new mail from its cursor, without touching a flag.

The folder is opened with EXAMINE (read-only: no ``\\Recent`` or ``\\Seen`` changes) and read
with ``BODY.PEEK``. New mail is every UID after the cursor's (``UID SEARCH UID last+1:*``); its
Message-ID and INTERNALDATE come in one ``UID FETCH`` per batch of UIDs. Mail the ledger says
was processed is skipped; mail received before ``since`` (old mail a rep moved in) is not new.
The rest goes out in jobs of up to ``MAX_MAILS_PER_JOB``; the cursor is stored after each batch
is enqueued, never before (``cursor``'s docstring says why).

Without a cursor (a folder read for the first time) or with another UIDVALIDITY (the folder was
recreated), every UID received since ``since`` is read; the ledger keeps that from processing
anything twice.

On Gmail (X-GM-EXT-1) the X-GM-MSGID and X-GM-LABELS of each message are read too: a message
under several labels (INBOX and All Mail) is one job, not one per folder (``GmailIds``), and the
rep's own sent mail and drafts, which All Mail holds as well, are never taken.

An item id is ``UIDVALIDITY/UID/folder``: what a worker needs to fetch the mail, and stale (so
the worker looks for the mail elsewhere) as soon as the folder's UIDs start over.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import imapclient

from exchange_listener.core import logs
from exchange_listener.mail.headers import header, mime_headers
from exchange_listener.mail.message_ids import normalize
from exchange_listener.sources.base import MAX_MAILS_PER_JOB, NewMail
from exchange_listener.sources.imap.cursor import Cursor, CursorStore
from exchange_listener.sources.ledger import Ledger, identity

GMAIL_EXTENSION = b"X-GM-EXT-1"  # Gmail's IMAP extensions (X-GM-MSGID, X-GM-LABELS, X-GM-THRID)
FETCH_BATCH = 500  # UIDs per UID FETCH: one round trip each, bounded memory
MESSAGE_ID_ITEM = b"BODY[HEADER.FIELDS (MESSAGE-ID)]"
SCAN_ITEMS = ["UID", "INTERNALDATE", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]


def item_id(folder: str, uidvalidity: int, uid: int) -> str:
    return f"{uidvalidity}/{uid}/{folder}"


def parse_item_id(value: str) -> tuple[str, int, int]:
    """(folder, UIDVALIDITY, UID) of an item id; ``ValueError`` for anything else."""
    validity, uid, folder = value.split("/", 2)
    if not validity.isdigit() or not uid.isdigit() or not folder:
        raise ValueError(f"not an IMAP item id: {value[:80]!r}")
    return folder, int(validity), int(uid)


@dataclasses.dataclass(frozen=True)
class Selected:
    folder: str
    uidvalidity: int
    uidnext: int
    exists: int


def examine(client: imapclient.IMAPClient, folder: str) -> Selected:
    """Open ``folder`` read-only (nothing we do then changes a flag)."""
    info = client.select_folder(folder, readonly=True)
    return Selected(folder, int(info.get(b"UIDVALIDITY", 0)), int(info.get(b"UIDNEXT", 0) or 0),
                    int(info.get(b"EXISTS", 0) or 0))


def received_at(value: Any) -> float:
    """INTERNALDATE as epoch seconds (0.0 when absent)."""
    if not isinstance(value, dt.datetime):
        return 0.0
    return (value if value.tzinfo else value.astimezone()).timestamp()


def _message_id(raw: Any) -> str:
    if not isinstance(raw, bytes | bytearray):
        return ""
    return normalize(header(mime_headers(bytes(raw)), "message-id")) or ""


class GmailIds:
    """X-GM-MSGIDs this process enqueued lately, per mailbox: on Gmail a message is in every
    folder its labels name (INBOX and All Mail at least), each time under another UID; its
    X-GM-MSGID is the same, so a copy met again is not a second job. Bounded; after a restart
    the ledger (by Message-ID) keeps processed mail from being processed again."""

    def __init__(self, per_mailbox: int = 20_000):
        self.per_mailbox = per_mailbox
        self._lock = threading.Lock()
        self._ids: dict[str, collections.OrderedDict[int, None]] = {}
        self._mailbox_locks: dict[str, threading.Lock] = {}

    def lock(self, mailbox: str) -> threading.Lock:
        """Held from ``known`` to ``add``: two folders' watches meeting the same message at once
        (a filter labels it on delivery) must not both take it for new."""
        with self._lock:
            return self._mailbox_locks.setdefault(mailbox, threading.Lock())

    def known(self, mailbox: str, ids: Sequence[int]) -> set[int]:
        with self._lock:
            have = self._ids.get(mailbox)
            return {i for i in ids if i in have} if have else set()

    def add(self, mailbox: str, ids: Sequence[int]) -> None:
        with self._lock:
            have = self._ids.setdefault(mailbox, collections.OrderedDict())
            for i in ids:
                have[i] = None
                have.move_to_end(i)
            while len(have) > self.per_mailbox:
                have.popitem(last=False)


def _own_on_gmail(labels: Any) -> bool:
    """Gmail labels a message the rep sent or is still writing ``\\Sent`` / ``\\Draft``."""
    if not isinstance(labels, tuple | list):
        return False
    names = {(x.decode() if isinstance(x, bytes) else str(x)).lower() for x in labels}
    return bool(names & {"\\sent", "\\draft", "\\drafts"})


def scan(client: imapclient.IMAPClient, mailbox: str, selected: Selected, store: CursorStore, ledger: Ledger,
         enqueue: Callable[[Sequence[NewMail]], None], *, since: float, via: str,
         gmail_ids: GmailIds | None = None) -> int:
    """Enqueue ``selected`` folder's new mail and advance its cursor; returns how many mails were
    enqueued. ``enqueue`` raises when it cannot (Redis away): the cursor then stays put. On a
    server with Gmail's X-GM-EXT-1, a message already enqueued from another of its labels
    (``gmail_ids``) is skipped."""
    folder = selected.folder
    gmail = gmail_ids is not None and GMAIL_EXTENSION in client.capabilities()
    cursor = store.get(mailbox, folder)
    fresh = cursor is None or cursor.uidvalidity != selected.uidvalidity
    if fresh:
        day = dt.datetime.fromtimestamp(max(since, 0.0), dt.UTC).date() - dt.timedelta(days=1)
        uids = sorted(int(u) for u in client.search(["SINCE", day]))
        last = 0
    else:
        assert cursor is not None
        last = cursor.last_uid
        uids = sorted(u for u in (int(x) for x in client.search(["UID", f"{last + 1}:*"])) if u > last)
    enqueued = old = own = 0
    for start in range(0, len(uids), FETCH_BATCH):
        batch = uids[start:start + FETCH_BATCH]
        data = client.fetch(batch, SCAN_ITEMS + (["X-GM-MSGID", "X-GM-LABELS"] if gmail else []))
        seen_at = time.time()
        candidates = []
        labels: dict[str, int] = {}  # item id -> its X-GM-MSGID
        for uid in batch:
            entry = data.get(uid)
            if entry is None:
                continue  # expunged between SEARCH and FETCH
            message_id = _message_id(entry.get(MESSAGE_ID_ITEM))
            received = received_at(entry.get(b"INTERNALDATE"))
            if received and received < since:
                old += 1
                continue
            the_id = item_id(folder, selected.uidvalidity, uid)
            if gmail and _own_on_gmail(entry.get(b"X-GM-LABELS")):
                own += 1  # the rep's own sent mail or draft, which All Mail holds too: never a reply
                continue
            if gmail and isinstance(entry.get(b"X-GM-MSGID"), int):
                labels[the_id] = entry[b"X-GM-MSGID"]
            candidates.append((identity(message_id, the_id), NewMail(
                mailbox=mailbox, item_id=the_id, folder=folder, seen_at=seen_at, via=via,
                message_id=message_id, received_at=received)))
        done = ledger.processed(mailbox, [c[0] for c in candidates])
        mails = [m for key, m in candidates if key not in done]
        with gmail_ids.lock(mailbox) if gmail_ids is not None and labels else contextlib.nullcontext():
            if gmail_ids is not None and labels:
                other_label = gmail_ids.known(mailbox, list(labels.values()))
                mails = [m for m in mails if labels.get(m.item_id) not in other_label]
            for first in range(0, len(mails), MAX_MAILS_PER_JOB):
                enqueue(mails[first:first + MAX_MAILS_PER_JOB])
            if gmail_ids is not None and labels:  # only once enqueued: a failed enqueue is read again
                gmail_ids.add(mailbox, [labels[m.item_id] for m in mails if m.item_id in labels])
        enqueued += len(mails)
        last = max(last, batch[-1])
        store.put(mailbox, folder, Cursor(selected.uidvalidity, last))  # only now: all up to it is enqueued
    if own:
        logs.get_logger().debug("the rep's own sent mail and drafts skipped", mailbox=mailbox, folder=folder,
                                items=own)
    if old and not fresh:  # e.g. an old mail the rep dragged in: said, so it is never silent
        logs.get_logger().info("new UIDs received before the cut-off were not taken", mailbox=mailbox,
                               folder=folder, items=old, cut_off=round(since))
    if fresh:  # mail below UIDNEXT that was not taken is older than ``since``: never read again
        store.put(mailbox, folder, Cursor(selected.uidvalidity, max(last, selected.uidnext - 1, 0)))
    return enqueued
