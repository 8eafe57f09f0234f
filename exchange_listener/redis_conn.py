"""The one way to get a Redis connection, so every part uses the same URL and options.

RQ needs raw bytes (no ``decode_responses``); our own keys are read with ``decode()`` where
needed. Timeouts are bounded so an unreachable Redis is an error, not a hang.
"""
from __future__ import annotations

import redis


def connect(url: str, *, socket_timeout: float | None = 10.0) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5.0,
        socket_timeout=socket_timeout,
        health_check_interval=15,
    )
