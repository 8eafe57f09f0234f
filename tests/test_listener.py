"""The listener as users run it: real `exchange-listener listen` processes, a real redis-server,
the EWS emulator over HTTP. A mail counts as enqueued when its job is on the RQ queue."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from emulators.services import (
    RedisServer,
    wait_for,
)
from exchange_listener import queueing
from exchange_listener.core import keys
from exchange_listener.listener import leases, mailboxes

SERVICE_ACCOUNT = ("svc", "svc-password")  # the account the conftest emulator fixture grants

QUEUE = "exchange-listener"
SLOW = 45.0  # generous bound for anything that should take a few seconds
wait_for = functools.partial(wait_for, timeout=SLOW)


def mail(subject: str) -> bytes:
    return (f"From: Prospect <p@customer.example>\r\nTo: rep@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@customer.example>\r\n\r\nThanks!\r\n").encode()


def queued(conn) -> set[tuple[str, str]]:
    """(mailbox, item id) of every mail carried by a job on the queue."""
    found = set()
    for job in queueing.make_queue(conn, QUEUE).jobs:
        payload = job.args[0]
        found.update((m["mailbox"], m["item_id"]) for m in payload["mails"])
    return found


def streaming(conn, listener_id: str, count: int) -> bool:
    """The listener reports ``count`` mailboxes in connected groups."""
    raw = conn.hget(leases.LISTENER_PREFIX + listener_id, "groups")
    if not raw:
        return False
    groups = json.loads(raw)
    return sum(g["subscribed"] for g in groups if g["connected"]) == count


def held_by(conn, listener_id: str, addresses) -> bool:
    return all(conn.get(leases.lease_key(a)) == listener_id.encode() for a in addresses)


def test_delivered_mail_is_enqueued_while_the_stream_is_open(redis_client, emulator, listeners):
    mailboxes.add(redis_client, ["alice@example.com", "bob@example.com"])
    listeners(emulator)
    wait_for(lambda: streaming(redis_client, "l1", 2), message="both mailboxes streaming")
    # and their first catch-up done: one still running when the mail lands may enqueue it first
    wait_for(lambda: redis_client.hget(keys.listener("l1"), "catchups_pending") == b"0",
             message="first catch-ups done")

    sent = emulator.deliver("alice@example.com", mail("sent by the rep"), folder="sentitems")
    draft = emulator.deliver("alice@example.com", mail("draft"), folder="drafts")
    inbox = emulator.deliver("alice@example.com", mail("re: proposal"))
    junk = emulator.deliver("bob@example.com", mail("re: hello"), folder="junkemail")
    ruled = emulator.deliver("bob@example.com", mail("re: filed by a rule"), folder="Customers")
    expected = {("alice@example.com", inbox["item_id"]), ("bob@example.com", junk["item_id"]),
                ("bob@example.com", ruled["item_id"])}
    wait_for(lambda: expected <= queued(redis_client), message="inbox, junk and rule-filed mail enqueued")

    job = queueing.make_queue(redis_client, QUEUE).fetch_job(queueing.job_id("alice@example.com", [inbox["item_id"]]))
    assert job is not None and job.args[0]["mails"][0]["via"] == "stream"
    # a later mail in alice's inbox, enqueued: every event of hers before it (the sent item's,
    # the draft's) has been through the listener by now
    marker = emulator.deliver("alice@example.com", mail("marker"))
    wait_for(lambda: ("alice@example.com", marker["item_id"]) in queued(redis_client), message="the marker enqueued")
    ids = {item for _mb, item in queued(redis_client)}
    assert sent["item_id"] not in ids and draft["item_id"] not in ids
    # the folder the rule filed mail into (made after the listener read the tree) is now known,
    # so every later catch-up covers it
    from exchange_listener.sources.ews.catch_up import SyncStore

    ruled_job = next(m for job in queueing.make_queue(redis_client, QUEUE).jobs for m in job.args[0]["mails"]
                     if m["item_id"] == ruled["item_id"])
    assert ruled_job["folder"] in SyncStore(redis_client).watched("bob@example.com").values()


@pytest.mark.parametrize("fault", [
    {"kind": "reset_streams"},
    pytest.param({"kind": "stall_streams", "seconds": 4}, marks=pytest.mark.slow),  # a 4 s stall
    {"kind": "expire_subscriptions"},
    {"kind": "server_busy", "count": 3, "back_off_ms": 300},
    {"kind": "http_503", "count": 3},
    {"kind": "restart"},
], ids=lambda f: f["kind"])
def test_each_emulator_fault_is_survived_and_mail_delivered_during_it_is_enqueued(redis_client, emulator, listeners,
                                                                                  fault):
    mailboxes.add(redis_client, ["carol@example.com", "dave@example.com"])
    proc = listeners(emulator)
    wait_for(lambda: streaming(redis_client, "l1", 2), message="streaming before the fault")

    emulator.fault(**fault)
    if fault["kind"] in ("server_busy", "http_503"):
        emulator.fault(kind="reset_streams")  # make the listener reconnect into the failing requests
    during = [emulator.deliver("carol@example.com", mail("during 1")),
              emulator.deliver("dave@example.com", mail("during 2"))]
    expected = {("carol@example.com", during[0]["item_id"]), ("dave@example.com", during[1]["item_id"])}
    wait_for(lambda: expected <= queued(redis_client), message=f"mail delivered during {fault['kind']} enqueued")

    # and the stream works again afterwards
    wait_for(lambda: streaming(redis_client, "l1", 2), message="streaming again")
    after = emulator.deliver("carol@example.com", mail("after"))
    wait_for(lambda: ("carol@example.com", after["item_id"]) in queued(redis_client), message="mail after the fault")
    assert proc.proc.poll() is None
    if fault["kind"] == "server_busy":  # met by the stream's reconnect or by a catch-up racing it
        assert any(line.get("reason") == "server_busy" or "ErrorServerBusy" in str(line.get("error", ""))
                   for line in proc.lines())
    if fault["kind"] == "stall_streams":  # the heartbeat watchdog, not the server, ended the silent stream
        assert any(line.get("reason") == "connection" and "ConnectionError" in line["event"] for line in proc.lines())


@pytest.mark.slow
def test_kill_9_of_one_listener_hands_its_mailboxes_to_the_other(redis_client, emulator, listeners):
    addresses = [f"rep{i}@example.com" for i in range(4)]
    mailboxes.add(redis_client, addresses)
    first = listeners(emulator, "first")
    wait_for(lambda: streaming(redis_client, "first", 4), message="first listener streaming all")
    listeners(emulator, "second")
    # fair share: the newcomer ends up with half
    wait_for(lambda: streaming(redis_client, "second", 2) and streaming(redis_client, "first", 2),
             message="two listeners sharing the mailboxes")
    victims = [a for a in addresses if redis_client.get(leases.lease_key(a)) == b"first"]
    assert len(victims) == 2

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    gap = [emulator.deliver(a, mail(f"in the gap for {a}")) for a in victims]
    expected = {(a, d["item_id"]) for a, d in zip(victims, gap)}
    wait_for(lambda: held_by(redis_client, "second", addresses), message="survivor holds every lease")
    wait_for(lambda: expected <= queued(redis_client), message="mail delivered in the gap enqueued")
    wait_for(lambda: streaming(redis_client, "second", 4), message="survivor streams all")
    late = emulator.deliver(victims[0], mail("after takeover"))
    wait_for(lambda: (victims[0], late["item_id"]) in queued(redis_client), message="streamed after takeover")


@pytest.fixture
def durable_redis():
    with RedisServer(aof=True) as server:
        yield server


@pytest.mark.parametrize("durable", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_loses_nothing(durable, request, redis_server, emulator, listeners):
    """With AOF Redis keeps its data; without it the restart wipes everything (mailbox set,
    leases, queue) and the listener must keep streaming what it had, re-take its leases and
    enqueue the mail it saw meanwhile."""
    server = request.getfixturevalue("durable_redis") if durable else redis_server
    conn = redis.Redis.from_url(server.url)
    conn.flushall()
    mailboxes.add(conn, ["erin@example.com"])
    proc = listeners(emulator, redis_url=server.url)
    wait_for(lambda: streaming(conn, "l1", 1), message="streaming")
    before = emulator.deliver("erin@example.com", mail("before"))
    wait_for(lambda: ("erin@example.com", before["item_id"]) in queued(conn), message="enqueued before the outage")

    server.stop()
    outage = [emulator.deliver("erin@example.com", mail(f"during outage {i}")) for i in range(3)]
    # the listener sees the mail on its stream while Redis is down and holds it
    wait_for(lambda: any(line.get("event") == "Redis unreachable; holding new mail in memory until it is back"
                         for line in proc.lines()), message="the listener holding mail while Redis is down")
    server.start()
    conn = redis.Redis.from_url(server.url)
    expected = {("erin@example.com", d["item_id"]) for d in outage}
    if durable:
        expected.add(("erin@example.com", before["item_id"]))
    wait_for(lambda: expected <= queued(conn), message="mail seen during the outage enqueued")
    # and it was the held mail that went out, not only a later catch-up (the line follows the
    # enqueue: wait for it, the queue can show the jobs a moment before the log does)
    wait_for(lambda: any(line.get("event") == "Redis is back; enqueued held mail" for line in proc.lines()),
             timeout=10, message="the held mail flushed")
    wait_for(lambda: held_by(conn, "l1", ["erin@example.com"]), message="lease held again")
    after = emulator.deliver("erin@example.com", mail("after"))
    wait_for(lambda: ("erin@example.com", after["item_id"]) in queued(conn), message="mail after the outage")


def test_sigterm_unsubscribes_releases_leases_and_exits_0_within_10_seconds(redis_client, emulator, listeners):
    addresses = ["frank@example.com", "grace@example.com"]
    mailboxes.add(redis_client, addresses)
    proc = listeners(emulator)
    wait_for(lambda: streaming(redis_client, "l1", 2), message="streaming")
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    assert all(redis_client.get(leases.lease_key(a)) is None for a in addresses)
    assert b"l1" not in redis_client.zrange(leases.LISTENERS_KEY, 0, -1)
    stats = json.loads(__import__("urllib.request").request.urlopen(f"{emulator.base_url}/emulator/stats").read())
    assert stats["subscriptions"] == 0 and stats["streams"] == 0


@pytest.mark.slow
def test_mailboxes_added_and_removed_while_running_are_picked_up(redis_client, redis_server, emulator, listeners):
    mailboxes.add(redis_client, ["heidi@example.com"])
    listeners(emulator)
    wait_for(lambda: streaming(redis_client, "l1", 1), message="streaming the first mailbox")

    env = dict(os.environ, EXCHANGE_LISTENER_REDIS_URL=redis_server.url)
    out = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "mailboxes", "add", "Ivan@Example.com"],
                         env=env, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: streaming(redis_client, "l1", 2), timeout=15, message="new mailbox streamed within seconds")
    new = emulator.deliver("ivan@example.com", mail("to the new mailbox"))
    wait_for(lambda: ("ivan@example.com", new["item_id"]) in queued(redis_client), message="new mailbox's mail")

    out = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "mailboxes", "remove", "heidi@example.com"],
                         env=env, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: redis_client.get(leases.lease_key("heidi@example.com")) is None, timeout=15,
             message="removed mailbox released")
    wait_for(lambda: streaming(redis_client, "l1", 1), timeout=15, message="one mailbox left")


def test_listen_with_missing_settings_names_the_key(redis_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    env["EXCHANGE_LISTENER_REDIS_URL"] = redis_server.url
    out = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "listen"], env=env, capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 2
    assert "ews_url" in out.stderr and "Traceback" not in out.stderr
