"""Webhook delivery as Graph's change-notification service does it.

One queue per receiving URL; whatever is queued when a POST goes out travels in it (several
subscriptions' notifications in one ``{"value": [...]}``), one POST in flight per URL. A receiver
must answer 2xx within ``notification_timeout``; a failure or a slower answer is retried with a
doubling back-off until ``retry_window`` has passed since the first attempt, then dropped (and a
``missed`` lifecycle notification goes to the subscriptions that lost something). Answers slower
than ``slow_threshold`` count as slow; per URL, over tumbling windows of ``slow_window`` seconds
with at least ``slow_min_count`` notifications, 10% slow delays everything for that URL by
``slow_delay`` and 15% drops it, as the webhooks throttling section of the docs describes.
Lifecycle notifications use their own queue per URL and are not subject to the change faults.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from emulators.graph.errors import GraphError
from exchange_listener.core import logs

MAX_PER_POST = 100
VALIDATION_FAILED = ("Subscription validation request failed. Notification endpoint must respond with 200 OK to "
                     "validation request.")
VALIDATION_MISMATCH = "Subscription validation request failed. Response must exactly match validationToken query parameter."
VALIDATION_TIMEOUT = "Subscription validation request timed out."


@dataclasses.dataclass
class Timing:
    notification_timeout: float = 3.0
    slow_threshold: float = 2.9
    retry_base: float = 1.0
    retry_cap: float = 600.0
    retry_window: float = 4 * 3600.0
    slow_window: float = 600.0
    slow_min_count: int = 100
    slow_delay: float = 600.0
    validation_timeout: float = 10.0


@dataclasses.dataclass
class Pending:
    payload: dict[str, Any]
    subscription_id: str
    not_before: float
    first_attempt: float = 0.0
    duplicate: bool = False  # send once more after it is delivered (the duplicate fault)


@dataclasses.dataclass
class Endpoint:
    """The slow-response bookkeeping of one notification URL."""

    window_start: float = 0.0
    total: int = 0
    slow: int = 0

    def record(self, now: float, window: float, count: int, slow: bool) -> None:
        if now - self.window_start >= window:
            self.window_start, self.total, self.slow = now, 0, 0
        self.total += count
        self.slow += count if slow else 0

    def state(self, now: float, window: float, min_count: int) -> str:
        if now - self.window_start >= window or self.total < min_count:
            return "normal"
        share = self.slow / self.total
        return "drop" if share >= 0.15 else "delay" if share >= 0.10 else "normal"


class Queue:
    def __init__(self):
        self.items: list[Pending] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None


class Notifier:
    def __init__(self, timing: Timing):
        self.timing = timing
        self.log = logs.get_logger(component="graph-emulator")
        self.session: aiohttp.ClientSession | None = None
        self.queues: dict[tuple[str, str], Queue] = {}  # (kind, url) -> queue; kind "change" | "lifecycle"
        self.endpoints: dict[str, Endpoint] = {}
        self.tasks: set[asyncio.Task] = set()
        self.on_missed: Callable[[str], None] | None = None  # a lifecycle "missed" for this subscription
        self.is_live: Callable[[str], bool] = lambda subscription_id: True  # deleted ones get nothing more
        self.counts: Counter[str] = Counter()
        self.lifecycle_counts: Counter[str] = Counter()
        # faults
        self.drop = 0
        self.duplicate = 0
        self.delay_seconds = 0.0
        self.delay_count: int | None = 0  # None: every notification until cleared

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False, limit=0))

    async def stop(self) -> None:
        self.clear()
        if self.session is not None:
            await self.session.close()

    def clear(self) -> int:
        """Forget every queued and retrying notification; returns how many were pending."""
        pending = sum(len(q.items) for q in self.queues.values())
        for queue in self.queues.values():
            if queue.task is not None:
                queue.task.cancel()
        for task in self.tasks:
            task.cancel()
        self.queues.clear()
        self.tasks.clear()
        return pending

    def reset(self) -> None:
        self.clear()
        self.endpoints.clear()
        self.counts.clear()
        self.lifecycle_counts.clear()
        self.drop = self.duplicate = 0
        self.delay_seconds, self.delay_count = 0.0, 0

    # -- validation ------------------------------------------------------------------------
    async def validate(self, url: str) -> None:
        """Graph's handshake: POST ``url?validationToken=...``; 200 with the token as body, in time."""
        assert self.session is not None
        token = f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        target = f"{url}{'&' if '?' in url else '?'}validationToken={quote(token, safe='')}"
        self.counts["validations"] += 1
        try:
            async with self.session.post(target, data=b"", headers={"Content-Type": "text/plain; charset=utf-8"},
                                         timeout=aiohttp.ClientTimeout(total=self.timing.validation_timeout)) as resp:
                text = await resp.text(errors="replace")
                status = resp.status
        except TimeoutError:
            self.counts["validations_failed"] += 1
            raise GraphError(400, "InvalidRequest", VALIDATION_TIMEOUT) from None
        except (aiohttp.ClientError, OSError, ValueError):
            self.counts["validations_failed"] += 1
            raise GraphError(400, "ValidationError", VALIDATION_FAILED) from None
        if status != 200:
            self.counts["validations_failed"] += 1
            raise GraphError(400, "ValidationError", VALIDATION_FAILED)
        if text != token:
            self.counts["validations_failed"] += 1
            raise GraphError(400, "ValidationError", VALIDATION_MISMATCH)

    # -- change notifications --------------------------------------------------------------
    def notify(self, url: str, subscription_id: str, payload: dict[str, Any]) -> None:
        """Queue one change notification (faults and the endpoint's throttling state apply)."""
        now = time.monotonic()
        self.counts["notifications"] += 1
        if self.drop > 0:
            self.drop -= 1
            self.counts["dropped"] += 1
            self.counts["dropped_fault"] += 1
            self._missed(subscription_id)
            return
        pending = Pending(payload, subscription_id, now)
        if self.duplicate > 0:
            self.duplicate -= 1
            pending.duplicate = True
        if self.delay_seconds > 0 and (self.delay_count is None or self.delay_count > 0):
            if self.delay_count is not None:
                self.delay_count -= 1
            pending.not_before += self.delay_seconds
            self.counts["delayed"] += 1
        state = self._endpoint(url).state(now, self.timing.slow_window, self.timing.slow_min_count)
        if state == "drop":
            self.counts["dropped"] += 1
            self.counts["dropped_slow"] += 1
            self._missed(subscription_id)
            return
        if state == "delay":
            pending.not_before += self.timing.slow_delay
            self.counts["delayed_slow"] += 1
        self._enqueue("change", url, [pending])

    def lifecycle(self, url: str, subscription_id: str, payload: dict[str, Any]) -> None:
        queue = self.queues.get(("lifecycle", url))
        if queue is not None and any(p.subscription_id == subscription_id
                                     and p.payload["lifecycleEvent"] == payload["lifecycleEvent"] for p in queue.items):
            return  # one pending event of a kind per subscription is enough
        self._enqueue("lifecycle", url, [Pending(payload, subscription_id, time.monotonic())])

    def _missed(self, subscription_id: str) -> None:
        if self.on_missed is not None:
            self.on_missed(subscription_id)

    def _endpoint(self, url: str) -> Endpoint:
        return self.endpoints.setdefault(url, Endpoint(window_start=time.monotonic()))

    def _enqueue(self, kind: str, url: str, items: list[Pending]) -> None:
        queue = self.queues.get((kind, url))
        if queue is None:
            queue = self.queues[(kind, url)] = Queue()
            queue.task = asyncio.get_running_loop().create_task(self._worker(kind, url, queue))
        queue.items.extend(items)
        queue.wake.set()

    async def _worker(self, kind: str, url: str, queue: Queue) -> None:
        while True:
            now = time.monotonic()
            ready: list[Pending] = []
            waiting: list[Pending] = []
            for item in queue.items:
                (ready if item.not_before <= now and len(ready) < MAX_PER_POST else waiting).append(item)
            if not ready:
                queue.wake.clear()
                waits = [p.not_before - now for p in queue.items]
                try:
                    await asyncio.wait_for(queue.wake.wait(), timeout=min(waits) if waits else None)
                except TimeoutError:
                    pass
                continue
            queue.items = waiting
            for item in ready:
                item.first_attempt = item.first_attempt or now
            ready = [p for p in ready if kind == "lifecycle" or self.is_live(p.subscription_id)]
            if ready:
                await self._post(kind, url, ready, attempt=1)

    async def _post(self, kind: str, url: str, batch: list[Pending], attempt: int) -> None:
        assert self.session is not None
        started = time.monotonic()
        ok = False
        try:
            async with self.session.post(url, json={"value": [p.payload for p in batch]},
                                         timeout=aiohttp.ClientTimeout(total=self.timing.notification_timeout)) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                status: Any = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            status = type(exc).__name__
        elapsed = time.monotonic() - started
        self.counts["posts" if kind == "change" else "lifecycle_posts"] += 1
        if kind == "change":
            slow = elapsed > self.timing.slow_threshold
            self.counts["slow_responses"] += len(batch) if slow else 0
            self._endpoint(url).record(time.monotonic(), self.timing.slow_window, len(batch), slow)
        if ok:
            if kind == "change":
                self.counts["sent"] += len(batch)
                again = [dataclasses.replace(p, duplicate=False, first_attempt=0.0, not_before=time.monotonic())
                         for p in batch if p.duplicate]
                if again:
                    self.counts["duplicated"] += len(again)
                    self._enqueue(kind, url, again)
            else:
                self.lifecycle_counts.update(p.payload["lifecycleEvent"] for p in batch)
            return
        self.counts["failed_attempts" if kind == "change" else "lifecycle_failed_attempts"] += 1
        self.log.info("notification POST failed", url=url, kind=kind, status=status, attempt=attempt,
                      elapsed=round(elapsed, 3), items=len(batch))
        task = asyncio.get_running_loop().create_task(self._retry(kind, url, batch, attempt + 1))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _retry(self, kind: str, url: str, batch: list[Pending], attempt: int) -> None:
        delay = min(self.timing.retry_base * 2 ** (attempt - 2), self.timing.retry_cap)
        if kind == "change" and self._endpoint(url).state(time.monotonic(), self.timing.slow_window,
                                                          self.timing.slow_min_count) != "normal":
            delay = max(delay, self.timing.slow_delay)
        if time.monotonic() + delay - min(p.first_attempt for p in batch) > self.timing.retry_window:
            if kind == "change":
                self.counts["dropped"] += len(batch)
                self.counts["dropped_expired"] += len(batch)
                for subscription_id in {p.subscription_id for p in batch}:
                    self._missed(subscription_id)
            else:
                self.counts["lifecycle_dropped"] += len(batch)
            return
        await asyncio.sleep(delay)
        batch = [p for p in batch if kind == "lifecycle" or self.is_live(p.subscription_id)]
        if not batch:
            return
        self.counts["retried" if kind == "change" else "lifecycle_retried"] += len(batch)
        await self._post(kind, url, batch, attempt)

    def stats(self) -> dict[str, Any]:
        counts = dict(self.counts)
        return {**{k: counts.get(k, 0) for k in (
            "notifications", "sent", "posts", "retried", "failed_attempts", "dropped", "dropped_fault",
            "dropped_slow", "dropped_expired", "dropped_restart", "delayed", "delayed_slow", "duplicated",
            "slow_responses", "held", "validations", "validations_failed", "lifecycle_posts",
            "lifecycle_failed_attempts", "lifecycle_retried", "lifecycle_dropped")},
            "pending": sum(len(q.items) for (kind, _), q in self.queues.items() if kind == "change"),
            "retrying": len(self.tasks),
            "lifecycle": dict(self.lifecycle_counts),
            "endpoints": {url: {"total": e.total, "slow": e.slow,
                                "state": e.state(time.monotonic(), self.timing.slow_window,
                                                 self.timing.slow_min_count)}
                          for url, e in self.endpoints.items()}}
