"""The set of mailboxes to watch, kept in Redis so every listener sees the same list.

Keys (named in ``exchange_listener.core.keys``):

- ``el:mailboxes`` — hash, lower-cased address -> epoch seconds it was added. The time lets a
  listener's first catch-up of a new mailbox enqueue mail that arrived after ``add`` but before
  any listener subscribed, and nothing older.
- ``el:mailboxes:source`` — hash, address -> the source that watches it (``graph``, ``imap``), for the
  mailboxes not on EWS (an absent field means ``ews``, so sets written before sources existed
  read unchanged). A tenant mid-migration watches some mailboxes by EWS, some by Graph; adding
  a watched address again with another source moves it.
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
SOURCES_KEY = keys.MAILBOX_SOURCES
SOURCES = ("ews", "graph", "imap")

_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class BadAddress(ValueError):
    """Not an e-mail address; nothing was changed."""


def normalize(address: str) -> str:
    value = address.strip().lower()
    if not _ADDRESS.match(value):
        raise BadAddress(f"not an e-mail address: {address!r}")
    return value


def add(conn: redis.Redis, addresses: list[str], now: float | None = None,
        source: str = "ews") -> list[str]:
    """Watch ``addresses`` through ``source``; returns the ones that were new, or that moved from
    another source. All are checked before any is written."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    clean = [normalize(a) for a in addresses]
    now = time.time() if now is None else now
    before = sources(conn, clean)
    pipe = conn.pipeline()
    for address in clean:
        pipe.hsetnx(MAILBOXES_KEY, address, repr(now))
        if source == "ews":
            pipe.hdel(SOURCES_KEY, address)
        else:
            pipe.hset(SOURCES_KEY, address, source)
    replies = pipe.execute()
    added = [a for a, new in zip(clean, replies[::2]) if new or before.get(a, "ews") != source]
    if added:
        conn.incr(VERSION_KEY)
    return added


def remove(conn: redis.Redis, addresses: list[str]) -> list[str]:
    """Stop watching ``addresses``; returns the ones that were watched."""
    clean = [normalize(a) for a in addresses]
    pipe = conn.pipeline()
    for address in clean:
        pipe.hdel(MAILBOXES_KEY, address)
        pipe.hdel(SOURCES_KEY, address)
    removed = [a for a, gone in zip(clean, pipe.execute()[::2]) if gone]
    if removed:
        conn.incr(VERSION_KEY)
    return removed


def list_all(conn: redis.Redis, source: str | None = None) -> dict[str, float]:
    """Every watched address (of ``source``, when given) -> the time it was added."""
    every = {redis_conn.text(k): float(v) for k, v in conn.hgetall(MAILBOXES_KEY).items()}
    if source is None:
        return every
    of = sources(conn)
    return {a: t for a, t in every.items() if of.get(a, "ews") == source}


def sources(conn: redis.Redis, addresses: list[str] | None = None) -> dict[str, str]:
    """Address -> source for the mailboxes not on EWS (all of them, or those of ``addresses``)."""
    if addresses is None:
        return {redis_conn.text(k): redis_conn.text(v) for k, v in conn.hgetall(SOURCES_KEY).items()}
    if not addresses:
        return {}
    values = conn.hmget(SOURCES_KEY, addresses)
    return {a: redis_conn.text(v) for a, v in zip(addresses, values) if v is not None}


def version(conn: redis.Redis) -> int | None:
    """The change counter, or None when the key is missing (never written, or Redis lost its data)."""
    raw = conn.get(VERSION_KEY)
    return None if raw is None else int(raw)
