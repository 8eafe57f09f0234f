"""Which listener streams which mailbox: leases, liveness and fair share, all in Redis.

Each mailbox is streamed by exactly one listener: the holder of its lease. A lease lasts
``lease_seconds`` unless renewed, so the mailboxes of a listener killed with -9 are free again
after at most one lease time and the others take them over. Every listener takes at most
``ceil(mailboxes / live listeners)``, so a new listener gets a fair share as the others
release their extras.

Keys (named in ``exchange_listener.core.keys``; read by ``exchange-listener status``):

- ``el:lease:<mailbox>`` — string, the holding listener's id; expires after ``lease_seconds``.
- ``el:listeners`` — sorted set, listener id -> epoch seconds of its last heartbeat. A listener
  is live while its score is younger than ``lease_seconds``.
- ``el:listener:<id>`` — hash, expires after ``2 * lease_seconds``: ``host``, ``pid``,
  ``started_at``, ``heartbeat_at``, ``source`` (ews | graph: fair shares are counted among the
  live listeners of one source), ``mailboxes`` (count held), ``groups`` (JSON list of
  ``{"group", "anchor", "mailboxes", "subscribed", "connected", "last_activity"}``, last activity = epoch
  seconds of the last heartbeat or notification on that group's stream).
"""
from __future__ import annotations

import json
import math
import time
from typing import cast

import redis

from exchange_listener.core import keys, redis_conn
from exchange_listener.core.lua import Script

LISTENERS_KEY = keys.LISTENERS
LISTENER_PREFIX = keys.listener("")  # + listener id
lease_key = keys.lease

_CLAIM = Script("lease_claim")
_RELEASE = Script("lease_release")


class Leases:
    """One listener's view of the lease table."""

    def __init__(self, conn: redis.Redis, listener_id: str, lease_seconds: float, source: str = "ews"):
        self.conn = conn
        self.listener_id = listener_id
        self.source = source  # shares are counted among the live listeners of the same source
        self.lease_ms = int(lease_seconds * 1000)
        self.lease_seconds = lease_seconds

    def claim(self, mailboxes: list[str]) -> list[str]:
        """Take or renew the leases of ``mailboxes``; returns those now held by this listener."""
        if not mailboxes:
            return []
        pipe = self.conn.pipeline(transaction=False)
        for mailbox in mailboxes:
            _CLAIM(pipe, lease=keys.lease(mailbox), holder=self.listener_id, ttl_ms=self.lease_ms)
        return [m for m, ok in zip(mailboxes, pipe.execute()) if ok]

    def release(self, mailboxes: list[str]) -> None:
        if not mailboxes:
            return
        pipe = self.conn.pipeline(transaction=False)
        for mailbox in mailboxes:
            _RELEASE(pipe, lease=keys.lease(mailbox), holder=self.listener_id)
        pipe.execute()

    def holders(self, mailboxes: list[str]) -> dict[str, str | None]:
        if not mailboxes:
            return {}
        values = self.conn.mget([keys.lease(m) for m in mailboxes])
        return {m: (redis_conn.text(v) if v is not None else None) for m, v in zip(mailboxes, values)}

    def live_listeners(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        # no withscores: members only (redis-py's type covers every form of ZRANGE's reply)
        ids = [redis_conn.text(i) for i in
               cast(list[bytes | str], self.conn.zrangebyscore(keys.LISTENERS, now - self.lease_seconds, "+inf"))]
        if not ids:
            return []
        pipe = self.conn.pipeline(transaction=False)
        for listener_id in ids:
            pipe.hget(keys.listener(listener_id), "source")
        sources = pipe.execute()  # a listener that names no source (an older one) is an EWS listener
        return [i for i, s in zip(ids, sources) if (redis_conn.text(s) if s is not None else "ews") == self.source]

    def heartbeat(self, info: dict, now: float | None = None) -> None:
        """Publish liveness and group activity; prune listeners long dead."""
        now = time.time() if now is None else now
        key = keys.listener(self.listener_id)
        fields = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in info.items()}
        fields["heartbeat_at"] = repr(now)
        fields["source"] = self.source
        pipe = self.conn.pipeline(transaction=False)
        pipe.zadd(keys.LISTENERS, {self.listener_id: now})
        pipe.zremrangebyscore(keys.LISTENERS, "-inf", now - 10 * self.lease_seconds)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, 2 * self.lease_ms)
        pipe.execute()

    def leave(self) -> None:
        """Remove this listener's liveness records (on clean shutdown)."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.zrem(keys.LISTENERS, self.listener_id)
        pipe.delete(keys.listener(self.listener_id))
        pipe.execute()


def fair_share(total: int, live: int) -> int:
    """Most mailboxes one listener should hold."""
    return math.ceil(total / max(1, live))


def plan(watched: list[str], held: list[str], holders: dict[str, str | None], live: int,
         me: str) -> tuple[list[str], list[str]]:
    """Decide (to_claim, to_release) for one balancing round.

    Keep what we hold (renewed separately) up to the fair share; release the surplus (the
    last-sorted ones, so the choice is stable); claim free mailboxes up to the share.
    """
    watched_set = set(watched)
    held_sorted = sorted(m for m in held if m in watched_set)
    share = fair_share(len(watched), live)
    release = [m for m in held if m not in watched_set] + held_sorted[share:]
    keep = held_sorted[:share]
    room = share - len(keep)
    held_set = set(held)
    free = [m for m in sorted(watched) if m not in held_set and holders.get(m) in (None, me)]
    return free[:max(0, room)], release
