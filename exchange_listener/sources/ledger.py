"""What was already processed, and where moved mail went: the memory that makes catch-up cheap.

Two records per mailbox, both in Redis (the system of record; nothing here leans on RQ's
result_ttl):

- **processed** — ``el:done:<mailbox>``, a sorted set of short hashes of each processed mail's
  identity (its Message-ID, or its item id when it has none), scored by when it was processed.
  Workers add to it after an item's decision is applied. A catch-up asks it before enqueueing,
  so a mail that was moved to another folder, or caught up again after a restart, is never
  fetched twice. Entries older than ``processed_days`` are trimmed; a catch-up skips mail
  received longer ago than that, so the two horizons agree.
- **moved** — ``el:moved:<mailbox>:<hash of old item id>`` -> new item id, written by the
  listener from MovedEvents (a move gives an item a new id, also a move to Deleted Items or to
  Recoverable Items). A worker whose item is gone follows the chain to where the mail is now.

A job whose mail failed is not in *processed*: a catch-up enqueues it again, and RQ's unique
job id keeps it in the failed registry (``make failed``) rather than silently done.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence

import redis

from exchange_listener.core import keys, redis_conn
from exchange_listener.core.config import default

MAX_HOPS = 16  # moves followed for one item; a longer chain is a loop or an abuse


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def identity(message_id: str | None, item_id: str | None) -> str:
    """The ledger member of one mail: its Message-ID when it has one, else its item id."""
    if message_id:
        return _h("mid\n" + message_id.strip())
    return _h("item\n" + (item_id or ""))


done_key = keys.done


def moved_key(mailbox: str, item_id: str) -> str:
    return keys.moved(mailbox, _h(item_id))


class Ledger:
    """Processed mail and the move map of every mailbox."""

    def __init__(self, conn: redis.Redis, processed_days: int = default("processed_days")):
        self.conn = conn
        self.ttl = int(processed_days * 86400)

    # -- processed -------------------------------------------------------------------------
    def mark_processed(self, mailbox: str, message_id: str | None, item_id: str | None) -> None:
        self.mark_processed_many(mailbox, [(message_id, item_id)])

    def mark_processed_many(self, mailbox: str, marks: Sequence[tuple[str | None, str | None]]) -> None:
        """Every (message_id, item_id) of a job as processed, in one round trip."""
        if not marks:
            return
        now = time.time()
        key = done_key(mailbox)
        pipe = self.conn.pipeline(transaction=False)
        pipe.zadd(key, {identity(message_id, item_id): now for message_id, item_id in marks})
        pipe.zremrangebyscore(key, "-inf", now - self.ttl)
        pipe.expire(key, self.ttl)
        pipe.execute()

    def processed(self, mailbox: str, identities: Sequence[str]) -> set[str]:
        """Which of ``identities`` (see ``identity``) were processed within the horizon."""
        if not identities:
            return set()
        scores = self.conn.zmscore(done_key(mailbox), list(identities))
        horizon = time.time() - self.ttl
        return {i for i, s in zip(identities, scores) if s is not None and s >= horizon}

    def horizon(self) -> float:
        """Mail received before this epoch second is older than anything remembered."""
        return time.time() - self.ttl

    # -- moved -----------------------------------------------------------------------------
    def record_moves(self, mailbox: str, moves: Iterable[tuple[str, str]]) -> None:
        pipe = self.conn.pipeline(transaction=False)
        for old_id, new_id in moves:
            if old_id and new_id and old_id != new_id:
                pipe.set(moved_key(mailbox, old_id), new_id, ex=self.ttl)
        if len(pipe):
            pipe.execute()

    def where_now(self, mailbox: str, item_id: str) -> str | None:
        """The item's id after every recorded move, or None when it never moved."""
        current, seen = item_id, {item_id}
        for _ in range(MAX_HOPS):
            nxt = self.conn.get(moved_key(mailbox, current))
            if nxt is None:
                break
            current = redis_conn.text(nxt)
            if current in seen:
                break
            seen.add(current)
        return None if current == item_id else current

    def forget_mailbox(self, mailbox: str) -> None:
        self.conn.delete(done_key(mailbox))
