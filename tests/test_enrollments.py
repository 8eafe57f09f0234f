"""Enrollment state: each transition exactly once, stop is terminal, pauses behave, audit trail,
outbox written in the same step; and the ``enrollments`` CLI contract."""
from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import redis

from workers.sinks.webhooks import Notifier
from workers.state.enrollments import (
    OUTBOX_KEY,
    STREAM_KEY,
    EnrollmentStore,
    transition_key,
)

FUTURE = dt.datetime.now(dt.UTC) + dt.timedelta(days=10)


@pytest.fixture
def store(redis_client):
    return EnrollmentStore(redis_client)


def test_unknown_enrollment_is_none_and_ensure_creates_active(store):
    assert store.get("e1") is None
    store.ensure("e1", sequence_id="seq", mailbox="rep@us.example")
    state = store.get("e1")
    assert state["status"] == "active"
    assert state["sequence_id"] == "seq" and state["mailbox"] == "rep@us.example"
    dt.datetime.fromisoformat(state["updated_at"])


def test_stop_records_who_what_when_and_replay_changes_nothing(store, redis_client):
    store.ensure("e1", "seq", "rep@us.example")
    first = store.transition("e1", "stopped", "replied", event_key="stop:item-1", by="pat@prospect.example",
                             item_id="item-1", message_id="<r1@prospect.example>")
    assert first.status == "stopped" and first.previous_status == "active" and first.reason == "replied"
    assert store.transition("e1", "stopped", "replied", event_key="stop:item-1", by="pat@prospect.example") is None
    state = store.get("e1")
    assert state["status"] == "stopped" and state["reason"] == "replied"
    assert state["stopped_by"] == "pat@prospect.example"
    assert state["item_id"] == "item-1" and state["message_id"] == "<r1@prospect.example>"
    assert state["sequence_id"] == "seq" and state["mailbox"] == "rep@us.example"
    assert [h["event_key"] for h in store.history("e1")] == ["stop:item-1"]
    # the outbox and the stream got exactly this one transition, in the same step
    assert [m.decode() for m in redis_client.zrange(OUTBOX_KEY, 0, -1)] == [first.id]
    assert json.loads(redis_client.get(transition_key(first.id)))["status"] == "stopped"
    assert redis_client.xlen(STREAM_KEY) == 1


def test_stopped_is_terminal(store):
    store.transition("e1", "stopped", "bounced", event_key="b1")
    assert store.transition("e1", "stopped", "replied", event_key="r1") is None
    assert store.transition("e1", "paused", "auto_reply", event_key="a1", until=FUTURE) is None
    assert store.resume("e1", by="ops") is None
    state = store.get("e1")
    assert (state["status"], state["reason"]) == ("stopped", "bounced")
    assert len(store.history("e1")) == 1


def test_stop_overrides_pause_and_pause_only_extends(store):
    paused = store.transition("e1", "paused", "auto_reply", event_key="a1", until=FUTURE.date())
    assert paused.paused_until == FUTURE.date().isoformat() + "T00:00:00Z"
    assert store.transition("e1", "paused", "auto_reply", event_key="a2", until=FUTURE - dt.timedelta(days=3)) is None
    longer = store.transition("e1", "paused", "auto_reply", event_key="a3", until=FUTURE + dt.timedelta(days=3))
    assert longer is not None and longer.previous_status == "paused"
    stopped = store.transition("e1", "stopped", "replied", event_key="r1", by="pat@prospect.example")
    assert stopped.previous_status == "paused"
    state = store.get("e1")
    assert state["status"] == "stopped" and state["paused_until"] is None
    assert [h["status"] for h in store.history("e1")] == ["paused", "paused", "stopped"]


def test_pause_defaults_to_pause_days(redis_client):
    store = EnrollmentStore(redis_client, pause_days=3)
    paused = store.transition("e1", "paused", "auto_reply", event_key="a1")
    until = dt.datetime.fromisoformat(paused.paused_until)
    assert abs((until - dt.datetime.now(dt.UTC)) - dt.timedelta(days=3)) < dt.timedelta(minutes=1)


def test_expired_pause_counts_as_active(store):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    store.transition("e1", "paused", "auto_reply", event_key="a1", until=past)
    state = store.get("e1")
    assert (state["status"], state["reason"]) == ("active", "pause_expired")
    again = store.transition("e1", "paused", "auto_reply", event_key="a2", until=FUTURE)
    assert again is not None and again.previous_status == "active"


def test_operator_resume(store):
    store.transition("e1", "paused", "auto_reply", event_key="a1", until=FUTURE)
    resumed = store.resume("e1", by="ops@us.example")
    assert resumed.status == "active" and resumed.previous_status == "paused" and resumed.by == "ops@us.example"
    assert store.resume("e1", by="ops@us.example") is None  # already active
    store.transition("e1", "stopped", "replied", event_key="r1")
    assert store.resume("e1", by="ops") is None
    reopened = store.resume("e1", by="ops", force=True)
    assert reopened.status == "active" and reopened.previous_status == "stopped"
    # the original stop event stays spent: a replay of it does not stop again
    assert store.transition("e1", "stopped", "replied", event_key="r1") is None


def test_bad_status_and_missing_event_key_are_refused(store):
    with pytest.raises(ValueError, match="status"):
        store.transition("e1", "done", "x", event_key="k")
    with pytest.raises(ValueError, match="event_key"):
        store.transition("e1", "stopped", "x", event_key="")
    with pytest.raises(ValueError, match="ISO 8601"):
        store.transition("e1", "paused", "x", event_key="k", until="next tuesday")
    assert store.get("e1") is None


def test_keys_expire_with_retention(redis_client):
    store = EnrollmentStore(redis_client, retention_days=30)
    store.transition("e1", "stopped", "replied", event_key="r1")
    for key in ("el:enrollment:e1", "el:enrollment:e1:events", "el:enrollment:e1:history"):
        assert 29 * 86400 < redis_client.ttl(key) <= 30 * 86400, key


def _hammer(url, barrier, results, worker):
    """Each process tries every enrollment: a shared event key and one of its own."""
    store = EnrollmentStore(redis.Redis.from_url(url))
    barrier.wait()
    applied = []
    for n in range(20):
        for key in ("same-reply", f"own-{worker}"):
            if store.transition(f"e{n}", "stopped", "replied", event_key=key, by=f"w{worker}") is not None:
                applied.append(f"e{n}")
        if store.transition(f"e{n}", "paused", "auto_reply", event_key=f"ooo-{worker}", until=FUTURE) is not None:
            applied.append(f"p{n}")
    results.put(applied)


def test_exactly_once_under_concurrent_processes(redis_server, redis_client):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(redis_server.url, barrier, results, w)) for w in range(8)]
    for p in procs:
        p.start()
    applied = [item for _ in procs for item in results.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store = EnrollmentStore(redis_client)
    for n in range(20):
        assert applied.count(f"e{n}") == 1  # one stop, whoever won
        history = store.history(f"e{n}")
        stops = [h for h in history if h["status"] == "stopped"]
        assert len(stops) == 1 and history[-1]["status"] == "stopped"  # nothing after the stop
        assert applied.count(f"p{n}") == len(history) - 1 <= 1  # at most one pause, and only before
        assert store.get(f"e{n}")["status"] == "stopped"
    assert redis_client.zcard(OUTBOX_KEY) == redis_client.xlen(STREAM_KEY) == len(applied)


# -- CLI contract ----------------------------------------------------------------------------
def cli(redis_server, *args):
    env = {**os.environ, "EXCHANGE_LISTENER_REDIS_URL": redis_server.url}
    env.pop("EXCHANGE_LISTENER_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "exchange_listener.cli", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=60)


def test_cli_show_unknown_enrollment_exits_1(redis_server, redis_client):
    done = cli(redis_server, "enrollments", "show", "nobody")
    assert done.returncode == 1
    assert "unknown enrollment 'nobody'" in done.stderr and done.stdout == ""


def test_cli_show_history_and_resume(redis_server, redis_client):
    recorded = cli(redis_server, "sends", "record", "--message-id", "<s1@us.example>", "--enrollment", "e-42",
                   "--sequence", "seq-1", "--mailbox", "rep@us.example", "--to", "pat@prospect.example")
    assert recorded.returncode == 0, recorded.stderr
    shown = json.loads(cli(redis_server, "enrollments", "show", "e-42").stdout)
    assert shown["status"] == "active" and shown["reason"] and shown["updated_at"]
    store = EnrollmentStore(redis_client)
    store.transition("e-42", "paused", "auto_reply", event_key="ooo:1", until=FUTURE)
    shown = json.loads(cli(redis_server, "enrollments", "show", "e-42", "--history").stdout)
    assert (shown["status"], shown["reason"]) == ("paused", "auto_reply")
    assert [h["status"] for h in shown["history"]] == ["paused"]
    resumed = cli(redis_server, "enrollments", "resume", "e-42", "--by", "ops@us.example")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "active"
    store.transition("e-42", "stopped", "replied", event_key="reply:1")
    shown = json.loads(cli(redis_server, "enrollments", "show", "e-42").stdout)
    assert (shown["status"], shown["reason"]) == ("stopped", "replied")
    dt.datetime.fromisoformat(shown["updated_at"])
    refused = cli(redis_server, "enrollments", "resume", "e-42")
    assert refused.returncode == 1 and "--force" in refused.stderr


def test_cli_outbox_lists_pending_and_failed_notifications(redis_server, redis_client):
    store = EnrollmentStore(redis_client)
    transition = store.transition("e1", "stopped", "replied", event_key="reply:1")
    shown = cli(redis_server, "enrollments", "outbox")
    assert shown.returncode == 0, shown.stderr
    outbox = json.loads(shown.stdout)
    assert [p["id"] for p in outbox["pending"]] == [transition.id] and outbox["failed"] == []

    # a webhook nobody answers, one attempt allowed: the transition gives up and is listed as failed
    refused = Notifier(redis_client, webhook_url="http://127.0.0.1:9/hook", webhook_secret="s3cret",
                       webhook_timeout=2, max_attempts=1).drain()
    assert refused.failed == 1
    outbox = json.loads(cli(redis_server, "enrollments", "outbox").stdout)
    assert outbox["pending"] == [] and [f["id"] for f in outbox["failed"]] == [transition.id]
    assert outbox["failed"][0]["attempts"] == 1 and outbox["failed"][0]["last_error"]

    retried = json.loads(cli(redis_server, "enrollments", "outbox", "--retry-failed").stdout)
    assert retried["retried"] == 1 and [p["id"] for p in retried["pending"]] == [transition.id]
    assert retried["failed"] == []
