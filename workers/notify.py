"""Tell the sending platform about each enrollment transition: Redis state, webhook, callable.

1. Redis state (always): ``el:enrollment:{id}`` is what the platform checks before each send;
   every transition is also appended to the ``el:transitions`` stream (XREAD to follow it).
2. Webhook (``webhook_url``): POST of the transition as JSON with headers
   ``X-Exchange-Listener-Timestamp`` (unix seconds), ``X-Exchange-Listener-Signature``
   (``sha256=`` + hex HMAC-SHA256 with ``webhook_secret`` over ``"{timestamp}.{body}"``) and
   ``X-Exchange-Listener-Delivery`` / ``Idempotency-Key`` (the transition id). Any 2xx is success;
   anything else is retried with exponential backoff, then listed by ``failed()``.
3. Callable (``callback``, dotted path ``pkg.mod.func`` or ``pkg.mod:func``): called with the
   transition dict.

Why nothing is lost: ``EnrollmentStore.transition`` writes the transition id into the outbox
zset ``el:outbox`` in the same Lua step as the state change. ``drain()`` claims due entries by
pushing their score to now + lease (one Lua step, so concurrent drainers never take the same
entry), delivers, then removes them. A drainer that dies mid-delivery leaves its entries to
come due again when the lease runs out, and another drain delivers them. So each transition
reaches the webhook at least once and, barring a crash between a successful POST and the
removal, exactly once; receivers deduplicate by the delivery id. The callback and the
webhook are tracked separately, so a failing webhook never calls the callback twice and
never holds it up. Once a channel fails in a drain, that drain tries it no more (the rest wait
a short while without losing an attempt), so a job's drain waits for at most one timeout.

Workers call ``notifier.drain()`` after each job and ``notifier.start_timer()`` once.

API::

    notifier = Notifier.from_settings(redis, settings)   # or Notifier(redis, webhook_url=..., ...)
    notifier.drain(limit=100) -> DrainResult(delivered, retrying, failed)
    notifier.start_timer(interval=5.0) -> Timer   # background drains; .stop()
    notifier.pending() -> list[dict]   # waiting or retrying: id, enrollment_id, status, attempts,
                                       # next_attempt_at, last_error
    notifier.failed() -> list[dict]    # gave up after max_attempts: id, transition, attempts, last_error
    notifier.retry_failed(ids=None) -> int
    notifier.stats() -> dict           # counters: delivered, attempts_failed, gave_up
    sign(secret, timestamp, body) -> str;  verify(secret, timestamp, body, signature, tolerance=300)

Redis keys: ``el:outbox`` (zset id -> epoch ms when next due), ``el:transition:{id}`` (JSON),
``el:outbox:state:{id}`` (hash: attempts, last_error, done:webhook, done:callback; 180 days),
``el:outbox:failed`` (hash id -> JSON), ``el:notify:stats`` (hash of counters).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import importlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
import requests

from exchange_listener import logs
from exchange_listener.config import ConfigError, _redact_url
from workers.enrollments import OUTBOX_KEY, iso, transition_key

FAILED_KEY = "el:outbox:failed"
STATS_KEY = "el:notify:stats"
STATE_TTL = 180 * 86400  # an entry's delivery state outlives any retry schedule
SIGNATURE_HEADER = "X-Exchange-Listener-Signature"
TIMESTAMP_HEADER = "X-Exchange-Listener-Timestamp"
DELIVERY_HEADER = "X-Exchange-Listener-Delivery"



def state_key(transition_id: str) -> str:
    return f"el:outbox:state:{transition_id}"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, tolerance: float = 300) -> bool:
    """For receivers: the signature matches and the timestamp is within ``tolerance`` seconds."""
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance
    except (TypeError, ValueError):
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature or "")


def load_callable(path: str) -> Callable[[dict], Any]:
    """``pkg.mod.func`` or ``pkg.mod:func`` -> the function; ConfigError naming the key if not."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr) if module_name and attr else None
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"callback: cannot load {path!r} ({type(exc).__name__}: {exc})") from None
    if not callable(target):
        raise ConfigError(f"callback: {path!r} is not a callable")
    return target


# KEYS: 1 outbox; ARGV: 1 now_ms, 2 lease_ms, 3 limit. Claims due ids by moving them a lease ahead.
_CLAIM_LUA = r"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], until_ms, id) end
return ids
"""


# KEYS: 1 failed hash, 2 state hash, 3 outbox; ARGV: 1 id, 2 now_ms. Only a failed id goes back.
_REQUEUE_LUA = r"""
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], 'attempts', 'last_error')
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""


@dataclasses.dataclass
class DrainResult:
    delivered: int = 0
    retrying: int = 0
    failed: int = 0


class Timer(threading.Thread):
    """Background drains every ``interval`` seconds until ``stop()``."""

    batch = 100

    def __init__(self, notifier: Notifier, interval: float):
        super().__init__(name="notify-drain", daemon=True)
        self.notifier, self.interval, self._stop_event = notifier, interval, threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                while not self._stop_event.is_set() and self.notifier.drain().delivered >= self.batch:
                    pass  # a backlog: keep going
            except Exception as exc:  # noqa: BLE001 - the timer must outlive a Redis outage or a bad entry
                logs.get_logger(component="notify").warning("notify drain failed", error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 10)


class Notifier:
    """Delivers outbox transitions to the configured webhook and callable."""

    def __init__(self, redis_client: redis.Redis, *, webhook_url: str = "", webhook_secret: str = "",
                 webhook_timeout: float = 5.0, callback: str | Callable[[dict], Any] | None = None,
                 max_attempts: int = 12, backoff_base: float = 2.0, backoff_max: float = 3600.0,
                 lease_seconds: float | None = None):
        if webhook_url and not webhook_secret:
            raise ConfigError("webhook_secret: required when webhook_url is set")
        self.redis = redis_client
        self.webhook_url, self._secret, self.webhook_timeout = webhook_url, webhook_secret, webhook_timeout
        self.callback = load_callable(callback) if isinstance(callback, str) and callback else (callback or None)
        self.max_attempts, self.backoff_base, self.backoff_max = max_attempts, backoff_base, backoff_max
        self.lease_ms = int(1000 * (lease_seconds if lease_seconds is not None else max(30.0, 3 * webhook_timeout + 10)))
        self.channels = [name for name, on in (("webhook", webhook_url), ("callback", self.callback)) if on]
        self._claim = redis_client.register_script(_CLAIM_LUA)
        self._requeue = redis_client.register_script(_REQUEUE_LUA)
        self._local = threading.local()  # one requests.Session per thread (timer and job threads)

    @classmethod
    def from_settings(cls, redis_client: redis.Redis, settings) -> Notifier:
        return cls(redis_client, webhook_url=settings.webhook_url, webhook_secret=settings.webhook_secret,
                   webhook_timeout=settings.webhook_timeout, callback=settings.callback or None)

    def __repr__(self) -> str:  # never show the secret
        return f"Notifier(webhook_url={_redact_url(self.webhook_url)!r}, channels={self.channels})"

    # -- delivery ------------------------------------------------------------------------
    def _safe(self, exc: BaseException) -> str:
        """An error description with no secret and no URL credentials in it."""
        text = f"{type(exc).__name__}: {exc}"
        if self.webhook_url:
            text = text.replace(self.webhook_url, _redact_url(self.webhook_url))
            # requests names only the path and query ("url: /hooks/T0/abc?token=..."): tokens
            # often live there, so neither is repeated
            parts = urlsplit(self.webhook_url)
            for piece in (parts.query, parts.path if len(parts.path) > 1 else ""):
                if piece:
                    text = text.replace(piece, "***")
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:500]

    def _post(self, transition: dict) -> None:
        body = json.dumps({"type": "enrollment.transition", **transition}, sort_keys=True,
                          separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "exchange-listener",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
            DELIVERY_HEADER: transition["id"],
            "Idempotency-Key": transition["id"],
        }
        session = getattr(self._local, "session", None) or requests.Session()
        self._local.session = session
        response = session.post(self.webhook_url, data=body, headers=headers, timeout=self.webhook_timeout,
                                allow_redirects=False)
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"webhook answered HTTP {response.status_code}")

    def _deliver(self, channel: str, transition: dict) -> None:
        if channel == "webhook":
            self._post(transition)
        else:
            self.callback(dict(transition))

    def _settle(self, tid: str, transition: dict, error: str | None, bound, result: DrainResult) -> None:
        """Remove a delivered entry; reschedule a failed one with backoff, or give up on it."""
        if error is None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(OUTBOX_KEY, tid).delete(state_key(tid)).hincrby(STATS_KEY, "delivered", 1)
            pipe.execute()
            result.delivered += 1
            if self.channels:
                bound.info("transition delivered", status=transition.get("status"), channels=self.channels)
            return
        attempts, _ = self.redis.pipeline(transaction=False).hincrby(state_key(tid), "attempts", 1).expire(
            state_key(tid), STATE_TTL).execute()
        self.redis.hincrby(STATS_KEY, "attempts_failed", 1)
        if attempts >= self.max_attempts:
            record = {"id": tid, "transition": transition, "attempts": attempts, "last_error": error,
                      "failed_at": iso_now()}
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(FAILED_KEY, tid, json.dumps(record)).zrem(OUTBOX_KEY, tid)
            pipe.hincrby(STATS_KEY, "gave_up", 1)
            pipe.execute()
            result.failed += 1
            bound.error("transition notification failed, giving up", attempts=attempts, error=error)
            return
        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempts - 1))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(state_key(tid), mapping={"last_error": error, "last_attempt_at": iso_now()})
        pipe.zadd(OUTBOX_KEY, {tid: int((time.time() + delay) * 1000)})
        pipe.execute()
        result.retrying += 1
        bound.warning("transition notification failed, will retry", attempts=attempts,
                      retry_in_seconds=round(delay, 1), error=error)

    def drain(self, limit: int = 100) -> DrainResult:
        """Deliver every due transition (up to ``limit``); never sleeps, failures are rescheduled."""
        result = DrainResult()
        now_ms = int(time.time() * 1000)
        ids = [i.decode() for i in self._claim(keys=[OUTBOX_KEY], args=[now_ms, self.lease_ms, limit])]
        if not ids:
            return result
        pipe = self.redis.pipeline(transaction=False)
        for tid in ids:
            pipe.get(transition_key(tid))
            pipe.hgetall(state_key(tid))
        fetched = pipe.execute()
        down: dict[str, str] = {}  # channel -> error, for channels that failed in this drain
        for index, tid in enumerate(ids):
            if time.time() * 1000 - now_ms > self.lease_ms / 2:
                # a slow receiver: hand the rest back before our lease on them runs out, so no
                # other drainer delivers them while we still might
                self.redis.zadd(OUTBOX_KEY, {rest: int(time.time() * 1000) for rest in ids[index:]})
                result.retrying += len(ids) - index
                break
            raw, state = fetched[2 * index], {k.decode(): v.decode() for k, v in fetched[2 * index + 1].items()}
            if raw is None:  # expired with the retention: nothing left to tell
                self.redis.zrem(OUTBOX_KEY, tid)
                continue
            transition = json.loads(raw)
            bound = logs.get_logger(component="notify", transition_id=tid,
                                    enrollment_id=transition.get("enrollment_id"), mailbox=transition.get("mailbox"))
            errors, tried = [], False
            for channel in (c for c in self.channels if not state.get(f"done:{c}")):
                if channel in down:  # it failed earlier in this drain: don't spend another timeout now
                    errors.append(f"{channel}: {down[channel]}")
                    continue
                try:
                    self._deliver(channel, transition)
                except Exception as exc:  # noqa: BLE001 - any failure is retried, never fatal
                    down[channel], tried = self._safe(exc), True
                    errors.append(f"{channel}: {down[channel]}")
                    continue
                self.redis.hset(state_key(tid), f"done:{channel}", 1)
            if errors and not tried:  # only skipped: try again soon, without counting an attempt
                self.redis.zadd(OUTBOX_KEY, {tid: int((time.time() + self.backoff_base) * 1000)})
                result.retrying += 1
                continue
            error = "; ".join(errors) or None
            self._settle(tid, transition, error, bound, result)
        return result

    def start_timer(self, interval: float = 5.0) -> Timer:
        timer = Timer(self, interval)
        timer.start()
        return timer

    # -- visibility ----------------------------------------------------------------------
    def pending(self) -> list[dict]:
        entries = self.redis.zrange(OUTBOX_KEY, 0, -1, withscores=True)
        pipe = self.redis.pipeline(transaction=False)
        for tid, _ in entries:
            pipe.get(transition_key(tid.decode()))
            pipe.hgetall(state_key(tid.decode()))
        fetched = pipe.execute()
        out = []
        for index, (tid, score) in enumerate(entries):
            transition = json.loads(fetched[2 * index] or "{}")
            state = {k.decode(): v.decode() for k, v in fetched[2 * index + 1].items()}
            out.append({"id": tid.decode(), "enrollment_id": transition.get("enrollment_id"),
                        "status": transition.get("status"), "attempts": int(state.get("attempts", 0)),
                        "next_attempt_at": iso_from_ms(score), "last_error": state.get("last_error")})
        return out

    def failed(self) -> list[dict]:
        return [json.loads(v) for v in self.redis.hvals(FAILED_KEY)]

    def retry_failed(self, ids: list[str] | None = None) -> int:
        """Put failed transitions back in the outbox with a fresh attempt count."""
        ids = ids if ids is not None else [k.decode() for k in self.redis.hkeys(FAILED_KEY)]
        now_ms = int(time.time() * 1000)
        return sum(self._requeue(keys=[FAILED_KEY, state_key(tid), OUTBOX_KEY], args=[tid, now_ms]) for tid in ids)

    def stats(self) -> dict:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}


def iso_now() -> str:
    return iso_from_ms(time.time() * 1000)


def iso_from_ms(ms: float) -> str:
    return iso(dt.datetime.fromtimestamp(ms / 1000, dt.UTC))
