"""The Graph source end to end: the Graph emulator, a real redis-server, a real `exchange-listener
listen` with source = graph (its notification receiver on a free port, which the emulator POSTs
to), and a real `exchange-listener work`. Every fault the emulator offers is met here, and the
reply is still acted on exactly once: notifications dropped, doubled, delayed; subscriptions
removed (with and without a word), needing reauthorization, short-lived; throttling, 503,
expired delta tokens; a listener killed and restarted; delta-only polling.
"""
from __future__ import annotations

import functools
import json
import time

import mail_samples as mail
import pytest

from emulators.services import CliProcess, free_port, wait_for
from exchange_listener.core import keys
from exchange_listener.listener import mailboxes
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"
SLOW = 60.0

wait_for = functools.partial(wait_for, timeout=SLOW, interval=0.1)


class System:
    def __init__(self, redis_server, redis_client, graph, tmp_path):
        self.redis, self.graph, self.tmp_path = redis_client, graph, tmp_path
        self.redis_url = redis_server.url
        self.sends, self.enrollments = SendRegistry(redis_client), EnrollmentStore(redis_client)
        self.procs: list[CliProcess] = []
        self.port = free_port()

    def env(self, **settings) -> dict:
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
        env.update(self.graph.settings_env())
        base = {"redis_url": self.redis_url, "log_format": "json", "lease_seconds": 3, "listener_id": "g1",
                "notification_url": f"http://127.0.0.1:{self.port}/graph/notify",
                "notification_listen": f"127.0.0.1:{self.port}", "checkpoint_seconds": 2,
                # the sweep (every mailbox read by delta) off: each test proves its own path
                "graph_poll_seconds": 3600}
        base.update(settings)
        env.update({f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in base.items()})
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, *args, name: str, **settings) -> CliProcess:
        proc = CliProcess(args, self.env(**settings), self.tmp_path / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def send(self, enrollment: str) -> str:
        message_id = mail.new_id("ours.example")
        self.sends.record([message_id], enrollment, "seq-graph", MAILBOX, to=[PROSPECT])
        return message_id

    def reply_to(self, message_id: str, folder: str = "inbox") -> dict:
        raw = mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=message_id, references=message_id)
        return self.graph.deliver(MAILBOX, raw, folder=folder)

    def status(self, enrollment: str) -> str | None:
        got = self.enrollments.get(enrollment)
        return got["status"] if got else None

    def subscription(self) -> str | None:
        raw = self.redis.hget(keys.graph_subscription(MAILBOX), "id")
        return raw.decode() if raw else None

    def caught_up(self) -> bool:
        return self.redis.hget(keys.graph_delta(MAILBOX), "@caught_up") is not None


@pytest.fixture
def system(redis_server, redis_client, graph, tmp_path):
    s = System(redis_server, redis_client, graph, tmp_path)
    mailboxes.add(redis_client, [MAILBOX], source="graph")
    yield s
    for proc in s.procs:
        proc.stop()


def running(s: System, **settings) -> tuple[CliProcess, CliProcess]:
    listener = s.start("listen", name="listener", **settings)
    worker = s.start("work", name="worker", **settings)
    if s.env(**settings).get("EXCHANGE_LISTENER_NOTIFICATION_URL"):
        wait_for(lambda: s.subscription() is not None, message="the mailbox subscribed")
    wait_for(s.caught_up, message="the first delta catch-up")
    return listener, worker


def transitions(s: System, enrollment: str) -> int:
    return len(s.enrollments.history(enrollment))


def test_a_reply_is_noticed_by_notification_and_stops_the_sequence_once(system):
    s = system
    listener, worker = running(s)
    sent = s.send("e1")
    own = s.send("e-own")
    started = time.monotonic()
    s.reply_to(sent)
    wait_for(lambda: s.status("e1") == "stopped", message="the enrollment stopped")
    assert time.monotonic() - started < 10  # by notification, not by the sweep (it is off here)
    # our own follow-up in Sent Items (it refers to the thread) never stops anything, also when it
    # went out from an alias (the sender check in the worker does not know it): the folder decides
    s.graph.deliver(MAILBOX, mail.reply(sender="rep.alias@ours.example", to=PROSPECT, in_reply_to=own,
                                        references=own), folder="sentitems")
    wait_for(lambda: sum(line.get("items", 0) for line in worker.lines() if line.get("event") == "job done") >= 2,
             message="the reply and our own mail processed")
    assert s.status("e-own") == "active"
    assert transitions(s, "e1") == 1
    # status shows the Graph listener, its subscription and the notifications its receiver queued
    wait_for(lambda: json.loads(s.redis.hget(keys.listener("g1"), "graph"))["notifications"] >= 2,
             message="the heartbeat counting both notifications")
    info = json.loads(s.redis.hget(keys.listener("g1"), "graph"))
    assert info["mode"] == "notifications" and info["subscriptions"] == 1
    assert listener.alive() and worker.alive()
    # every key the Graph source left is declared, with its declared type
    for name in s.redis.scan_iter("el:*"):
        key = keys.declared(name.decode())
        assert key is not None, name
        assert s.redis.type(name).decode() == key.type, name


def test_dropped_notifications_are_recovered_by_delta_after_missed(system):
    s = system
    running(s)
    sent = s.send("e-drop")
    s.graph.fault(kind="drop_notifications", count=5)
    s.reply_to(sent)
    wait_for(lambda: s.status("e-drop") == "stopped", message="the reply found by delta after `missed`")
    assert s.graph.stats()["lifecycle"].get("missed", 0) >= 1


def test_duplicate_and_delayed_notifications_act_once(system):
    s = system
    running(s)
    first, second = s.send("e-dup"), s.send("e-late")
    s.graph.fault(kind="duplicate_notifications", count=3)
    s.reply_to(first)
    wait_for(lambda: s.status("e-dup") == "stopped", message="the duplicated reply acted on")
    s.graph.fault(kind="delay_notifications", seconds=2)
    s.reply_to(second)
    wait_for(lambda: s.status("e-late") == "stopped", message="the delayed reply acted on")
    time.sleep(2)
    assert transitions(s, "e-dup") == 1 and transitions(s, "e-late") == 1


def test_removed_subscription_is_made_anew_and_the_gap_caught_up(system):
    s = system
    running(s)
    old = s.subscription()
    s.graph.fault(kind="remove_subscriptions")
    sent = s.send("e-removed")
    s.reply_to(sent)  # no subscription now: found by the catch-up after the new one is made
    wait_for(lambda: s.subscription() not in (None, old), message="a new subscription")
    wait_for(lambda: s.status("e-removed") == "stopped", message="the gap's reply acted on")
    after = s.send("e-after")
    s.reply_to(after)
    wait_for(lambda: s.status("e-after") == "stopped", message="notified on the new subscription")


def test_reauthorization_required_is_answered_and_held_notifications_arrive(system):
    s = system
    running(s)
    sub = s.subscription()
    s.graph.fault(kind="reauthorization_required")
    sent = s.send("e-reauth")
    s.reply_to(sent)
    wait_for(lambda: s.status("e-reauth") == "stopped", message="the reply after reauthorization")
    assert s.subscription() == sub  # reauthorized, not replaced
    assert s.graph.stats()["lifecycle"].get("reauthorizationRequired", 0) >= 1


def test_short_lived_subscription_is_renewed_before_it_expires(system):
    s = system
    running(s, graph_subscription_minutes=0.15)  # 9 s: renewed when 3 s are left
    sub = s.subscription()
    time.sleep(12)
    assert s.subscription() == sub  # renewed, never lost
    sent = s.send("e-renewed")
    s.reply_to(sent)
    wait_for(lambda: s.status("e-renewed") == "stopped", timeout=10, message="notified after renewals")


def test_throttling_and_503_are_waited_out(system):
    s = system
    running(s)
    sent = s.send("e-throttled")
    s.graph.fault(kind="throttle", count=4, retry_after=1)
    s.graph.fault(kind="http_503", count=3)
    s.reply_to(sent)
    wait_for(lambda: s.status("e-throttled") == "stopped", message="the reply despite throttling")
    assert transitions(s, "e-throttled") == 1


def test_expired_delta_tokens_resync_without_acting_twice(system):
    s = system
    running(s, graph_poll_seconds=2)
    done = s.send("e-before")
    s.reply_to(done)
    wait_for(lambda: s.status("e-before") == "stopped", message="the first reply")
    s.graph.fault(kind="expire_delta_tokens")
    s.graph.fault(kind="drop_notifications", count=1)
    sent = s.send("e-resync")
    s.reply_to(sent)
    wait_for(lambda: s.status("e-resync") == "stopped", message="the reply found by a full resync")
    time.sleep(3)  # further sweeps re-read everything: nothing acts twice
    assert transitions(s, "e-before") == 1 and transitions(s, "e-resync") == 1


def test_emulator_restart_loses_subscriptions_silently_and_the_listener_notices(system):
    s = system
    running(s, graph_poll_seconds=2)
    old = s.subscription()
    s.graph.fault(kind="restart")
    sent = s.send("e-restart")
    time.sleep(1.5)
    s.reply_to(sent)
    wait_for(lambda: s.status("e-restart") == "stopped", message="the reply after the silent loss")
    wait_for(lambda: s.subscription() not in (None, old), message="the subscription made anew")


def test_mail_moved_by_a_rule_before_the_worker_runs_is_still_read(system):
    s = system
    listener = s.start("listen", name="listener")
    wait_for(lambda: s.subscription() is not None, message="subscribed")
    wait_for(s.caught_up, message="caught up")
    sent = s.send("e-moved")
    item = s.reply_to(sent)
    s.graph.move(item["item_id"], "Inbox/Replies")  # before any worker runs: its job carries the old place
    s.start("work", name="worker")
    wait_for(lambda: s.status("e-moved") == "stopped", message="the moved reply acted on")
    assert listener.alive()


def test_listener_killed_and_restarted_loses_nothing(system):
    s = system
    listener, _worker = running(s)
    sub = s.subscription()
    listener.kill9()
    sent = s.send("e-down")
    s.reply_to(sent)  # the receiver is gone: Graph retries, and delta finds it anyway
    s.start("listen", name="listener2")
    wait_for(lambda: s.status("e-down") == "stopped", message="the reply that came while no listener ran")
    assert s.subscription() == sub  # the subscription outlived the process
    assert transitions(s, "e-down") == 1


def test_polling_mode_without_a_public_url(system):
    s = system
    running(s, notification_url="", graph_poll_seconds=1)
    assert s.graph.stats()["subscriptions_total"] == 0
    sent = s.send("e-poll")
    s.reply_to(sent, folder="Projects")
    wait_for(lambda: s.status("e-poll") == "stopped", message="the reply found by polling")


def test_a_subscription_that_cannot_be_made_does_not_stop_delta(system):
    """Notifications are a hint: with the public URL down (Graph's validation request finds
    nobody), the mailbox is still read by delta, the failure is retried with backoff, not every
    tick, and status names the mailbox."""
    s = system
    sent = s.send("e-no-hook")
    s.reply_to(sent)
    dead = free_port()
    listener = s.start("listen", name="listener", notification_url=f"http://127.0.0.1:{dead}/graph/notify")
    s.start("work", name="worker")
    wait_for(lambda: s.status("e-no-hook") == "stopped", message="the reply found by delta without a subscription")
    assert s.subscription() is None
    wait_for(lambda: json.loads(s.redis.hget(keys.listener("g1"), "graph") or "{}").get("failing_count") == 1,
             message="status naming the mailbox")
    time.sleep(6)
    failures = [line for line in listener.lines() if line.get("event") == "catch-up failed; will retry"]
    assert 2 <= len(failures) <= 6, len(failures)  # backoff 1, 2, 4, ... s: not one a second


def test_a_removed_mailbox_loses_its_subscription(system):
    s = system
    running(s)
    assert s.subscription() is not None
    mailboxes.remove(s.redis, [MAILBOX])
    wait_for(lambda: s.subscription() is None and not s.redis.hlen(keys.GRAPH_SUBSCRIPTIONS),
             message="the subscription deleted with the mailbox")
    wait_for(lambda: s.graph.stats()["subscriptions_total"] == 0, message="Graph has no subscription left")


def test_wrong_credentials_stop_the_listener_at_start_with_a_clear_line(system):
    s = system
    wrong = "wrong-secret-4f2a"
    listener = s.start("listen", name="listener", client_secret=wrong)
    wait_for(lambda: not listener.alive(), message="the listener exiting")
    assert listener.proc.returncode == 2
    refused = [line for line in listener.lines() if line.get("level") == "error"]
    assert refused and "refused the app's credentials" in refused[0]["event"]
    assert wrong not in listener.log_path.read_text()
    assert s.subscription() is None


def test_the_subscription_of_a_mailbox_removed_while_its_holder_was_dead_is_deleted(system):
    """The holder was killed, the mailbox removed meanwhile: no listener drops it, so the next one
    finds the stored subscription of an unwatched mailbox and deletes it (not one made a moment ago)."""
    s = system
    listener, _worker = running(s, graph_poll_seconds=2)
    listener.kill9()
    mailboxes.remove(s.redis, [MAILBOX])
    assert s.subscription() is not None and s.graph.stats()["subscriptions_total"] == 1
    s.start("listen", name="listener2", graph_poll_seconds=2)
    time.sleep(5)
    assert s.subscription() is not None  # made a moment ago: it may be a mailbox just added
    s.redis.hset(keys.graph_subscription(MAILBOX), "created_at", repr(time.time() - 3600))
    wait_for(lambda: s.subscription() is None and not s.redis.hlen(keys.GRAPH_SUBSCRIPTIONS),
             message="the orphaned subscription forgotten")
    assert s.graph.stats()["subscriptions_total"] == 0


def test_a_subscription_to_our_url_that_was_never_stored_is_deleted(system):
    """A create retried after a timeout can leave Graph a second subscription we never stored
    (its notifications are refused, but it counts toward Graph's limit): the periodic check
    deletes it once two checks in a row have listed it."""
    from exchange_listener.core import config
    from exchange_listener.sources.graph.client import GraphClient

    s = system
    running(s, graph_poll_seconds=2)
    ours = s.subscription()
    settings = config.load(env={k: v for k, v in s.env(graph_poll_seconds=2).items()
                                if k.startswith("EXCHANGE_LISTENER_")})
    client = GraphClient(settings)
    try:
        ghost = client.request("POST", "subscriptions", json={
            "changeType": "created", "notificationUrl": settings.notification_url,
            "resource": f"users/{MAILBOX}/messages", "clientState": "not-stored",
            "expirationDateTime": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600)))}).json()["id"]
    finally:
        client.close()
    assert s.graph.stats()["subscriptions_total"] == 2
    wait_for(lambda: s.graph.stats()["subscriptions_total"] == 1, message="the ghost deleted")
    assert s.subscription() == ours != ghost  # ours is kept
