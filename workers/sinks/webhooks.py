"""Tell the sending platform about each enrollment transition: Redis state, webhook, callable, Salesforce.

1. Redis state (always): ``el:enrollment:{id}`` is what the platform checks before each send;
   every transition is also appended to the ``el:transitions`` stream (XREAD to follow it), in
   the same Lua step that numbers it, so the stream holds each enrollment's versions in order.
2. Webhook (``webhook_url``): POST of the transition as JSON (``Transition.webhook_body``), signed per Standard Webhooks
   (``webhook-id`` = transition id, ``webhook-timestamp``, ``webhook-signature`` = ``v1,`` +
   base64 HMAC-SHA256 over ``"{id}.{timestamp}.{body}"``) so receivers can verify it with
   off-the-shelf code; for one more release also the legacy headers
   ``X-Exchange-Listener-Timestamp``, ``X-Exchange-Listener-Signature`` (``sha256=`` + hex
   HMAC-SHA256 over ``"{timestamp}.{body}"``), ``X-Exchange-Listener-Delivery`` and
   ``Idempotency-Key``. Any 2xx is success; anything else is retried with exponential backoff,
   then listed by ``failed()``. docs/webhooks.md is the receiver's guide.
3. Callable (``callback``, dotted path ``pkg.mod.func`` or ``pkg.mod:func``): called with the
   transition dict (``Transition.to_fields``), in a thread of its own for at most ``callback_timeout`` seconds; a call that
   has not returned by then counts as a failed attempt and its thread is abandoned (Python
   cannot stop a thread). Calls in one process take turns (a lock shared by the job's drain and
   the timer's), and while the last call's thread is still alive (abandoned, or its drain cut
   short by RQ's job timeout) no new call starts, for any transition: those entries are handed
   back without spending an attempt. So calls never overlap in a process, and a later version
   never overtakes an abandoned call there. Across worker processes it can: docs/webhooks.md
   tells receivers to apply only a higher ``version``.
4. Salesforce (``salesforce_login_url``): a reply, bounce or out-of-office (``salesforce_events``)
   logged as a Task or EmailMessage on the prospect's Contact or Lead, once per transition id
   (``workers.sinks.salesforce``; docs/salesforce.md). No matching record: noted and done.
   Salesforce down (unreachable, timeouts, 5xx, REQUEST_LIMIT_EXCEEDED - a rolling 24-hour org
   limit) spends no attempt: the entries are handed back, like a busy callable, and the channel
   backs off on its own schedule (Salesforce's Retry-After if it sent one, at most an hour; else
   doubling per drain that found it down, from ``backoff_base`` to 15 minutes; at least 5 minutes
   for REQUEST_LIMIT_EXCEEDED; per worker process, reset by a success). ``attempts`` is one count
   per entry for all channels, so an outage spending it would give up replies and abandon their
   webhook delivery too: nothing is ever given up because Salesforce was down or over its limit.
   Any other refusal (a 4xx, a refused token) spends an attempt and is given up as a webhook's.
   One delivery is several requests: it gets an absolute deadline from the channel's budget, so
   it never outlives the drain's share of the lease.

Why nothing is lost: ``EnrollmentStore.transition`` writes the transition id into the outbox
zset ``el:outbox`` in the same Lua step as the state change. ``drain()`` claims due entries by
pushing their score to now + lease (one Lua step, so concurrent drainers never take the same
entry), delivers, then removes them. A drainer that dies mid-delivery leaves its entries to
come due again when the lease runs out, and another drain delivers them. So each transition
reaches each channel at least once and, barring a crash between a successful delivery and its
bookkeeping, exactly once; receivers deduplicate by the transition id.

Why the order holds: each channel (webhook, callable, salesforce) is tracked per entry (``done:{channel}``),
and a transition goes to a channel only once its enrollment's previous version is done there
(or left the outbox: delivered, given up, expired). A held transition is parked just behind its
predecessor's due time and woken as soon as the predecessor is through, so a retried
transition holds back only the later transitions of its own enrollment; others flow.
``retry_failed`` puts each enrollment's given-up transitions back in one step, in version order.

Why one stuck receiver delays nobody else: the channels run side by side in a drain. A
channel whose receiver is down (timeout, unreachable, HTTP 5xx/408/429, a callable that does
not return, Salesforce down) is not tried again in that drain: the rest wait a short while (Salesforce:
its back-off above) without losing an attempt. A drain waits for the webhook at most ``webhook_timeout`` in total: once that much time
has gone into POSTs, the rest are handed back (a POST cut short by this budget is not counted as
a failure); Salesforce gets twice ``webhook_timeout`` (a delivery is a few requests; one cut
short by this budget is handed back, not counted). RQ's job timeout (``rq.timeouts.BaseTimeoutException``) is never taken for a failed
delivery: it ends the drain, and the claimed entries come back when their lease runs out.

Workers call ``notifier.drain()`` after each job and ``notifier.start_timer()`` once.

API::

    notifier = Notifier.from_settings(redis, settings)   # or Notifier(redis, webhook_url=..., ...)
    notifier.drain(limit=100) -> DrainResult(delivered, retrying, failed, held, more)
    notifier.start_timer(interval=5.0) -> Timer   # background drains; .stop()
    notifier.pending() -> list[dict]   # waiting or retrying: id, enrollment_id, status, attempts,
                                       # next_attempt_at, last_error, held_behind
    notifier.failed() -> list[dict]    # gave up after max_attempts: id, transition, attempts, last_error
    notifier.retry_failed(ids=None) -> int
    notifier.stats() -> dict           # counters: delivered, attempts_failed, gave_up
    sign(secret, timestamp, body) -> str;  verify(secret, timestamp, body, signature, tolerance=300)
    signing_key(secret) -> bytes;  standard_signature(key, msg_id, timestamp, body) -> str

Redis keys (named in ``exchange_listener.core.keys``): ``el:outbox`` (zset id -> epoch ms when next due),
``el:transition:{id}`` (JSON of a ``workers.state.transitions.Transition``),
``el:outbox:state:{id}`` (hash: attempts, last_error, done:webhook, done:callback, done:salesforce, and for
ordering behind/parked_at/waiter; 180 days), ``el:outbox:failed`` (hash id -> JSON),
``el:notify:stats`` (hash of counters).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import importlib
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
import requests
from rq.timeouts import BaseTimeoutException
from structlog.typing import FilteringBoundLogger

from exchange_listener.core import keys, logs, redis_conn
from exchange_listener.core.backoff import delay as backoff_delay
from exchange_listener.core.config import ConfigError, Settings, default
from exchange_listener.core.lua import Script
from workers.sinks.salesforce import Down as SalesforceDown
from workers.sinks.salesforce import SalesforceSink
from workers.state.enrollments import iso
from workers.state.transitions import Transition

OUTBOX_KEY = keys.OUTBOX
FAILED_KEY = keys.OUTBOX_FAILED
STATS_KEY = keys.NOTIFY_STATS
STATE_TTL = 180 * 86400  # an entry's delivery state outlives any retry schedule
SIGNATURE_HEADER = "X-Exchange-Listener-Signature"  # legacy, kept for one release
TIMESTAMP_HEADER = "X-Exchange-Listener-Timestamp"  # legacy
DELIVERY_HEADER = "X-Exchange-Listener-Delivery"  # legacy
WEBHOOK_ID_HEADER = "webhook-id"
WEBHOOK_TIMESTAMP_HEADER = "webhook-timestamp"
WEBHOOK_SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
DEFAULT_CALLBACK_TIMEOUT = default("callback_timeout")
_NEVER_MS = 2**52  # a due time later than any real one
SALESFORCE_BACKOFF_MAX = 900.0  # Salesforce down: the channel's back-off grows to 15 minutes
SALESFORCE_LIMIT_BACKOFF = 300.0  # REQUEST_LIMIT_EXCEEDED (a rolling 24-hour limit): at least 5 minutes
SALESFORCE_RETRY_AFTER_MAX = 3600.0  # a Retry-After beyond this is taken as an hour


state_key = keys.outbox_state


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The legacy signature header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, tolerance: float = 300) -> bool:
    """For receivers of the legacy headers: the signature matches and the timestamp is within
    ``tolerance`` seconds."""
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance
    except (TypeError, ValueError):
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature or "")


def signing_key(secret: str) -> bytes:
    """The Standard Webhooks HMAC key for ``webhook_secret``.

    A ``whsec_`` secret is base64 after the prefix, as the spec has it, and is decoded (what
    the spec's libraries do with it). Any other secret is used as its UTF-8 bytes, so existing
    plain secrets keep working; a receiver then hands the library those bytes
    (``Webhook(secret.encode())``) - a str would be taken for base64. ConfigError if a
    ``whsec_`` secret is not base64 (the message never repeats the secret).
    """
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode()
    encoded = secret[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ConfigError("webhook_secret: a secret starting with 'whsec_' must be base64 after the prefix "
                          "(or use a secret without that prefix)")
    return key


def standard_signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body``."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


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


_CLAIM = Script("outbox_claim")  # due ids, moved a lease ahead
_REQUEUE = Script("outbox_requeue")  # failed ids back, due in the order given
_PARK = Script("outbox_park")  # behind the enrollment's previous transition, if it still blocks
_WAKE = Script("outbox_wake")  # a parked entry, once its predecessor is through


class ReceiverDown(Exception):
    """The receiver is unavailable as a whole (not just for this transition): another attempt in
    the same drain would only spend another timeout."""


class CallbackTimeout(ReceiverDown, TimeoutError):
    """The callable did not return within ``callback_timeout``."""


class _Skip(Exception):
    """Not tried in this drain; no attempt spent. ``delay``: seconds until it is due again;
    ``channel_busy``: nothing else can go to this channel in this drain either."""

    def __init__(self, reason: str, delay: float = 0.0, channel_busy: bool = False):
        super().__init__(reason)
        self.delay, self.channel_busy = delay, channel_busy


@dataclasses.dataclass
class DrainResult:
    delivered: int = 0
    retrying: int = 0  # failed (backoff) or not tried in this drain
    failed: int = 0  # gave up
    held: int = 0  # waiting for their enrollment's previous transition
    more: bool = False  # due entries were left for the next drain (batch full or out of time)


@dataclasses.dataclass
class _Entry:
    """One claimed outbox entry during a drain; each channel's thread writes only its own channel."""

    tid: str
    transition: Transition
    state: dict
    pred: str | None = None  # id of the enrollment's previous transition
    pred_pending: set = dataclasses.field(default_factory=set)  # channels the predecessor lacked (out of batch)
    done: set = dataclasses.field(default_factory=set)
    errors: dict = dataclasses.field(default_factory=dict)  # channel -> error (an attempt spent)
    held: set = dataclasses.field(default_factory=set)  # channels waiting for the predecessor
    skipped: dict = dataclasses.field(default_factory=dict)  # channel -> due delay in seconds
    notes: dict = dataclasses.field(default_factory=dict)  # channel -> why it was handed back (shown as last_error)

    @property
    def enrollment_id(self) -> str:
        return self.transition.enrollment_id

    @property
    def version(self) -> int:
        return int(self.transition.version or 0)


class Timer(threading.Thread):
    """Background drains every ``interval`` seconds until ``stop()``."""

    def __init__(self, notifier: Notifier, interval: float):
        super().__init__(name="notify-drain", daemon=True)
        self.notifier, self.interval, self._stop_event = notifier, interval, threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                while not self._stop_event.is_set() and self.notifier.drain().more:
                    pass  # a backlog: keep going
            except BaseTimeoutException:
                raise
            except Exception as exc:  # noqa: BLE001 - the timer must outlive a Redis outage or a bad entry
                logs.get_logger(component="notify").warning("notify drain failed", error=self.notifier._safe(exc))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 10)


def _in_version_order(entries: list[_Entry]) -> list[_Entry]:
    """The batch with each enrollment's entries sorted by version (in the slots they held)."""
    slots: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        slots.setdefault(entry.enrollment_id, []).append(index)
    ordered = list(entries)
    for indexes in slots.values():
        for index, entry in zip(indexes, sorted((entries[i] for i in indexes), key=lambda e: e.version)):
            ordered[index] = entry
    return ordered


class Notifier:
    """Delivers outbox transitions to the configured webhook, callable and Salesforce."""

    def __init__(self, redis_client: redis.Redis, *, webhook_url: str = "", webhook_secret: str = "",
                 webhook_timeout: float = default("webhook_timeout"), callback: str | Callable[[dict], Any] | None = None,
                 callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT, max_attempts: int = 12,
                 backoff_base: float = 2.0, backoff_max: float = 3600.0, lease_seconds: float | None = None,
                 salesforce: SalesforceSink | None = None):
        if webhook_url and not webhook_secret:
            raise ConfigError("webhook_secret: required when webhook_url is set")
        self.redis = redis_client
        self.webhook_url, self._secret, self.webhook_timeout = webhook_url, webhook_secret, webhook_timeout
        self._key = signing_key(webhook_secret) if webhook_url else b""
        self.callback = load_callable(callback) if isinstance(callback, str) and callback else (callback or None)
        self.callback_timeout = callback_timeout
        self.salesforce = salesforce
        self.salesforce_budget = salesforce.budget if salesforce else 0.0
        self._salesforce_down = 0  # drains in a row that found Salesforce down (its back-off grows with it)
        self.max_attempts, self.backoff_base, self.backoff_max = max_attempts, backoff_base, backoff_max
        slowest = max(webhook_timeout, callback_timeout, self.salesforce_budget)
        self.lease_ms = int(1000 * (lease_seconds if lease_seconds is not None else max(30.0, 3 * slowest + 10)))
        self.channels = [name for name, on in (("webhook", webhook_url), ("callback", self.callback),
                                               ("salesforce", salesforce)) if on]
        self._sessions: list[requests.Session] = []  # idle HTTP sessions (keep-alive across drains)
        self._lock = threading.Lock()
        self._redact = _url_redactor(webhook_url, webhook_secret)
        # the callable: one call at a time in this process; the latest call's "returned" event,
        # recorded before it starts, so a call cut off by a timeout (ours or RQ's) is never overlapped
        self._call_lock = threading.Lock()
        self._last_call_done: threading.Event | None = None

    @classmethod
    def from_settings(cls, redis_client: redis.Redis, settings: Settings) -> Notifier:
        on = getattr(settings, "salesforce_login_url", "")  # settings objects of older callers lack it
        salesforce = SalesforceSink.from_settings(redis_client, settings) if on else None
        return cls(redis_client, webhook_url=settings.webhook_url, webhook_secret=settings.webhook_secret,
                   webhook_timeout=settings.webhook_timeout, callback=settings.callback or None,
                   callback_timeout=getattr(settings, "callback_timeout", DEFAULT_CALLBACK_TIMEOUT),
                   salesforce=salesforce)

    def __repr__(self) -> str:  # never show the secret
        return f"Notifier(webhook_url={_public_url(self.webhook_url)!r}, channels={self.channels})"

    # -- the channels --------------------------------------------------------------------
    def _safe(self, exc: BaseException) -> str:
        """An error description with no secret and nothing of the webhook URL's path, query or
        password in it, in whatever encoding the error names them."""
        return self._redact(f"{type(exc).__name__}: {exc}")[:500]

    def _headers(self, transition_id: str, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        return {
            "Content-Type": "application/json",
            "User-Agent": "exchange-listener",
            WEBHOOK_ID_HEADER: transition_id,
            WEBHOOK_TIMESTAMP_HEADER: timestamp,
            WEBHOOK_SIGNATURE_HEADER: standard_signature(self._key, transition_id, timestamp, body),
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
            DELIVERY_HEADER: transition_id,
            "Idempotency-Key": transition_id,
        }

    def _post(self, transition: Transition, timeout: float) -> None:
        """One POST; ReceiverDown if the endpoint is unavailable, RuntimeError if it refused this one."""
        body = transition.webhook_body()
        with self._lock:
            session = self._sessions.pop() if self._sessions else requests.Session()
        try:
            response = session.post(self.webhook_url, data=body, headers=self._headers(transition.id, body),
                                    timeout=timeout, allow_redirects=False)
            response.close()
        except requests.Timeout as exc:
            if timeout < self.webhook_timeout:  # cut short by the drain's budget, not the receiver's fault
                raise _Skip("out of time") from None
            raise ReceiverDown(self._safe(exc)) from None
        except requests.ConnectionError as exc:
            raise ReceiverDown(self._safe(exc)) from None
        finally:
            with self._lock:
                self._sessions.append(session)
        code = response.status_code
        if not 200 <= code < 300:
            error = f"webhook answered HTTP {code}"
            raise ReceiverDown(error) if code >= 500 or code in (408, 429) else RuntimeError(error)

    def _call(self, transition: Transition, wait: float) -> None:
        """Call the callable in a thread of its own, for at most ``callback_timeout`` seconds.

        A call that has not returned by then raises CallbackTimeout and its thread is abandoned
        (it runs on; Python cannot stop it). Calls take turns (waiting at most ``wait`` seconds
        for another drain's call), and none starts while the previous call has not returned:
        _Skip, the channel is busy for the rest of this drain.
        """
        if not self._call_lock.acquire(timeout=max(0.0, wait)):  # RQ's job timeout interrupts this wait
            raise _Skip("another drain's callable call is running", self.backoff_base, channel_busy=True)
        try:
            if self._last_call_done is not None and not self._last_call_done.is_set():
                raise _Skip("an abandoned callable call is still running", self.backoff_base, channel_busy=True)
            outcome: dict[str, BaseException] = {}
            # our own "returned" event, not Thread.is_alive(): on Python 3.11 a join cut short by
            # a signal handler's exception (RQ's job timeout) marks the running thread stopped.
            # Recorded before the call starts, so however the wait below ends the next call sees it.
            self._last_call_done = done = threading.Event()
            began = threading.Event()

            def run() -> None:
                began.set()
                try:
                    # set: without a callable there is no "callback" channel to call
                    cast(Callable[[dict[str, Any]], Any], self.callback)(transition.to_fields())
                except BaseException as exc:  # noqa: BLE001 - handed to the drain, which decides
                    outcome["error"] = exc
                finally:
                    done.set()

            try:
                threading.Thread(target=run, name="notify-callback", daemon=True).start()
            except BaseException:
                if not began.wait(2.0):  # RQ's timeout came before the thread existed: no call runs
                    done.set()
                raise
            if not done.wait(self.callback_timeout):  # RQ's job timeout interrupts this wait in the main thread
                raise CallbackTimeout(f"callback did not return within {self.callback_timeout:g}s "
                                      "(its thread is abandoned)")
        finally:
            self._call_lock.release()
        if "error" in outcome:
            raise outcome["error"]

    def _log_to_salesforce(self, transition: Transition, deadline: float) -> None:
        """One transition to Salesforce by ``deadline`` (monotonic). Salesforce down: _Skip with the
        channel's back-off, no attempt spent; out of time: _Skip, due again at once; refused
        (``Refused``): raised, an attempt spent."""
        sink = cast(SalesforceSink, self.salesforce)  # set: there is no "salesforce" channel without it
        try:
            sink.deliver(transition, deadline=deadline)
        except SalesforceDown as exc:
            if exc.out_of_time:  # the drain's budget ran out, not Salesforce's fault
                raise _Skip("out of time") from None
            with self._lock:
                self._salesforce_down += 1
                streak = self._salesforce_down
            raise _Skip(str(exc), self._salesforce_backoff(exc, streak), channel_busy=True) from None
        with self._lock:
            self._salesforce_down = 0

    def _salesforce_backoff(self, exc: SalesforceDown, streak: int) -> float:
        """Seconds until entries handed back because Salesforce is down are due again."""
        if exc.retry_after is not None:
            wait = min(exc.retry_after, SALESFORCE_RETRY_AFTER_MAX)
        else:
            wait = backoff_delay(streak - 1, self.backoff_base, SALESFORCE_BACKOFF_MAX, jitter=None)
        return max(wait, SALESFORCE_LIMIT_BACKOFF if exc.limit else 0.0)

    # -- one drain -----------------------------------------------------------------------
    def _find_predecessors(self, entries: list[_Entry]) -> None:
        """Fill in each entry's previous transition (from its enrollment's history) and, when that
        one is not in this batch, the channels it still lacks."""
        later = [e for e in entries if e.version > 1]
        pipe = self.redis.pipeline(transaction=False)
        for entry in later:
            pipe.lindex(keys.enrollment_history(entry.enrollment_id), entry.version - 2)
        for entry, raw in zip(later, pipe.execute()):
            previous = Transition.from_json(raw) if raw else None
            if not previous or previous.version != entry.version - 1:  # history not aligned: search it
                history = self.redis.lrange(keys.enrollment_history(entry.enrollment_id), 0, -1)
                found = [h for h in map(Transition.from_json, history) if h.version == entry.version - 1]
                previous = found[-1] if found else None
            entry.pred = previous.id if previous else None
        in_batch = {e.tid for e in entries}
        outside = [(e, e.pred) for e in later if e.pred and e.pred not in in_batch]
        pipe = self.redis.pipeline(transaction=False)
        for _, pred in outside:
            pipe.zscore(OUTBOX_KEY, pred)
            pipe.hgetall(state_key(pred))
        fetched = pipe.execute()
        for index, (entry, _) in enumerate(outside):
            if fetched[2 * index] is not None:
                done = {k.decode() for k, v in fetched[2 * index + 1].items() if v == b"1"}
                entry.pred_pending = {c for c in self.channels if f"done:{c}" not in done}

    def _mark_done(self, entry: _Entry, channel: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(state_key(entry.tid), f"done:{channel}", 1)
        pipe.expire(state_key(entry.tid), STATE_TTL)
        pipe.hget(state_key(entry.tid), "waiter")
        waiter = pipe.execute()[-1]
        entry.done.add(channel)
        if waiter:
            self._wake_waiter(waiter.decode(), entry.tid)

    def _wake_waiter(self, waiter: str, predecessor: str) -> None:
        _WAKE(self.redis, outbox=OUTBOX_KEY, waiter_state=state_key(waiter), waiter_id=waiter,
              predecessor_id=predecessor, now_ms=int(time.time() * 1000))

    def _run_channel(self, channel: str, entries: list[_Entry], by_id: dict[str, _Entry],
                     hand_back_at: float, abort: threading.Event) -> None:
        """Deliver ``entries`` on one channel, in order; record per entry what happened."""
        down, down_delay, down_note = False, self.backoff_base, ""
        budget = {"webhook": self.webhook_timeout, "callback": self.callback_timeout}.get(channel, self.salesforce_budget)
        deadline = None  # the channel's time budget starts with its first delivery
        longest = 0.0  # the slowest delivery so far: none is started that would likely be cut short
        for entry in entries:
            if channel in entry.done:
                continue
            previous = by_id.get(entry.pred) if entry.pred else None
            if (channel not in previous.done) if previous else (channel in entry.pred_pending):
                entry.held.add(channel)
                continue
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + budget
            if down:
                entry.skipped[channel] = down_delay
                if down_note:
                    entry.notes[channel] = down_note
                continue
            if abort.is_set() or now + max(longest, 0.05) >= min(deadline, hand_back_at):
                entry.skipped[channel] = 0.0
                continue
            try:
                if channel == "webhook":
                    self._post(entry.transition, timeout=min(self.webhook_timeout, deadline - now))
                elif channel == "salesforce":
                    self._log_to_salesforce(entry.transition, deadline=min(deadline, hand_back_at))
                else:
                    self._call(entry.transition, wait=min(deadline, hand_back_at) - now)
                longest = max(longest, time.monotonic() - now)
            except BaseTimeoutException:
                raise
            except _Skip as skip:
                entry.skipped[channel] = skip.delay
                if skip.channel_busy:  # the rest wait too; said once per drain
                    down, down_delay = True, skip.delay
                    if channel == "salesforce":
                        down_note = entry.notes[channel] = f"salesforce unavailable, not counted as an attempt: {skip}"
                        logs.get_logger(component="notify").warning(
                            "salesforce unavailable, handed back without spending an attempt", reason=str(skip),
                            transition_id=entry.tid, retry_in_seconds=round(skip.delay, 1))
                    else:
                        logs.get_logger(component="notify").info("callback not called, handed back", reason=str(skip),
                                                                 transition_id=entry.tid, retry_in_seconds=skip.delay)
                continue
            except Exception as exc:  # noqa: BLE001 - any failure is retried, never fatal
                entry.errors[channel] = exc.args[0] if isinstance(exc, ReceiverDown) and exc.args else self._safe(exc)
                down = isinstance(exc, ReceiverDown)
                continue
            self._mark_done(entry, channel)

    def _run_channels(self, entries: list[_Entry], hand_back_at: float) -> None:
        """Each channel in a thread of its own (one stuck receiver delays no other), or inline if
        there is only one. RQ's job timeout interrupts the wait; the threads then stop early."""
        by_id = {e.tid: e for e in entries}
        abort = threading.Event()
        if len(self.channels) == 1:
            self._run_channel(self.channels[0], entries, by_id, hand_back_at, abort)
            return
        crashed: list[BaseException] = []

        def run(channel: str) -> None:
            try:
                self._run_channel(channel, entries, by_id, hand_back_at, abort)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the draining thread below
                crashed.append(exc)

        threads = [threading.Thread(target=run, args=(c,), name=f"notify-{c}", daemon=True) for c in self.channels]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            abort.set()
        if crashed:
            raise crashed[0]

    def _settle(self, entry: _Entry, result: DrainResult) -> None:
        """Remove a delivered entry; reschedule a failed one with backoff (or give up on it), park a
        held one behind its predecessor, and hand back one that was not tried."""
        tid, transition = entry.tid, entry.transition
        bound = logs.get_logger(component="notify", transition_id=tid, enrollment_id=transition.enrollment_id,
                                mailbox=transition.mailbox)
        now = time.time()
        if all(c in entry.done for c in self.channels):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hget(state_key(tid), "waiter")
            pipe.zrem(OUTBOX_KEY, tid)
            pipe.delete(state_key(tid))
            pipe.hincrby(STATS_KEY, "delivered", 1)
            waiter = pipe.execute()[0]
            if waiter:
                self._wake_waiter(waiter.decode(), tid)
            result.delivered += 1
            if self.channels:
                bound.info("transition delivered", status=transition.status, channels=self.channels)
            return
        if entry.errors:
            self._settle_failure(entry, "; ".join(f"{c}: {e}" for c, e in entry.errors.items()), bound, result)
            return
        due = now + min(entry.skipped.values()) if entry.skipped else now
        if entry.held and entry.pred:
            parked = _PARK(self.redis, outbox=OUTBOX_KEY, state=state_key(tid), predecessor_state=state_key(entry.pred),
                           transition_id=tid, predecessor_id=entry.pred, due_ms=int(due * 1000),
                           latest_ms=int(due * 1000) if entry.skipped else _NEVER_MS, ttl=STATE_TTL,
                           channels=sorted(entry.held))
            result.held += 1 if parked else 0
            result.retrying += 0 if parked else 1
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(OUTBOX_KEY, {tid: int(due * 1000)})
        if entry.notes:  # why it waits, for pending(); attempts untouched
            pipe.hset(state_key(tid), "last_error", "; ".join(entry.notes.values())[:500])
            pipe.expire(state_key(tid), STATE_TTL)
        pipe.execute()
        result.retrying += 1
        result.more = result.more or any(delay == 0 for delay in entry.skipped.values())

    def _settle_failure(self, entry: _Entry, error: str, bound: FilteringBoundLogger, result: DrainResult) -> None:
        tid = entry.tid
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(state_key(tid), "attempts", 1)
        pipe.expire(state_key(tid), STATE_TTL)
        attempts, _ = pipe.execute()
        self.redis.hincrby(STATS_KEY, "attempts_failed", 1)
        if attempts >= self.max_attempts:
            record = {"id": tid, "transition": entry.transition.to_fields(), "attempts": attempts, "last_error": error,
                      "failed_at": iso_now()}
            pipe = self.redis.pipeline(transaction=True)
            pipe.hget(state_key(tid), "waiter")
            pipe.hset(FAILED_KEY, tid, json.dumps(record))
            pipe.zrem(OUTBOX_KEY, tid)
            pipe.hincrby(STATS_KEY, "gave_up", 1)
            waiter = pipe.execute()[0]
            if waiter:  # the later transitions of this enrollment go on without it
                self._wake_waiter(waiter.decode(), tid)
            result.failed += 1
            bound.error("transition notification failed, giving up", attempts=attempts, error=error)
            return
        delay = backoff_delay(attempts - 1, self.backoff_base, self.backoff_max, jitter=None)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(state_key(tid), mapping={"last_error": error, "last_attempt_at": iso_now()})
        pipe.hdel(state_key(tid), "behind", "parked_at")
        pipe.zadd(OUTBOX_KEY, {tid: int((time.time() + delay) * 1000)})
        pipe.execute()
        result.retrying += 1
        bound.warning("transition notification failed, will retry", attempts=attempts,
                      retry_in_seconds=round(delay, 1), error=error)

    def drain(self, limit: int = 100) -> DrainResult:
        """Deliver every due transition (up to ``limit``); never sleeps, failures are rescheduled.

        Waits for the webhook at most ``webhook_timeout`` and for the callable at most about two
        ``callback_timeout`` (the channels run side by side)."""
        result = DrainResult()
        now_ms = int(time.time() * 1000)
        ids = [i.decode() for i in _CLAIM(self.redis, outbox=OUTBOX_KEY, now_ms=now_ms, lease_ms=self.lease_ms,
                                          limit=limit)]
        if not ids:
            return result
        result.more = len(ids) >= limit
        # hand the rest back before our lease on them runs out, so no other drainer delivers
        # them while we still might
        hand_back_at = time.monotonic() + self.lease_ms / 2000
        pipe = self.redis.pipeline(transaction=False)
        for tid in ids:
            pipe.get(keys.transition(tid))
            pipe.hgetall(state_key(tid))
        fetched = pipe.execute()
        entries = []
        for index, tid in enumerate(ids):
            raw = fetched[2 * index]
            if raw is None:  # expired with the retention: nothing left to tell
                self.redis.zrem(OUTBOX_KEY, tid)
                continue
            state = {k.decode(): v.decode() for k, v in fetched[2 * index + 1].items()}
            entry = _Entry(tid, Transition.from_json(raw), state)
            entry.done = {c for c in self.channels if state.get(f"done:{c}")}
            entries.append(entry)
        entries = _in_version_order(entries)
        if self.channels:
            self._find_predecessors(entries)
            self._run_channels(entries, hand_back_at)
        for entry in entries:  # in version order: a predecessor is settled before its successor parks
            self._settle(entry, result)
        return result

    def start_timer(self, interval: float = 5.0) -> Timer:
        timer = Timer(self, interval)
        timer.start()
        return timer

    # -- visibility ----------------------------------------------------------------------
    def pending(self) -> list[dict]:
        # withscores: (member, score) pairs (redis-py's type covers every form of ZRANGE's reply)
        entries = [(redis_conn.text(tid), score) for tid, score in
                   cast(list[tuple[bytes | str, float]], self.redis.zrange(OUTBOX_KEY, 0, -1, withscores=True))]
        pipe = self.redis.pipeline(transaction=False)
        for tid, _ in entries:
            pipe.get(keys.transition(tid))
            pipe.hgetall(state_key(tid))
        fetched = pipe.execute()
        out = []
        for index, (tid, score) in enumerate(entries):
            raw = fetched[2 * index]
            transition = Transition.from_json(raw) if raw else None  # None: expired with the retention
            state = {k.decode(): v.decode() for k, v in fetched[2 * index + 1].items()}
            out.append({"id": tid, "enrollment_id": transition.enrollment_id if transition else None,
                        "status": transition.status if transition else None, "attempts": int(state.get("attempts", 0)),
                        "next_attempt_at": iso_from_ms(score), "last_error": state.get("last_error"),
                        "held_behind": state.get("behind")})
        return out

    def failed(self) -> list[dict]:
        return [json.loads(v) for v in self.redis.hvals(FAILED_KEY)]

    def retry_failed(self, ids: list[str] | None = None) -> int:
        """Put failed transitions back in the outbox with a fresh attempt count.

        Each enrollment's ids go back in one step, in version order, so a drain running meanwhile
        never finds a later version back without the earlier one (which then holds it)."""
        ids = list(dict.fromkeys(ids if ids is not None else [redis_conn.text(k) for k in self.redis.hkeys(FAILED_KEY)]))
        by_enrollment: dict[str, list[tuple[int, str]]] = {}
        for tid, raw in zip(ids, self.redis.hmget(FAILED_KEY, ids) if ids else []):
            if raw is None:
                continue  # not failed (pending, delivered, unknown): stays where it is
            transition = json.loads(raw).get("transition") or {}
            by_enrollment.setdefault(str(transition.get("enrollment_id") or tid), []).append(
                (int(transition.get("version") or 0), tid))
        now_ms, requeued = int(time.time() * 1000), 0
        for group in by_enrollment.values():
            ordered = [tid for _, tid in sorted(group)]
            requeued += _REQUEUE(self.redis, failed=FAILED_KEY, outbox=OUTBOX_KEY, states=[state_key(t) for t in ordered],
                                 now_ms=now_ms, ids=ordered)
        return requeued

    def stats(self) -> dict:
        return {redis_conn.text(k): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}


def iso_now() -> str:
    return iso_from_ms(time.time() * 1000)


def iso_from_ms(ms: float) -> str:
    return iso(dt.datetime.fromtimestamp(ms / 1000, dt.UTC))


def _public_url(url: str) -> str:
    """Scheme and host of ``url`` only: the path and query often carry a token."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}/***"


def _any_encoding(text: str) -> str:
    """A regex for ``text`` with any of its characters written as itself or percent-encoded
    (either case; a space also as ``+``): errors name a URL as sent (requests encodes spaces,
    ``|``, non-ASCII) or as given, or partly decoded."""
    alternatives = []
    for char in text:
        forms = [re.escape(char), "".join(f"%{byte:02x}" for byte in char.encode())]
        forms += [r"\+"] if char == " " else []
        alternatives.append("(?:" + "|".join(forms) + ")")
    return "".join(alternatives)


def _url_redactor(url: str, secret: str) -> Callable[[str], str]:
    """A function that removes from a text the webhook URL (-> scheme://host/***), its path,
    query, each path segment, query value and password (-> ***), in any encoding, and the
    secret. A piece is matched only as a whole word, so a short segment ("el") leaves other
    words alone; the whole path and query are matched anyway."""
    pieces: list[str] = []
    if url:
        parts = urlsplit(url)
        path_query = parts.path + (f"?{parts.query}" if parts.query else "")
        pieces += [path_query, parts.path if len(parts.path) > 1 else "", parts.query, parts.password or ""]
        pieces += parts.path.split("/") + [p for pair in parts.query.split("&") for p in (pair, pair.partition("=")[2])]
    pieces = sorted({unquote(p) for p in pieces if p} - {""}, key=len, reverse=True)
    word = re.compile(r"[\w.~-]")

    def bounded(piece: str) -> str:
        before = r"(?<![\w.~%-])" if word.match(piece[0]) else ""
        after = r"(?![\w.~-])" if word.match(piece[-1]) else ""
        return before + _any_encoding(piece) + after

    whole = re.compile(_any_encoding(unquote(url)), re.IGNORECASE) if url else None
    parts_re = re.compile("|".join(map(bounded, pieces)), re.IGNORECASE) if pieces else None

    def redact(text: str) -> str:
        if whole:
            text = whole.sub(_public_url(url), text)
        if parts_re:
            text = parts_re.sub("***", text)
        return text.replace(secret, "***") if secret else text

    return redact
