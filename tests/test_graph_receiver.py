"""The Graph notification receiver (``sources.graph.receiver.Receiver``) on its own: started for
real on a free port with a real redis-server and the real job Sink, driven over real HTTP as
Graph drives it: the validation handshake, change and lifecycle notifications, forgeries and
unknown subscriptions, a subscription stored just after Graph started notifying it, Redis away
(503, so Graph retries), oversized POSTs (413), and the ``notified`` hints for the listener that
holds a mailbox when this process's listener does not.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid

import pytest
import redis
import requests

from emulators.services import RedisServer, free_port
from exchange_listener import queueing
from exchange_listener.core import config, keys, redis_conn
from exchange_listener.listener.base import Sink
from exchange_listener.sources.graph import receiver as receiver_module
from exchange_listener.sources.graph.receiver import Receiver
from exchange_listener.sources.graph.subscriptions import (
    Subscription,
    SubscriptionStore,
)

MAILBOX = "rep@ours.example"
OTHER = "other@ours.example"
PUBLIC_URL = "https://hooks.ours.example/graph/notify"
TENANT = "4f0c1e2a-0000-4000-8000-000000000001"


class Activity:
    """``on_activity``: records the calls; answers True (held here) for the mailboxes in ``held``."""

    def __init__(self, held: set[str] | None = None, answer_none: bool = False):
        self.held = held if held is not None else set()
        self.answer_none = answer_none
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, mailbox: str) -> bool | None:
        with self.lock:
            self.calls.append(mailbox)
        if self.answer_none:
            return None
        return mailbox in self.held


class Harness:
    def __init__(self, conn: redis.Redis, activity: Activity | None = None):
        self.conn = conn
        self.settings = config.load(env={})
        self.sink = Sink(conn, self.settings, source="graph")
        self.queue = queueing.make_queue(conn, self.settings.queue_name)
        self.activity = activity or Activity(held={MAILBOX, OTHER})
        self.port = free_port()
        self.receiver = Receiver(f"127.0.0.1:{self.port}", PUBLIC_URL, conn, self.sink.enqueue, self.activity)
        self.url = f"http://127.0.0.1:{self.port}/graph/notify"
        self.lifecycle_url = self.url + "/lifecycle"
        self.store = SubscriptionStore(conn)

    def subscribe(self, mailbox: str = MAILBOX, sub_id: str | None = None) -> tuple[str, str]:
        """Store a subscription as Subscriber.create does after Graph's 201; (id, clientState)."""
        sub_id = sub_id or str(uuid.uuid4())
        state = uuid.uuid4().hex
        now = time.time()
        self.store.put(Subscription(sub_id, mailbox, now + 3600, now), state)
        return sub_id, state

    def post(self, items: list[dict], lifecycle: bool = False) -> requests.Response:
        return requests.post(self.lifecycle_url if lifecycle else self.url, json={"value": items}, timeout=10)

    def job_ids(self) -> set[str]:
        return set(self.queue.job_ids)

    def lifecycle_entries(self) -> list[dict[str, str]]:
        return [{redis_conn.text(k): redis_conn.text(v) for k, v in fields.items()}
                for _id, fields in self.conn.xrange(keys.GRAPH_LIFECYCLE)]


def change(sub_id: str, state: str | None, message_id: str, mailbox: str = MAILBOX) -> dict:
    """One change notification as Graph sends it for a new message (basic: the id only)."""
    item = {
        "subscriptionId": sub_id,
        "subscriptionExpirationDateTime": "2026-12-01T11:00:00.0000000Z",
        "changeType": "created",
        "resource": f"Users/{mailbox}/Messages/{message_id}",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": f"Users/{mailbox}/Messages/{message_id}",
                         "@odata.etag": 'W/"CQAAABYAAADe7tqvYXBhRY"', "id": message_id},
        "tenantId": TENANT,
    }
    if state is not None:
        item["clientState"] = state
    return item


def lifecycle(sub_id: str, state: str, event: str = "missed") -> dict:
    return {"subscriptionId": sub_id, "subscriptionExpirationDateTime": "2026-12-01T11:00:00.0000000Z",
            "tenantId": TENANT, "clientState": state, "lifecycleEvent": event}


def message_id() -> str:
    # Graph's immutable ids are ~152 base64url characters
    return "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A" + uuid.uuid4().hex * 3 + "AAA="


@pytest.fixture
def harness(redis_client):
    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        h = Harness(redis_client, **kwargs)
        h.receiver.start()
        made.append(h)
        return h

    yield make
    for h in made:
        h.receiver.stop()


@pytest.mark.parametrize("lifecycle_path", [False, True])
def test_validation_handshake_echoes_the_token_as_text(harness, lifecycle_path):
    h = harness()
    token = "Validation: Testing client application reachability for subscription Request-Id: 2d6e1f3a-9c1b"
    url = (h.lifecycle_url if lifecycle_path else h.url) + "?validationToken=" + urllib.parse.quote(token)
    answer = requests.post(url, data=b"", headers={"Content-Type": "text/plain"}, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert answer.text == token


def test_notification_with_its_client_state_is_queued_once_per_message(harness):
    h = harness()
    sub_id, state = h.subscribe()
    first, second = message_id(), message_id()
    answer = h.post([change(sub_id, state, first), change(sub_id, state, second)])
    assert answer.status_code == 202
    assert h.job_ids() == {queueing.job_id(MAILBOX, [first]), queueing.job_id(MAILBOX, [second])}
    job = h.queue.fetch_job(queueing.job_id(MAILBOX, [first]))
    assert json.dumps(job.args[0]).count(first) == 1 and job.args[0]["source"] == "graph"
    assert h.activity.calls == [MAILBOX]  # told once per POST and mailbox
    assert h.receiver.received == 2
    assert h.lifecycle_entries() == []  # held here: no hint for another listener


@pytest.mark.parametrize("state", ["wrong", None], ids=["wrong clientState", "no clientState"])
def test_forged_notification_is_acknowledged_but_not_queued(harness, state):
    h = harness()
    sub_id, real_state = h.subscribe()
    answer = h.post([change(sub_id, "x" + real_state if state == "wrong" else None, message_id())])
    assert answer.status_code == 202  # a forgery is dropped and counted; nothing for Graph to retry
    assert h.job_ids() == set()
    assert h.activity.calls == []
    assert h.lifecycle_entries() == []


def test_subscription_stored_after_graph_began_notifying_is_not_refused_for_long(harness):
    """Graph can notify between its 201 for the subscription and our store.put: that first
    notification cannot be told from a forgery and is dropped, but the next one (the subscription
    stored meanwhile) must be queued, not refused from a cached miss."""
    h = harness()
    sub_id, state = str(uuid.uuid4()), uuid.uuid4().hex
    early = message_id()
    assert h.post([change(sub_id, state, early)]).status_code == 202
    assert h.job_ids() == set()
    now = time.time()
    h.store.put(Subscription(sub_id, MAILBOX, now + 3600, now), state)
    later = message_id()
    assert h.post([change(sub_id, state, later)]).status_code == 202
    assert h.job_ids() == {queueing.job_id(MAILBOX, [later])}


def test_known_subscription_is_served_from_memory(harness):
    """A hit is cached: the subscription's hash entry gone, its notifications still pass for a while."""
    h = harness()
    sub_id, state = h.subscribe()
    assert h.post([change(sub_id, state, message_id())]).status_code == 202
    h.conn.hdel(keys.GRAPH_SUBSCRIPTIONS, sub_id)
    again = message_id()
    assert h.post([change(sub_id, state, again)]).status_code == 202
    assert queueing.job_id(MAILBOX, [again]) in h.job_ids()


def test_many_subscriptions_in_one_post_are_looked_up_in_one_command(harness, redis_server):
    """Random subscription ids cost one HMGET per POST, not one HGET each (counted by Redis)."""
    h = harness()
    sub_id, state = h.subscribe()
    mine = message_id()
    items = [change(str(uuid.uuid4()), "forged", message_id()) for _ in range(300)] + [change(sub_id, state, mine)]
    h.conn.config_resetstat()
    assert h.post(items).status_code == 202
    stats = h.conn.info("commandstats")
    assert stats.get("cmdstat_hmget", {}).get("calls") == 1
    assert "cmdstat_hget" not in stats
    assert h.job_ids() == {queueing.job_id(MAILBOX, [mine])}


def test_lifecycle_notification_is_appended_for_the_holder(harness):
    h = harness()
    sub_id, state = h.subscribe()
    assert h.post([lifecycle(sub_id, state, "missed"), lifecycle(sub_id, state, "reauthorizationRequired"),
                   lifecycle(sub_id, "forged", "subscriptionRemoved"), lifecycle(sub_id, state, "bogus")],
                  lifecycle=True).status_code == 202
    assert h.lifecycle_entries() == [
        {"mailbox": MAILBOX, "event": "missed", "subscription_id": sub_id},
        {"mailbox": MAILBOX, "event": "reauthorizationRequired", "subscription_id": sub_id},
    ]
    assert h.job_ids() == set()


@pytest.mark.parametrize("lifecycle_path", [False, True])
def test_malformed_body_is_a_400(harness, lifecycle_path):
    h = harness()
    url = h.lifecycle_url if lifecycle_path else h.url
    assert requests.post(url, data=b"{not json", timeout=10).status_code == 400
    assert requests.post(url, json={"value": {"a": 1}}, timeout=10).status_code == 400


def test_redis_away_is_a_503_and_the_retry_is_queued():
    """Nothing is acknowledged that was not stored: with Redis gone the answer is 503 (Graph
    retries), and the retry once Redis is back is queued."""
    with RedisServer() as server:
        conn = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
        h = Harness(conn)
        h.receiver.start()
        try:
            sub_id, state = h.subscribe()
            assert h.post([change(sub_id, state, message_id())]).status_code == 202  # the subscription is cached now
            server.kill()
            for lifecycle_path in (False, True):  # a cached subscription and an uncached lookup both fail
                pending = message_id()
                item = lifecycle(sub_id, state) if lifecycle_path else change(sub_id, state, pending)
                started = time.monotonic()
                answer = h.post([item], lifecycle=lifecycle_path)
                assert answer.status_code == 503
                assert answer.headers.get("Retry-After")
                assert time.monotonic() - started < 3.0  # within Graph's 3 s
            server.start()  # an empty Redis: the subscription is still known from memory
            retried = message_id()
            assert h.post([change(sub_id, state, retried)]).status_code == 202
            assert queueing.job_id(MAILBOX, [retried]) in h.job_ids()
        finally:
            h.receiver.stop()
            conn.close()


@pytest.mark.parametrize("lifecycle_path", [False, True])
def test_oversized_body_is_a_413(harness, lifecycle_path):
    h = harness()
    sub_id, state = h.subscribe()
    filler = "x" * (receiver_module.MAX_BODY + 1)
    body = json.dumps({"value": [change(sub_id, state, message_id())], "padding": filler}).encode()
    answer = requests.post(h.lifecycle_url if lifecycle_path else h.url, data=body,
                           headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 413
    assert h.job_ids() == set()


def test_oversized_chunked_body_is_a_413(harness):
    """Without a Content-Length the body is read up to MAX_BODY and no further."""
    h = harness()
    chunk = b" " * 65536
    body = iter([b'{"value": []'] + [chunk] * (receiver_module.MAX_BODY // len(chunk) + 1) + [b"}"])
    answer = requests.post(h.url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 413


@pytest.mark.parametrize("lifecycle_path", [False, True])
def test_too_many_items_are_refused(harness, lifecycle_path):
    h = harness()
    sub_id, state = h.subscribe()
    make = (lambda: lifecycle(sub_id, state)) if lifecycle_path else (lambda: change(sub_id, state, "m"))
    answer = h.post([make() for _ in range(receiver_module.MAX_ITEMS + 1)], lifecycle=lifecycle_path)
    assert answer.status_code == 413
    assert h.job_ids() == set()
    assert h.lifecycle_entries() == []


def test_the_item_cap_fits_in_the_body_cap_and_a_graph_sized_post_is_stored_in_time(harness):
    """MAX_ITEMS notifications as Graph writes them fit in MAX_BODY (the cap on items, not on
    bytes, is what refuses a long POST); a POST as large as Graph's (the emulator sends up to
    100 items) is queued within Graph's 3 s."""
    h = harness()
    sub_id, state = h.subscribe()
    full = {"value": [change(sub_id, state, message_id()) for _ in range(receiver_module.MAX_ITEMS)]}
    assert len(json.dumps(full).encode()) < receiver_module.MAX_BODY
    items = full["value"][:100]
    started = time.monotonic()
    answer = h.post(items)
    elapsed = time.monotonic() - started
    assert answer.status_code == 202, answer.text
    assert len(h.job_ids()) == len(items)
    assert elapsed < 3.0


@pytest.mark.parametrize("answer_none", [False, True], ids=["False", "None"])
def test_not_held_here_becomes_a_notified_hint_once_per_mailbox_per_second(harness, answer_none):
    """Behind one public URL the notification may reach a listener that does not hold the
    mailbox: the receiver appends a ``notified`` entry for the holder, at most once a second."""
    h = harness(activity=Activity(held=set(), answer_none=answer_none))
    sub_id, state = h.subscribe()
    other_id, other_state = h.subscribe(OTHER)
    started = time.monotonic()
    for _ in range(3):
        assert h.post([change(sub_id, state, message_id()), change(other_id, other_state, message_id(), OTHER)]
                      ).status_code == 202
    burst = time.monotonic() - started
    assert burst < 0.9, f"the burst took {burst:.2f} s; the once-a-second check needs it shorter"
    assert len(h.job_ids()) == 6  # queued here all the same
    entries = h.lifecycle_entries()
    assert sorted(entries, key=lambda e: e["mailbox"]) == [
        {"mailbox": OTHER, "event": "notified", "subscription_id": other_id},
        {"mailbox": MAILBOX, "event": "notified", "subscription_id": sub_id},
    ]
    time.sleep(1.1)
    assert h.post([change(sub_id, state, message_id())]).status_code == 202
    assert [e["mailbox"] for e in h.lifecycle_entries()] == [e["mailbox"] for e in entries] + [MAILBOX]


def test_held_here_makes_no_hint(harness):
    h = harness(activity=Activity(held={MAILBOX}))
    sub_id, state = h.subscribe()
    other_id, other_state = h.subscribe(OTHER)
    assert h.post([change(sub_id, state, message_id()), change(other_id, other_state, message_id(), OTHER)]
                  ).status_code == 202
    assert sorted(h.activity.calls) == [OTHER, MAILBOX]
    assert h.lifecycle_entries() == [{"mailbox": OTHER, "event": "notified", "subscription_id": other_id}]
