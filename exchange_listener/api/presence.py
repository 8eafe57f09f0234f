"""The API process's heartbeat in Redis, so ``exchange-listener status`` shows it and notices it die.

Each running API process keeps one field of the hash ``el:api:processes`` (``keys.API_PROCESSES``):
its id -> JSON ``{"address", "host", "pid", "started_at", "heartbeat_at"}`` (epoch seconds),
rewritten every ``interval`` seconds. ``exchange_listener.health`` reads it: a heartbeat older
than ``lease_seconds`` makes status unhealthy, like a stale listener. A process that stops cleanly
removes its field; a dead one's field stays (that is how status notices it) until any API process
prunes fields silent for ten times the stale limit. One hash, not a key per process, so status
finds every process with one HGETALL instead of a scan of the keyspace.
"""
from __future__ import annotations

import json
import os
import socket
import time

import redis

from exchange_listener.core import keys, redis_conn


def process_id(port: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{port}"


class Presence:
    """Writes and removes one API process's heartbeat field."""

    def __init__(self, conn: redis.Redis, process: str, address: str, prune_after: float):
        self.conn = conn
        self.process = process
        self.info = {"address": address, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
        self.prune_after = prune_after

    def beat(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        found = self.conn.hgetall(keys.API_PROCESSES)
        gone = []
        for raw_id, raw in found.items():
            try:
                at = float(json.loads(raw)["heartbeat_at"])
            except (ValueError, KeyError, TypeError):
                at = 0.0
            if now - at > self.prune_after:
                gone.append(redis_conn.text(raw_id))
        pipe = self.conn.pipeline(transaction=False)
        if gone:
            pipe.hdel(keys.API_PROCESSES, *gone)
        pipe.hset(keys.API_PROCESSES, self.process, json.dumps({**self.info, "heartbeat_at": now}))
        pipe.execute()

    def leave(self) -> None:
        self.conn.hdel(keys.API_PROCESSES, self.process)
