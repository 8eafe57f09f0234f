"""The HTTP endpoint Microsoft Graph POSTs change and lifecycle notifications to.

It runs inside each Graph listener (an aiohttp server on ``notification_listen``, behind a
reverse proxy that owns the public HTTPS ``notification_url``). Graph gives a receiver 3 s; a
slow or failing receiver is retried for hours, and a receiver slow too often gets every
notification delayed, then dropped. So the answer is: persist, then 202 —

- a **change notification** (``POST <path>``) becomes one queued job per message, the same job a
  delta catch-up makes for it (the worker fetches it by its immutable id); this process's
  listener is told of the activity (``on_activity``), so the mailbox is checkpointed by delta
  later. Behind a proxy the POST often reaches a listener that does not hold the mailbox
  (``on_activity`` answers False): then a ``notified`` entry goes to ``el:graph:lifecycle`` for
  the holder to checkpoint instead, at most once a second per mailbox from each receiver;
- a **lifecycle notification** (``POST <path>/lifecycle``: ``missed``, ``subscriptionRemoved``,
  ``reauthorizationRequired``) is appended to ``el:graph:lifecycle``, which the listener holding
  that mailbox reads (it may be another process behind the same proxy);
- each item's ``clientState`` must be the one made for its subscription (its SHA-256 is in
  ``el:graph:subscriptions``, read with one HMGET per POST; found ones are kept in memory for
  ``LOOKUP_TTL``, unknown ones are not, since Graph can notify before the subscription is
  stored); an item that is not ours is dropped and counted, never queued;
- a POST over ``MAX_BODY`` bytes or ``MAX_ITEMS`` items is refused (413) before any Redis work;
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
LOOKUP_TTL = 60.0  # seconds a subscription found in Redis is trusted from memory (a miss is never cached:
# Graph may notify between its 201 for a new subscription and our storing it)
KNOWN_LIMIT = 100_000  # subscriptions kept in memory at most (then forgotten all at once)
# Bounds on one POST, so a stranger cannot make one POST cost unbounded memory and Redis work.
# Graph batches what is queued for a URL into one POST, a few hundred items at most in practice
# (the emulator: 100), so MAX_ITEMS leaves Graph ample room; a basic message notification is under
# 1 KB of JSON (~0.7 KB with ~150-character immutable ids; test_graph_receiver checks that
# MAX_ITEMS of them fit in MAX_BODY). Anything larger is not Graph: 413, refused before any Redis
# work (aiohttp stops reading at MAX_BODY). Each job is its own RQ enqueue (~1-3 ms on a busy
# 2-core machine), so a POST of a few hundred is stored within PERSIST_BUDGET; a full thousand
# may not be (503: Graph retries, and the jobs already queued are not doubled).
MAX_ITEMS = 1000
MAX_BODY = 1024 * 1024
HINT_EVERY = 1.0  # seconds between two "notified" entries for one mailbox from this receiver
EVENTS = ("missed", "subscriptionRemoved", "reauthorizationRequired")


class Receiver:
    """The notification endpoint, served on its own thread and event loop."""

    def __init__(self, listen: str, notification_url: str, conn: redis.Redis,
                 enqueue: Callable[[Sequence[NewMail]], None], on_activity: Callable[[str], bool | None]):
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.path = urllib.parse.urlsplit(notification_url).path.rstrip("/") or ""
        self.conn = conn
        self.store = SubscriptionStore(conn)
        self.enqueue = enqueue
        self.on_activity = on_activity  # True: this process's listener holds the mailbox and noted it
        self.log = logs.get_logger(component="receiver")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="receiver")
        self._known: dict[str, tuple[float, tuple[str, str]]] = {}  # subscription id -> (until, found)
        self._hinted: dict[str, float] = {}  # mailbox -> when its last "notified" entry was stored
        self._hint_lock = threading.Lock()
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
        """The POST's notifications, or the answer to give instead (the validation handshake, 400, 413)."""
        answer = self._validation(request)
        if answer is not None:
            return answer
        if request.content_length is not None and request.content_length > MAX_BODY:
            return self._too_large(f"more than {MAX_BODY} bytes")
        try:
            body = await request.json(loads=json.loads)  # aiohttp stops reading at client_max_size (413)
            items = body["value"]
            if not isinstance(items, list):
                raise TypeError("value is not a list")
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(f"more than {MAX_BODY} bytes")
        except (ValueError, KeyError, TypeError) as exc:
            metrics.GRAPH_NOTIFICATIONS.labels("malformed").inc()
            return web.json_response({"error": f"not a Graph notification: {exc}"}, status=400)
        if len(items) > MAX_ITEMS:
            return self._too_large(f"more than {MAX_ITEMS} items")
        return [i for i in items if isinstance(i, dict)]

    def _too_large(self, what: str) -> web.Response:
        metrics.GRAPH_NOTIFICATIONS.labels("oversize").inc()
        self.log.warning("refused a notification POST that is not Graph's", reason=what)
        return web.json_response({"error": f"refused: {what}"}, status=413)

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

    def _lookup(self, items: list[dict[str, Any]], now: float) -> dict[str, tuple[str, str]]:
        """subscription id -> (mailbox, SHA-256 of its clientState) for the items' subscriptions
        that we made: from memory, the rest with one HMGET. Unknown ids are left out and not
        remembered (the next POST asks Redis again: it may have been stored meanwhile)."""
        found: dict[str, tuple[str, str]] = {}
        wanted: list[str] = []
        for sub_id in dict.fromkeys(i.get("subscriptionId") for i in items):
            if not isinstance(sub_id, str):
                continue
            cached = self._known.get(sub_id)
            if cached is not None and cached[0] >= now:
                found[sub_id] = cached[1]
            else:
                wanted.append(sub_id)
        if not wanted:
            return found
        if len(self._known) + len(wanted) > KNOWN_LIMIT:
            self._known.clear()
        for sub_id, entry in self.store.lookup_many(wanted).items():
            if entry is None:
                self.log.warning("unreadable subscription entry", subscription_id=sub_id)
                continue
            found[sub_id] = entry
            self._known[sub_id] = (now + LOOKUP_TTL, entry)
        return found

    @staticmethod
    def _ours(item: dict[str, Any], found: dict[str, tuple[str, str]]) -> str | None:
        """The mailbox of ``item``'s subscription when its clientState is the one we made, else None."""
        sub_id = item.get("subscriptionId")
        entry = found.get(sub_id) if isinstance(sub_id, str) else None
        state = item.get("clientState")
        if entry is None or not isinstance(state, str) or not hmac.compare_digest(state_hash(state), entry[1]):
            return None
        return entry[0]

    def _hints_due(self, mailboxes: dict[str, str], now: float) -> dict[str, str]:
        """Of ``mailboxes`` (mailbox -> subscription id), those whose last ``notified`` entry from
        this receiver is ``HINT_EVERY`` seconds old or more (or never was)."""
        with self._hint_lock:
            if len(self._hinted) > 10_000:
                self._hinted = {m: at for m, at in self._hinted.items() if now - at < HINT_EVERY}
            return {m: sub_id for m, sub_id in mailboxes.items() if now - self._hinted.get(m, 0.0) >= HINT_EVERY}

    async def _notifications(self, request: web.Request) -> web.Response:
        items = await self._items(request)
        if isinstance(items, web.Response):
            return items
        now = time.time()
        mails: list[NewMail] = []
        rejected = 0
        hinted: dict[str, str] = {}

        def store() -> None:
            nonlocal rejected
            found = self._lookup(items, now)
            subscription_of: dict[str, str] = {}  # mailbox -> a subscription id it was notified by
            for item in items:
                mailbox = self._ours(item, found)
                data = item.get("resourceData")
                item_id = data.get("id") if isinstance(data, dict) else None
                if mailbox is None or not isinstance(item_id, str) or not item_id:
                    rejected += 1
                    continue
                mails.append(NewMail(mailbox=mailbox, item_id=item_id, seen_at=now, via="notification"))
                subscription_of.setdefault(mailbox, str(item["subscriptionId"]))
            for mail in mails:  # one job per message: the job id a catch-up's single mail gets too
                self.enqueue([mail])
            # the jobs are stored: the holder of each mailbox is told, here or through the stream
            elsewhere = {m: sub_id for m, sub_id in subscription_of.items() if not self.on_activity(m)}
            due = self._hints_due(elsewhere, now)
            if due:
                pipe = self.conn.pipeline(transaction=False)
                for mailbox, sub_id in due.items():
                    pipe.xadd(keys.GRAPH_LIFECYCLE, {"mailbox": mailbox, "event": "notified", "subscription_id": sub_id},
                              maxlen=LIFECYCLE_MAXLEN, approximate=True)
                pipe.execute()
                with self._hint_lock:
                    self._hinted.update(dict.fromkeys(due, now))
                hinted.update(due)

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
        if hinted:
            self.log.debug("notified mailboxes held elsewhere; told their holder", mailboxes=len(hinted))
        return web.Response(status=202)

    async def _lifecycle(self, request: web.Request) -> web.Response:
        items = await self._items(request)
        if isinstance(items, web.Response):
            return items
        now = time.time()
        events: list[tuple[str, str, str]] = []

        def store() -> None:
            found = self._lookup(items, now)
            for item in items:
                mailbox = self._ours(item, found)
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
