"""Graph change-notification subscriptions: one per watched mailbox, on every folder's messages.

A subscription is a hint channel only (notifications can be late, doubled, dropped, or the
subscription removed without a word); delta (``sources.graph.delta``) is the truth. So the
listener holding a mailbox keeps its subscription alive (created before each full catch-up,
renewed when a third of its life is left, recreated when Graph says it was removed or when the
periodic listing no longer shows it) and reads delta after every gap.

Each subscription gets a random ``clientState``; only its SHA-256 is stored, so the receiver
can tell Graph's notifications from forgeries without the secret being kept in Redis.

Keys (named in ``exchange_listener.core.keys``):

- ``el:graph:subscriptions`` — hash, subscription id -> JSON ``{"mailbox", "client_state_sha256"}``:
  what the receiver (in any listener behind the public URL) looks notifications up in.
- ``el:graph:subscription:<mailbox>`` — hash: ``id``, ``expires_at`` and ``created_at`` (epoch
  seconds) of the mailbox's current subscription.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import redis

from exchange_listener.core import keys, redis_conn
from exchange_listener.core.config import Settings
from exchange_listener.sources.graph.client import (
    GraphClient,
    GraphError,
    NotFound,
    user_path,
)

RENEW_WHEN_LEFT = 1 / 3  # renew when this share of the asked lifetime is left
LONGEST = (4230 - 5) * 60  # Outlook's hard limit is 4230 minutes from Graph's clock: ours may run ahead


def lifetime(settings: Settings) -> float:
    """Seconds of life asked for each subscription."""
    return min(settings.graph_subscription_minutes * 60, LONGEST)


def lifecycle_url(notification_url: str) -> str:
    """Where lifecycle notifications go: the notification URL's path + ``/lifecycle``."""
    parts = urllib.parse.urlsplit(notification_url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/lifecycle"))


def state_hash(client_state: str) -> str:
    return hashlib.sha256(client_state.encode()).hexdigest()


def graph_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_graph_time(text: str) -> float:
    """Graph's ISO 8601 times (``2026-12-01T10:00:00.0000000Z``: up to 7 fraction digits)."""
    head, _, frac = text.rstrip("Z").partition(".")
    value = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    return value + (float("0." + frac) if frac.isdigit() else 0.0)


@dataclasses.dataclass(frozen=True)
class Subscription:
    id: str
    mailbox: str
    expires_at: float
    created_at: float


class SubscriptionStore:
    """The subscriptions in Redis: per mailbox, and by id for the receiver."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn

    def get(self, mailbox: str) -> Subscription | None:
        raw = {redis_conn.text(k): redis_conn.text(v) for k, v in self.conn.hgetall(keys.graph_subscription(mailbox)).items()}
        if not raw.get("id"):
            return None
        return Subscription(raw["id"], mailbox, float(raw.get("expires_at") or 0), float(raw.get("created_at") or 0))

    def put(self, sub: Subscription, client_state: str | None = None) -> None:
        pipe = self.conn.pipeline()
        pipe.hset(keys.graph_subscription(sub.mailbox),
                  mapping={"id": sub.id, "expires_at": repr(sub.expires_at), "created_at": repr(sub.created_at)})
        if client_state is not None:
            pipe.hset(keys.GRAPH_SUBSCRIPTIONS, sub.id,
                      json.dumps({"mailbox": sub.mailbox, "client_state_sha256": state_hash(client_state)}))
        pipe.execute()

    def forget(self, mailbox: str, subscription_id: str | None = None) -> None:
        """Forget ``mailbox``'s subscription (or only the id ``subscription_id`` if that is not it)."""
        current = self.get(mailbox)
        pipe = self.conn.pipeline()
        if subscription_id:
            pipe.hdel(keys.GRAPH_SUBSCRIPTIONS, subscription_id)
        if current is not None and subscription_id in (None, current.id):
            pipe.hdel(keys.GRAPH_SUBSCRIPTIONS, current.id)
            pipe.delete(keys.graph_subscription(mailbox))
        pipe.execute()

    def lookup_many(self, subscription_ids: list[str]) -> dict[str, tuple[str, str] | None]:
        """Subscription id -> (mailbox, SHA-256 of its clientState) of those we made, in one HMGET;
        an unreadable entry maps to None, an unknown id is left out."""
        out: dict[str, tuple[str, str] | None] = {}
        if not subscription_ids:
            return out
        for sub_id, raw in zip(subscription_ids, self.conn.hmget(keys.GRAPH_SUBSCRIPTIONS, subscription_ids),
                               strict=True):
            if raw is None:
                continue
            try:
                data = json.loads(raw)
                out[sub_id] = (str(data["mailbox"]), str(data["client_state_sha256"]))
            except (ValueError, KeyError, TypeError):
                out[sub_id] = None
        return out

    def entries(self) -> dict[str, tuple[str, str] | None]:
        """Every stored subscription id -> (mailbox, clientState hash), None when unreadable."""
        return self.lookup_many([redis_conn.text(k) for k in self.conn.hkeys(keys.GRAPH_SUBSCRIPTIONS)])


class Subscriber:
    """Create, renew, reauthorize and delete subscriptions through Graph."""

    def __init__(self, client: GraphClient, store: SubscriptionStore, settings: Settings):
        self.client = client
        self.store = store
        self.settings = settings
        self.lifetime = lifetime(settings)

    def due(self, sub: Subscription, now: float | None = None) -> bool:
        """Renewal is due: a third of the asked lifetime (or less) is left."""
        now = time.time() if now is None else now
        return sub.expires_at - now <= self.lifetime * RENEW_WHEN_LEFT

    def create(self, mailbox: str) -> Subscription:
        client_state = secrets.token_urlsafe(32)
        now = time.time()
        body = {
            "changeType": "created",
            "notificationUrl": self.settings.notification_url,
            "lifecycleNotificationUrl": lifecycle_url(self.settings.notification_url),
            "resource": f"{user_path(mailbox)}/messages",
            "expirationDateTime": graph_time(now + self.lifetime),
            "clientState": client_state,
        }
        data = self.client.request("POST", "subscriptions", json=body).json()
        sub = Subscription(data["id"], mailbox, parse_graph_time(data["expirationDateTime"]), now)
        replaced = self.store.get(mailbox)
        self.store.put(sub, client_state)
        if replaced is not None and replaced.id != sub.id:  # another listener's (a takeover) or a forgotten one
            self.store.forget(mailbox, replaced.id)
            try:
                self.client.request("DELETE", f"subscriptions/{replaced.id}")
            except GraphError:
                pass  # it expires by itself; its notifications are refused meanwhile
        return sub

    def renew(self, sub: Subscription) -> Subscription:
        """A longer life for ``sub`` (``NotFound``: Graph no longer has it)."""
        data = self.client.request("PATCH", f"subscriptions/{sub.id}",
                                   json={"expirationDateTime": graph_time(time.time() + self.lifetime)}).json()
        renewed = dataclasses.replace(sub, expires_at=parse_graph_time(data["expirationDateTime"]))
        self.store.put(renewed)
        return renewed

    def reauthorize(self, sub: Subscription) -> Subscription:
        """Answer ``reauthorizationRequired``: reauthorize, and renew (which also reauthorizes)."""
        self.client.request("POST", f"subscriptions/{sub.id}/reauthorize")
        return self.renew(sub)

    def delete(self, mailbox: str, sub: Subscription | None) -> None:
        if sub is not None:
            try:
                self.client.request("DELETE", f"subscriptions/{sub.id}")
            except NotFound:
                pass
        self.store.forget(mailbox, sub.id if sub is not None else None)

    def live(self) -> list[dict[str, Any]]:
        """Every subscription Graph has for this app (``GET /subscriptions``, every page)."""
        return list(self._pages("subscriptions"))

    def _pages(self, url: str) -> Iterator[dict[str, Any]]:
        next_url: str | None = url
        while next_url:
            data = self.client.request("GET", next_url).json()
            yield from data.get("value", ())
            next_url = data.get("@odata.nextLink")
