"""Notifications: each transition reaches a local HTTP receiver exactly once, correctly signed,
after retries; a crashed drainer loses nothing; failures are visible; the callable is called
once; the secret never shows up in logs or errors."""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exchange_listener import logs
from exchange_listener.local_services import free_port
from workers.enrollments import OUTBOX_KEY, STREAM_KEY, EnrollmentStore
from workers.notify import Notifier, verify

SECRET = "whsec-4f8a2c-very-secret"


class Receiver:
    """A real HTTP server that checks signatures itself and can fail or hang on request."""

    def __init__(self, secret=SECRET, fail_first=0, always_fail=False, hang_first=False):
        self.secret, self.fail_first, self.always_fail, self.hang_first = secret, fail_first, always_fail, hang_first
        self.attempts: Counter = Counter()
        self.accepted: Counter = Counter()
        self.bodies: dict = {}
        self.bad_signatures = 0
        self.lock, self.release = threading.Lock(), threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ts = self.headers["X-Exchange-Listener-Timestamp"]
                expected = "sha256=" + hmac.new(receiver.secret.encode(), ts.encode() + b"." + body,
                                                hashlib.sha256).hexdigest()
                delivery = self.headers["X-Exchange-Listener-Delivery"]
                with receiver.lock:
                    receiver.attempts[delivery] += 1
                    n = sum(receiver.attempts.values())
                    ok_sig = hmac.compare_digest(expected, self.headers["X-Exchange-Listener-Signature"] or "")
                    fresh = abs(time.time() - int(ts)) < 60
                    if not (ok_sig and fresh):
                        receiver.bad_signatures += 1
                if receiver.hang_first and n == 1:
                    receiver.release.wait(60)
                if not (ok_sig and fresh):
                    code = 401
                elif receiver.always_fail or receiver.attempts[delivery] <= receiver.fail_first:
                    code = 503
                else:
                    with receiver.lock:
                        receiver.accepted[delivery] += 1
                        receiver.bodies[delivery] = json.loads(body)
                    code = 204
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/el"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory():
    made = []

    def make(**kwargs):
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def drain_until(notifier, done, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        notifier.drain()
        time.sleep(0.02)


def stop_some(redis_client, count):
    store = EnrollmentStore(redis_client)
    return [store.transition(f"e{n}", "stopped", "replied", event_key=f"reply:{n}", by=f"p{n}@prospect.example",
                             item_id=f"item-{n}", mailbox="rep@us.example") for n in range(count)]


def test_each_transition_delivered_once_signed_after_retries(redis_client, receiver_factory):
    receiver = receiver_factory(fail_first=2)
    transitions = stop_some(redis_client, 5)
    # replays and duplicates add nothing to deliver
    assert stop_some(redis_client, 5) == [None] * 5
    notifier = Notifier(redis_client, webhook_url=receiver.url, webhook_secret=SECRET, backoff_base=0.05)
    drain_until(notifier, lambda: len(receiver.accepted) == 5)
    for _ in range(3):
        notifier.drain()
    assert receiver.bad_signatures == 0
    assert receiver.accepted == Counter({t.id: 1 for t in transitions})
    assert all(receiver.attempts[t.id] == 3 for t in transitions)  # two 503s, then success
    body = receiver.bodies[transitions[0].id]
    assert body["type"] == "enrollment.transition"
    assert (body["enrollment_id"], body["status"], body["reason"], body["by"], body["item_id"]) == \
        ("e0", "stopped", "replied", "p0@prospect.example", "item-0")
    assert notifier.pending() == [] and notifier.failed() == []
    assert notifier.stats()["delivered"] == 5 and notifier.stats()["attempts_failed"] == 10
    assert redis_client.zcard(OUTBOX_KEY) == 0 and redis_client.xlen(STREAM_KEY) == 5


def test_concurrent_drainers_deliver_each_transition_once(redis_client, redis_server, receiver_factory):
    receiver = receiver_factory()
    transitions = stop_some(redis_client, 60)
    import redis as redis_lib

    drainers = [Notifier(redis_lib.Redis.from_url(redis_server.url), webhook_url=receiver.url, webhook_secret=SECRET)
                for _ in range(4)]
    threads = [threading.Thread(target=lambda n=n: [n.drain(limit=7) for _ in range(20)]) for n in drainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert receiver.accepted == Counter({t.id: 1 for t in transitions})
    assert sum(receiver.attempts.values()) == 60


_CRASHING_DRAINER = """
import redis, sys
from workers.notify import Notifier
n = Notifier(redis.Redis.from_url(sys.argv[1]), webhook_url=sys.argv[2], webhook_secret=sys.argv[3],
             lease_seconds=2)
n.drain()
"""


def test_a_drainer_killed_mid_delivery_loses_nothing(redis_client, redis_server, receiver_factory):
    receiver = receiver_factory(hang_first=True)
    (transition,) = stop_some(redis_client, 1)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, "-c", _CRASHING_DRAINER, redis_server.url, receiver.url, SECRET], env=env)
    deadline = time.monotonic() + 30
    while not receiver.attempts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.attempts[transition.id] == 1  # the child is inside the POST
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    notifier = Notifier(redis_client, webhook_url=receiver.url, webhook_secret=SECRET)
    assert notifier.drain().delivered == 0  # still leased by the dead drainer
    assert [p["id"] for p in notifier.pending()] == [transition.id]
    drain_until(notifier, lambda: receiver.accepted[transition.id] == 1)  # the lease runs out: delivered
    assert receiver.accepted == Counter({transition.id: 1})
    assert notifier.pending() == []


def test_failures_are_visible_and_can_be_retried(redis_client, receiver_factory):
    receiver = receiver_factory(always_fail=True)
    (transition,) = stop_some(redis_client, 1)
    notifier = Notifier(redis_client, webhook_url=receiver.url, webhook_secret=SECRET, max_attempts=3,
                        backoff_base=0.05)
    first = notifier.drain()
    assert first.retrying == 1
    pending = notifier.pending()
    assert pending[0]["id"] == transition.id and pending[0]["attempts"] == 1
    assert "HTTP 503" in pending[0]["last_error"] and pending[0]["next_attempt_at"]
    drain_until(notifier, lambda: notifier.failed())
    (failed,) = notifier.failed()
    assert failed["id"] == transition.id and failed["attempts"] == 3 and "HTTP 503" in failed["last_error"]
    assert failed["transition"]["enrollment_id"] == "e0"
    assert notifier.pending() == [] and notifier.stats()["gave_up"] == 1
    receiver.always_fail = False
    (other,) = EnrollmentStore(redis_client).transition("e5", "stopped", "replied", event_key="r5"),
    assert notifier.retry_failed([other.id, "no-such-id"]) == 0  # only failed ones go back; pending stays
    assert [p["id"] for p in notifier.pending()] == [other.id]
    assert notifier.retry_failed() == 1
    assert notifier.failed() == []
    drain_until(notifier, lambda: receiver.accepted[transition.id] == 1 and receiver.accepted[other.id] == 1)
    assert notifier.pending() == []


def test_callable_is_called_once_per_transition_even_while_the_webhook_fails(redis_client, receiver_factory,
                                                                           tmp_path, monkeypatch):
    (tmp_path / "platform_hook.py").write_text("CALLS = []\ndef on_transition(t):\n    CALLS.append(t)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    receiver = receiver_factory(fail_first=3)
    transitions = stop_some(redis_client, 3)
    notifier = Notifier(redis_client, webhook_url=receiver.url, webhook_secret=SECRET,
                        callback="platform_hook:on_transition", backoff_base=0.05)
    drain_until(notifier, lambda: len(receiver.accepted) == 3)
    import platform_hook

    assert sorted(c["id"] for c in platform_hook.CALLS) == sorted(t.id for t in transitions)
    assert receiver.accepted == Counter({t.id: 1 for t in transitions})


def test_callable_only_and_a_bad_dotted_path(redis_client, tmp_path, monkeypatch):
    calls = []
    transitions = stop_some(redis_client, 2)
    flaky = iter([RuntimeError("platform down")])

    def callback(t):
        error = next(flaky, None)
        if error:
            raise error
        calls.append(t["id"])

    notifier = Notifier(redis_client, callback=callback, backoff_base=0.05)
    drain_until(notifier, lambda: len(calls) == 2 and not notifier.pending())
    assert sorted(calls) == sorted(t.id for t in transitions)
    from exchange_listener.config import ConfigError

    with pytest.raises(ConfigError, match="callback"):
        Notifier(redis_client, callback="no_such_module_xyz.func")


def test_secret_never_in_logs_or_errors(redis_client, receiver_factory):
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    try:
        receiver = receiver_factory(secret="the-wrong-secret")  # every signature is rejected: 401
        stop_some(redis_client, 1)
        url = receiver.url.replace("http://", f"http://user:{SECRET}@")  # even credentials in the URL
        notifier = Notifier(redis_client, webhook_url=url, webhook_secret=SECRET, max_attempts=2, backoff_base=0.05)
        drain_until(notifier, lambda: notifier.failed())
        refused = Notifier(redis_client, webhook_url=f"http://ops:{SECRET}@127.0.0.1:1/x", webhook_secret=SECRET, max_attempts=1)
        redis_client.delete("el:outbox:failed")
        stop_some(redis_client, 2)
        refused.drain()
        text = out.getvalue()
        assert "giving up" in text and "HTTP 401" in text and "ConnectionError" in text  # failures are visible
        everything = text + json.dumps(notifier.failed()) + json.dumps(notifier.pending()) + repr(notifier)
        assert SECRET not in everything
    finally:
        logs.configure("info", "json")


def test_verify_for_receivers():
    body, ts = b'{"id":"x"}', str(int(time.time()))
    from workers.notify import sign

    good = sign(SECRET, ts, body)
    assert verify(SECRET, ts, body, good)
    assert not verify(SECRET, ts, body + b" ", good)
    assert not verify("other", ts, body, good)
    old = str(int(time.time()) - 3600)
    assert not verify(SECRET, old, body, sign(SECRET, old, body))


def test_a_down_webhook_costs_one_attempt_per_drain_and_does_not_hold_up_the_callable(redis_client, receiver_factory):
    receiver = receiver_factory(always_fail=True)
    transitions = stop_some(redis_client, 10)
    calls = []
    notifier = Notifier(redis_client, webhook_url=receiver.url, webhook_secret=SECRET, callback=calls.append)
    result = notifier.drain()
    assert result.retrying == 10 and result.delivered == 0
    assert sum(receiver.attempts.values()) == 1  # a job's drain waits for at most one failing POST
    assert sorted(c["id"] for c in calls) == sorted(t.id for t in transitions)
    assert len(notifier.pending()) == 10


def test_timer_drains_in_the_background_and_survives_a_redis_outage(redis_client, redis_server):
    calls = []
    notifier = Notifier(redis_client, callback=calls.append)
    timer = notifier.start_timer(interval=0.1)
    try:
        (first,) = stop_some(redis_client, 1)
        deadline = time.monotonic() + 30
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [c["id"] for c in calls] == [first.id]
        redis_server.stop()
        time.sleep(0.5)  # a few drains fail while Redis is away
        redis_server.start()
        store = EnrollmentStore(redis_client)
        second = store.transition("e9", "stopped", "bounced", event_key="bounce:9")
        while len(calls) < 2 and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        assert [c["id"] for c in calls] == [first.id, second.id]
        assert timer.is_alive()
    finally:
        timer.stop()
    assert not timer.is_alive()


def test_a_token_in_the_webhook_path_or_query_never_reaches_logs_or_redis(redis_client):
    """requests names only the path and query of a failed URL; tokens often live there."""
    port = free_port()  # nothing listens: every POST fails with a connection error
    url = f"http://127.0.0.1:{port}/hooks/T0KEN-IN-PATH?token=S3CRET-IN-QUERY"
    notifier = Notifier(redis_client, webhook_url=url, webhook_secret=SECRET, backoff_base=0.05)
    EnrollmentStore(redis_client).transition("e-tok", "stopped", "replied", event_key="k1")
    notifier.drain()
    stored = json.dumps(notifier.pending()) + str(notifier.failed())
    stored += str({k: redis_client.hgetall(k) for k in redis_client.keys("el:outbox:state:*")})
    assert "S3CRET-IN-QUERY" not in stored and "T0KEN-IN-PATH" not in stored
    assert "ConnectionError" in stored  # the error itself is still told
