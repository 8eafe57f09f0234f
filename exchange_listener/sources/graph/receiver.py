"""The HTTP endpoint Microsoft Graph POSTs change and lifecycle notifications to.

It runs inside each Graph listener (an aiohttp server on ``notification_listen``, behind a
reverse proxy that owns the public HTTPS ``notification_url``). Graph gives a receiver 3 s; a
slow or failing receiver is retried for hours, and a receiver slow too often gets every
notification delayed, then dropped. So the answer is: persist, then 202 —

- a **change notification** (``POST <path>``) becomes one queued job per message, the same job a
  delta catch-up makes for it (the worker fetches it by its immutable id); the listener is told
  of the activity, so the mailbox is checkpointed by delta later;
- a **lifecycle notification** (``POST <path>/lifecycle``: ``missed``, ``subscriptionRemoved``,
  ``reauthorizationRequired``) is appended to ``el:graph:lifecycle``, which the listener holding
  that mailbox reads (it may be another process behind the same proxy);
- each item's ``clientState`` must be the one made for its subscription (its SHA-256 is in
  ``el:graph:subscriptions``); an item that is not ours is dropped and counted, never queued;
- when Redis cannot take it within ``PERSIST_BUDGET`` seconds, the answer is 503 and Graph
  retries: nothing is acknowledged that was not stored;
- ``?validationToken=`` (the handshake when a subscription is created) is answered with the
  token as text/plain, at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import redis
from aiohttp import web

from exchange_listener.core import keys, logs, metrics
from exchange_listener.sources.base import NewMail
from exchange_listener.sources.graph.subscriptions import SubscriptionStore, state_hash

PERSIST_BUDGET = 2.0  # seconds to store a POST's items; Graph allows 3 before it counts the answer slow
LIFECYCLE_MAXLEN = 10_000
LOOKUP_TTL = 60.0  # seconds a subscription looked up in Redis is trusted from memory
MAX_BODY = 4 * 1024 * 1024
EVENTS = ("missed", "subscriptionRemoved", "reauthorizationRequired")


class Receiver:
    """The notification endpoint, served on its own thread and event loop."""

    def __init__(self, listen: str, notification_url: str, conn: redis.Redis,
                 enqueue: Callable[[Sequence[NewMail]], None], on_activity: Callable[[str], None]):
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.path = urllib.parse.urlsplit(notification_url).path.rstrip("/") or ""
        self.conn = conn
        self.store = SubscriptionStore(conn)
        self.enqueue = enqueue
        self.on_activity = on_activity
        self.log = logs.get_logger(component="receiver")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="receiver")
        self._known: dict[str, tuple[float, tuple[str, str] | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.last_notification_at: float | None = None
        self.received = 0

    # -- lifecycle of the server -------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        threading.Thread(target=self._serve, name="graph-receiver", daemon=True).start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the Graph notification receiver did not start on {self.host}:{self.port}")
        if self._error is not None:
            raise RuntimeError(f"the Graph notification receiver cannot listen on {self.host}:{self.port}: "
                               f"{self._error}") from self._error

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(self.path or "/", self._notifications)
        app.router.add_post(self.path + "/lifecycle", self._lifecycle)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, self.host, self.port).start())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()

    def stop(self, timeout: float = 2.0) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None or not loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout)
        except Exception as exc:  # noqa: BLE001 - stopping anyway
            self.log.warning("receiver did not stop cleanly", error=str(exc))
        loop.call_soon_threadsafe(loop.stop)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- handlers ------------------------------------------------------------------------------
    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @staticmethod
    def _validation(request: web.Request) -> web.Response | None:
        token = request.query.get("validationToken")
        if token is None:
            return None
        return web.Response(text=token, content_type="text/plain")  # the query is URL-decoded already

    async def _items(self, request: web.Request) -> list[dict[str, Any]] | web.Response:
        try:
            body = await request.json(loads=json.loads)
            items = body["value"]
            if not isinstance(items, list):
                raise TypeError("value is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            metrics.GRAPH_NOTIFICATIONS.labels("malformed").inc()
            return web.json_response({"error": f"not a Graph notification: {exc}"}, status=400)
        return [i for i in items if isinstance(i, dict)]

    async def _persist(self, work: Callable[[], None]) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._pool, work), PERSIST_BUDGET)
            return True
        except TimeoutError:
            self.log.warning("could not store notifications within Graph's deadline; answering 503 so Graph retries")
        except (redis.exceptions.RedisError, OSError) as exc:
            self.log.warning("could not store notifications (Redis); answering 503 so Graph retries", error=str(exc))
        return False

    def _ours(self, item: dict[str, Any], now: float) -> str | None:
        """The mailbox of ``item``'s subscription when its clientState is the one we made, else None."""
        sub_id = item.get("subscriptionId")
        if not isinstance(sub_id, str):
            return None
        cached = self._known.get(sub_id)
        if cached is None or cached[0] < now:
            found = self.store.lookup(sub_id)
            if len(self._known) > 100_000:
                self._known.clear()
            self._known[sub_id] = (now + LOOKUP_TTL, found)
        else:
            found = cached[1]
        state = item.get("clientState")
        if found is None or not isinstance(state, str) or not hmac.compare_digest(state_hash(state), found[1]):
            return None
        return found[0]

    async def _notifications(self, request: web.Request) -> web.Response:
        answer = self._validation(request)
        if answer is not None:
            return answer
        items = await self._items(request)
        if isinstance(items, web.Response):
            return items
        now = time.time()
        mails: list[NewMail] = []
        rejected = 0

        def store() -> None:
            nonlocal rejected
            for item in items:
                mailbox = self._ours(item, now)
                data = item.get("resourceData")
                item_id = data.get("id") if isinstance(data, dict) else None
                if mailbox is None or not isinstance(item_id, str) or not item_id:
                    rejected += 1
                    continue
                mails.append(NewMail(mailbox=mailbox, item_id=item_id, seen_at=now, via="notification"))
            for mail in mails:  # one job per message: the job id a catch-up's single mail gets too
                self.enqueue([mail])

        if not await self._persist(store):
            return web.Response(status=503, headers={"Retry-After": "5"})
        if rejected:
            metrics.GRAPH_NOTIFICATIONS.labels("rejected").inc(rejected)
            self.log.warning("dropped notifications that are not ours (unknown subscription or wrong clientState)",
                             count=rejected)
        metrics.GRAPH_NOTIFICATIONS.labels("queued").inc(len(mails))
        self.received += len(mails)
        if mails:
            self.last_notification_at = now
        for mailbox in {m.mailbox for m in mails}:
            self.on_activity(mailbox)
        return web.Response(status=202)

    async def _lifecycle(self, request: web.Request) -> web.Response:
        answer = self._validation(request)
        if answer is not None:
            return answer
        items = await self._items(request)
        if isinstance(items, web.Response):
            return items
        now = time.time()
        events: list[tuple[str, str, str]] = []

        def store() -> None:
            for item in items:
                mailbox = self._ours(item, now)
                event = item.get("lifecycleEvent")
                if mailbox is None or event not in EVENTS:
                    metrics.GRAPH_NOTIFICATIONS.labels("rejected").inc()
                    continue
                events.append((mailbox, str(event), str(item["subscriptionId"])))
            if events:
                pipe = self.conn.pipeline(transaction=False)
                for mailbox, event, sub_id in events:
                    pipe.xadd(keys.GRAPH_LIFECYCLE, {"mailbox": mailbox, "event": event, "subscription_id": sub_id},
                              maxlen=LIFECYCLE_MAXLEN, approximate=True)
                pipe.execute()

        if not await self._persist(store):
            return web.Response(status=503, headers={"Retry-After": "5"})
        for mailbox, event, sub_id in events:
            metrics.GRAPH_NOTIFICATIONS.labels(event).inc()
            self.log.info("lifecycle notification", mailbox=mailbox, lifecycle_event=event, subscription_id=sub_id)
        return web.Response(status=202)
