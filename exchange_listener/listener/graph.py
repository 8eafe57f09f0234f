"""The Microsoft Graph listener (Exchange Online): notifications as hints, delta as the truth.

For each mailbox whose lease it holds (same leases and fair shares as EWS, counted among the
live Graph listeners), the listener:

- keeps one subscription to the mailbox's messages (``sources.graph.subscriptions``), made
  *before* each full catch-up so no mail falls between the two, renewed when a third of its
  life is left, reauthorized on ``reauthorizationRequired``, recreated on
  ``subscriptionRemoved`` and when the periodic listing of the app's subscriptions
  (``VERIFY_SECONDS``) no longer shows it (Graph sometimes removes one without a word);
- runs its notification receiver (``sources.graph.receiver``): a notification is a queued job
  at once; the mailbox is then checkpointed by delta ``checkpoint_seconds`` later;
- catches up by per-folder delta from the stored deltaLinks (``sources.graph.delta``) after every
  gap: on taking a mailbox (start, takeover), on ``missed``, on a recreated subscription, when
  Redis changed under us, and on a sweep of every held mailbox every ``graph_poll_seconds``
  (``3 * checkpoint_seconds`` when that is 0), since notifications can be lost silently;
- without a public ``notification_url`` it only polls: every held mailbox is read by delta every
  ``graph_poll_seconds``.

Subscriptions outlive the process: a restart or a takeover finds the mailbox's subscription in
Redis and keeps it (notifications meanwhile were queued by another listener's receiver, or are
retried by Graph), and catches up the gap by delta. ``mailboxes remove`` deletes it (the
listener that held the mailbox does, when it drops it).
"""
from __future__ import annotations

import threading
import time
from typing import Any, cast

from exchange_listener.core import keys, logs, metrics, redis_conn
from exchange_listener.core.config import Settings, scrub
from exchange_listener.listener import mailboxes as mailboxes_mod
from exchange_listener.listener.base import (
    REDIS_ERRORS,
    BaseListener,
    CatchUps,
    Folders,
)
from exchange_listener.sources.graph.client import (
    AuthenticationFailed,
    GraphClient,
    GraphError,
    NotFound,
)
from exchange_listener.sources.graph.delta import DeltaStore, catch_up_mailbox
from exchange_listener.sources.graph.receiver import Receiver
from exchange_listener.sources.graph.subscriptions import (
    RENEW_WHEN_LEFT,
    Subscriber,
    Subscription,
    SubscriptionStore,
    lifetime,
)

LIFECYCLE_READS = 10  # pages of 1000 lifecycle entries read per tick at most
ORPHAN_AGE = 300.0  # a stored subscription of a mailbox no longer watched is deleted once this old
VERIFY_SECONDS = 60.0  # the app's subscriptions are listed this often (or at each sweep, if sooner) to find
# ones removed without a word
SUBSCRIBE_ONLY: Folders = set()  # a catch-up request that only makes sure the subscription is alive


class GraphListener(BaseListener):
    source = "graph"

    def __init__(self, settings: Settings):
        settings.require("redis_url", "client_id")
        super().__init__(settings)
        self.notifying = bool(settings.notification_url)
        self.delta = DeltaStore(self.conn)
        self.subs = SubscriptionStore(self.conn)
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._expires: dict[str, float] = {}  # mailbox -> its subscription's expiry (epoch seconds)
        self._dead: set[str] = set()  # mailboxes whose subscription must be made anew
        self._reauthorize: set[str] = set()
        self._failing: dict[str, tuple[float, str]] = {}  # mailbox -> (failing since, error)
        self._lifecycle_last = "$"
        self._next_sweep = time.monotonic() + self._sweep_seconds()
        self._verify_every = min(VERIFY_SECONDS, self._sweep_seconds())
        self._next_verify = time.monotonic() + self._verify_every
        self._verifying = False
        self._ghosts: set[str] = set()  # subscriptions to our URL that we never stored, at the last check
        self._lifetime = lifetime(settings)
        self.client = GraphClient(settings)  # listing and deleting subscriptions, on short-lived threads:
        self._client_lock = threading.Lock()  # one at a time (a GraphClient is not thread-safe)
        self.subscriber = Subscriber(self.client, self.subs, settings)
        self.receiver: Receiver | None = None
        if self.notifying:
            self.receiver = Receiver(settings.notification_listen, settings.notification_url, self.conn,
                                     self.sink.enqueue, self._on_notified)
        self.catchups: CatchUps[GraphClient] = CatchUps(self.holds, self._catch_up, lambda _i: GraphClient(settings),
                                                         settings)

    def _sweep_seconds(self) -> float:
        return self.settings.graph_poll_seconds or 3 * self.settings.checkpoint_seconds

    # -- BaseListener --------------------------------------------------------------------------
    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def holds(self, mailbox: str) -> bool:
        return mailbox in self._held

    def _banner(self) -> dict[str, Any]:
        return {"graph_url": self.settings.graph_url,
                "mode": "notifications" if self.notifying else f"polling every {self.settings.graph_poll_seconds:g} s",
                "notification_url": self.settings.notification_url or None}

    def run(self) -> int:
        try:  # a wrong secret, certificate or tenant is said once, at start, not per mailbox forever
            self.client.token()
        except AuthenticationFailed as exc:
            self.log.error("Microsoft Graph refused the app's credentials; check tenant_id (or token_url), client_id "
                           "and client_secret or client_certificate_file", error=scrub(str(exc), self.settings)[:300])
            return 2
        except GraphError as exc:  # the token host unreachable for now: each mailbox's run retries
            self.log.warning("no Graph token at start; retrying", error=scrub(str(exc), self.settings)[:300])
        if self.receiver is not None:
            self.receiver.start()  # before any subscription: Graph validates the URL when one is made
            self.log.info("notification receiver listening", listen=self.settings.notification_listen)
        return super().run()

    def _take(self, mailboxes: list[str]) -> None:
        with self._lock:
            self._held.update(mailboxes)
        self.catchups.request(mailboxes, "take")

    def _drop(self, mailboxes: list[str]) -> None:
        with self._lock:
            self._held.difference_update(mailboxes)
            for mailbox in mailboxes:  # a run still in flight re-checks holds() under the lock before writing these
                self._expires.pop(mailbox, None)
                self._failing.pop(mailbox, None)
                self._dead.discard(mailbox)
                self._reauthorize.discard(mailbox)
        unwatched = [m for m in mailboxes if m not in self.watched]
        if unwatched and self.notifying:  # no longer watched at all: its subscription goes too
            threading.Thread(target=self._delete_subscriptions, args=(unwatched,), daemon=True).start()

    def _delete_subscriptions(self, mailboxes: list[str]) -> None:
        for mailbox in mailboxes:
            try:
                with self._client_lock:
                    self.subscriber.delete(mailbox, self.subs.get(mailbox))
                metrics.GRAPH_SUBSCRIPTIONS.labels("deleted").inc()
            except (GraphError, *REDIS_ERRORS) as exc:  # it expires on its own; the receiver drops its notifications
                self.log.warning("could not delete the subscription of a mailbox no longer watched", mailbox=mailbox,
                                 error=scrub(str(exc), self.settings)[:300])

    def _tick(self) -> None:
        now = time.monotonic()
        try:
            self._read_lifecycle()
        except REDIS_ERRORS as exc:
            self.log.debug("could not read lifecycle notifications", error=str(exc))
        if self.notifying:
            wall = time.time()
            with self._lock:
                expiring = list(self._expires.items())
            due = [m for m, at in expiring
                   if self.holds(m) and at - wall <= self._lifetime * RENEW_WHEN_LEFT]
            if due:
                self.catchups.request(due, "renew", SUBSCRIBE_ONLY)
            if now >= self._next_verify and not self._verifying:
                self._next_verify = now + self._verify_every
                self._verifying = True
                threading.Thread(target=self._verify, daemon=True).start()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_seconds()
            self.catchups.request(self.held(), "sweep" if self.notifying else "poll")

    def _checkpoints(self) -> None:
        """A mailbox that had notifications is read by delta ``checkpoint_seconds`` later (every
        folder: a notification does not say which)."""
        due_before = time.monotonic() - self.settings.checkpoint_seconds
        with self._activity_lock:
            due = [m for m, (since, _f) in self._active.items() if since <= due_before]
            for mailbox in due:
                del self._active[mailbox]
        due = [m for m in due if self.holds(m)]
        if due:
            self.catchups.request(due, "checkpoint")

    def _source_info(self) -> dict[str, Any]:
        now = time.time()
        receiver = self.receiver
        with self._lock:  # catch-up threads write these
            expires, failing = list(self._expires.values()), list(self._failing.items())
        return {
            "groups": [],
            "graph": {
                "mode": "notifications" if self.notifying else "polling",
                "receiver": self.settings.notification_listen if receiver is not None else None,
                "subscriptions": len(expires),
                "next_expiry_in_s": round(min(expires) - now, 1) if expires else None,
                "notifications": receiver.received if receiver is not None else 0,
                "last_notification_at": receiver.last_notification_at if receiver is not None else None,
                "failing": [{"mailbox": m, "since": since, "error": error} for m, (since, error) in failing[:20]],
                "failing_count": len(failing),
            },
        }

    def _stop_source(self, deadline: float) -> dict[str, Any]:
        if self.receiver is not None:
            self.receiver.stop(max(0.1, min(2.0, deadline - time.monotonic() - 2)))
        with self._client_lock:  # a listing or deleting thread may still be using it
            self.client.close()
        with self._lock:
            return {"subscriptions_kept": len(self._expires)}

    # -- notifications and lifecycle ------------------------------------------------------------
    def _on_notified(self, mailbox: str) -> bool:
        """A notification for ``mailbox`` reached our receiver: True when we hold it (its checkpoint
        is scheduled); False tells the receiver to pass the word on to the holder through Redis."""
        if self.holds(mailbox):
            self._note_activity(mailbox, set())
            return True
        return False

    def _read_lifecycle(self) -> None:
        """Act on the lifecycle notifications (any receiver stored them) for mailboxes we hold."""
        if self._lifecycle_last == "$":  # from the newest entry on; a mailbox taken later is caught up anyway
            newest = cast(list[tuple[bytes, dict]], self.conn.xrevrange(keys.GRAPH_LIFECYCLE, count=1))
            self._lifecycle_last = redis_conn.text(newest[0][0]) if newest else "0-0"
        for _ in range(LIFECYCLE_READS):  # until read up: a burst of hints must not push events out unread
            replies = cast(list[tuple[bytes, list[tuple[bytes, dict]]]],
                           self.conn.xread({keys.GRAPH_LIFECYCLE: self._lifecycle_last}, count=1000))
            read = 0
            for _stream, entries in replies or ():
                for entry_id, fields in entries:
                    data = {redis_conn.text(k): redis_conn.text(v) for k, v in fields.items()}
                    self._on_lifecycle(data)  # a Redis error here leaves the entry to be read again
                    self._lifecycle_last = redis_conn.text(entry_id)
                    read += 1
            if read < 1000:
                return

    def _on_lifecycle(self, data: dict[str, str]) -> None:
        mailbox, event = data.get("mailbox", ""), data.get("event", "")
        if not self.holds(mailbox):
            return
        if event == "notified":  # another listener's receiver had a notification for a mailbox we hold
            self._note_activity(mailbox, set())
            return
        current = self.subs.get(mailbox)
        if current is not None and data.get("subscription_id") not in ("", current.id):
            return  # about a subscription already replaced
        if event == "subscriptionRemoved":
            self._dead.add(mailbox)
            self.catchups.request([mailbox], "subscription_removed")
        elif event == "reauthorizationRequired":
            self._reauthorize.add(mailbox)
            self.catchups.request([mailbox], "reauthorize", SUBSCRIBE_ONLY)
        else:  # missed: some notifications were not sent
            self.catchups.request([mailbox], "missed")

    def _verify(self) -> None:
        """Find held mailboxes whose subscription Graph no longer lists; make them anew and catch up."""
        try:
            started = time.time()
            with self._client_lock:
                listed = self.subscriber.live()
            live = {str(item.get("id")) for item in listed}
            gone = []
            for mailbox in self.held():
                sub = self.subs.get(mailbox)
                if sub is None or (sub.created_at < started - 1 and sub.id not in live):
                    gone.append(mailbox)  # none stored (forgotten) counts too: it must be made again
            if gone:
                self.log.warning("subscriptions removed without notice; making them anew and catching up",
                                 mailboxes=len(gone))
                self._dead.update(gone)
                self.catchups.request(gone, "subscription_gone")
            self._delete_orphans(started)
            self._delete_ghosts(listed)
        except (GraphError, *REDIS_ERRORS) as exc:
            self.log.warning("could not list subscriptions", error=scrub(str(exc), self.settings)[:300])
        finally:
            self._verifying = False

    def _delete_orphans(self, now: float) -> None:
        """Delete the stored subscriptions of mailboxes no longer watched through Graph that no
        listener deleted (its holder was killed, or the mailbox moved to EWS meanwhile); only old
        ones, so that a mailbox added a moment ago, which our watched set may not show yet, keeps
        its new subscription."""
        if self._version_seen is None or self._set_missing:
            return  # the watched set not loaded (or lost): everything would look orphaned
        if mailboxes_mod.version(self.conn) is None:
            return  # the set is gone from Redis (data loss?): nothing can be judged orphaned
        watched = mailboxes_mod.list_all(self.conn, source=self.source)  # fresh: ours may be a tick old
        orphans = []
        for sub_id, entry in self.subs.entries().items():
            if entry is None or entry[0] in watched:
                continue  # watched, or an unreadable entry, not ours to judge
            mailbox = entry[0]
            try:
                current = self.subs.get(mailbox)
            except ValueError:
                continue
            if current is None or current.id != sub_id or current.created_at < now - ORPHAN_AGE:
                orphans.append((mailbox, current if current is not None and current.id == sub_id else None, sub_id))
        for mailbox, sub, sub_id in orphans[:100]:
            try:
                with self._client_lock:
                    if sub is not None:
                        self.subscriber.delete(mailbox, sub)
                    else:  # only its lookup entry is left: Graph's subscription expires by itself
                        self.subs.forget(mailbox, sub_id)
                self.log.info("deleted the subscription of a mailbox no longer watched", mailbox=mailbox,
                              subscription_id=sub_id)
            except GraphError as exc:
                self.log.warning("could not delete an orphaned subscription", mailbox=mailbox,
                                 error=scrub(str(exc), self.settings)[:300])

    def _delete_ghosts(self, listed: list[dict[str, Any]]) -> None:
        """Delete subscriptions Graph has to our notification URL that we never stored (a create
        retried after a timeout made two): listed by two checks in a row, so that one made a moment
        ago, not stored yet, is left to its maker."""
        ours = [str(item.get("id")) for item in listed if item.get("notificationUrl") == self.settings.notification_url]
        known = self.conn.hmget(keys.GRAPH_SUBSCRIPTIONS, ours) if ours else []
        unknown = {sub_id for sub_id, found in zip(ours, known) if found is None}
        for sub_id in sorted(unknown & self._ghosts)[:100]:
            try:
                with self._client_lock:
                    self.client.request("DELETE", f"subscriptions/{sub_id}")
                self.log.info("deleted a subscription to our URL that was never stored", subscription_id=sub_id)
            except NotFound:
                pass
            except GraphError as exc:
                self.log.warning("could not delete an unknown subscription", subscription_id=sub_id,
                                 error=scrub(str(exc), self.settings)[:300])
        self._ghosts = unknown - self._ghosts

    # -- one catch-up run (on a catch-up thread, with its own client) ---------------------------
    def _catch_up(self, client: GraphClient, mailbox: str, reason: str, folders: Folders) -> None:
        """Keep the subscription alive, then read delta. Notifications are only a hint: when the
        subscription cannot be made or renewed (the public URL down, a permission missing), the
        mailbox is still read by delta, every folder, and the run fails afterwards so that it is
        retried with backoff and ``status`` names the mailbox."""
        hint_error: Exception | None = None
        if self.notifying:
            try:
                if self._ensure_subscription(client, mailbox):
                    folders = None  # a subscription made anew: whatever came meanwhile is found by delta
            except Exception as exc:  # noqa: BLE001 - raised again below, once delta has run
                hint_error, folders = exc, None
        try:
            if folders is None or folders:
                total = catch_up_mailbox(client, mailbox, self.delta, self.ledger, self.sink.enqueue,
                                         added_at=self.watched.get(mailbox),
                                         folders=sorted(folders) if folders else None)
                metrics.CATCHUPS.labels("full").inc()
                logs.get_logger().debug("caught up", mailbox=mailbox, reason=reason, items=total)
        except Exception as exc:
            self._note_failing(mailbox, exc)
            raise
        if hint_error is not None:
            self._note_failing(mailbox, hint_error)
            raise hint_error
        with self._lock:
            self._failing.pop(mailbox, None)

    def _note_failing(self, mailbox: str, exc: Exception) -> None:
        error = scrub(f"{type(exc).__name__}: {exc}", self.settings)[:300]
        with self._lock:
            if mailbox in self._held:  # a mailbox dropped meanwhile is not ours to report
                self._failing[mailbox] = (self._failing.get(mailbox, (time.time(), ""))[0], error)

    def _ensure_subscription(self, client: GraphClient, mailbox: str) -> bool:
        """Make sure ``mailbox`` has a live subscription; True when it had to be made anew (a gap)."""
        subscriber = Subscriber(client, self.subs, self.settings)
        sub: Subscription | None = self.subs.get(mailbox)
        fresh = False
        was_dead = mailbox in self._dead
        if sub is not None and was_dead:
            try:
                subscriber.delete(mailbox, sub)  # a ghost must not keep notifying (it usually is gone already)
            except GraphError:
                self.subs.forget(mailbox, sub.id)  # its notifications are refused from now on
            sub = None
        if sub is not None and sub.expires_at <= time.time() + 1:
            self.subs.forget(mailbox, sub.id)  # expired: Graph has dropped it
            sub = None
        if sub is not None and mailbox in self._reauthorize:
            try:
                sub = subscriber.reauthorize(sub)
                metrics.GRAPH_SUBSCRIPTIONS.labels("reauthorized").inc()
            except NotFound:
                self.subs.forget(mailbox, sub.id)
                sub = None
            self._reauthorize.discard(mailbox)
        elif sub is not None and subscriber.due(sub):
            try:
                sub = subscriber.renew(sub)
                metrics.GRAPH_SUBSCRIPTIONS.labels("renewed").inc()
            except NotFound:
                self.subs.forget(mailbox, sub.id)
                sub = None
        if sub is None:
            sub = subscriber.create(mailbox)
            fresh = True
            metrics.GRAPH_SUBSCRIPTIONS.labels("created").inc()
            self.log.info("subscribed", mailbox=mailbox, subscription_id=sub.id)
        if was_dead:  # only now: a failed delete or create leaves it to the retry
            self._dead.discard(mailbox)
        with self._lock:
            held = mailbox in self._held
            if held:
                self._expires[mailbox] = sub.expires_at
        if not held and mailbox not in self.watched:  # removed while we subscribed: the new one goes too
            self._delete_subscriptions([mailbox])
        return fresh
