"""The set of mailboxes to watch, kept in Redis so every listener sees the same list.

Keys (named in ``exchange_listener.core.keys``):

- ``el:mailboxes`` — hash, lower-cased address -> epoch seconds it was added. The time lets a
  listener's first catch-up of a new mailbox enqueue mail that arrived after ``add`` but before
  any listener subscribed, and nothing older.
- ``el:mailboxes:version`` — integer bumped on every change. Listeners poll it (one GET a
  second) instead of re-reading the whole set; a missing version after a Redis data loss is
  reported, not read as "watch nothing".
"""
from __future__ import annotations

import re
import time

import redis

from exchange_listener.core import keys, redis_conn

MAILBOXES_KEY = keys.MAILBOXES
VERSION_KEY = keys.MAILBOXES_VERSION

_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class BadAddress(ValueError):
    """Not an e-mail address; nothing was changed."""


def normalize(address: str) -> str:
    value = address.strip().lower()
    if not _ADDRESS.match(value):
        raise BadAddress(f"not an e-mail address: {address!r}")
    return value


def add(conn: redis.Redis, addresses: list[str], now: float | None = None) -> list[str]:
    """Watch ``addresses``; returns the ones that were new. All are checked before any is written."""
    clean = [normalize(a) for a in addresses]
    now = time.time() if now is None else now
    pipe = conn.pipeline()
    for address in clean:
        pipe.hsetnx(MAILBOXES_KEY, address, repr(now))
    added = [a for a, new in zip(clean, pipe.execute()) if new]
    if added:
        conn.incr(VERSION_KEY)
    return added


def remove(conn: redis.Redis, addresses: list[str]) -> list[str]:
    """Stop watching ``addresses``; returns the ones that were watched."""
    clean = [normalize(a) for a in addresses]
    pipe = conn.pipeline()
    for address in clean:
        pipe.hdel(MAILBOXES_KEY, address)
    removed = [a for a, gone in zip(clean, pipe.execute()) if gone]
    if removed:
        conn.incr(VERSION_KEY)
    return removed


def list_all(conn: redis.Redis) -> dict[str, float]:
    """Every watched address -> the time it was added."""
    return {redis_conn.text(k): float(v) for k, v in conn.hgetall(MAILBOXES_KEY).items()}


def version(conn: redis.Redis) -> int | None:
    """The change counter, or None when the key is missing (never written, or Redis lost its data)."""
    raw = conn.get(VERSION_KEY)
    return None if raw is None else int(raw)
