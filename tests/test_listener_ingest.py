"""What people and servers do with mail, as the listener sees it: real `exchange-listener listen`
processes, a real redis-server, the EWS emulator over HTTP (issue 9).

Folders made while no listener ran, non-mail folders, moves, restarts that must read only the
gap, a mailbox that cannot be subscribed, a busy anchor, a connection limit, and a backlog
held during a Redis outage that must not cost the leases.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from emulators.services import (
    Emulator,
    RedisServer,
    service_env,
    wait_for,
)
from exchange_listener import queueing
from exchange_listener.core import keys
from exchange_listener.listener import leases, mailboxes
from exchange_listener.mail.message_ids import normalize
from exchange_listener.sources.ews.catch_up import SyncStore
from exchange_listener.sources.ledger import Ledger

wait_for = functools.partial(wait_for, timeout=45.0)
QUEUE = "exchange-listener"
SERVICE_ACCOUNT = ("svc", "svc-password")


def mail(subject: str, message_id: str | None = None) -> bytes:
    message_id = message_id or f"<{uuid.uuid4()}@customer.example>"
    return (f"From: p@customer.example\r\nTo: rep@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\nhi\r\n").encode()


def caught_up(conn, listener_id: str = "l1") -> bool:
    return conn.hget(leases.LISTENER_PREFIX + listener_id, "catchups_pending") == b"0"


def queued(conn) -> dict[str, dict]:
    """item id -> the mail as carried by a job on the queue."""
    return {m["item_id"]: m for job in queueing.make_queue(conn, QUEUE).jobs for m in job.args[0]["mails"]}


def groups(conn, listener_id: str = "l1") -> list[dict]:
    raw = conn.hget(leases.LISTENER_PREFIX + listener_id, "groups")
    return json.loads(raw) if raw else []


def streaming(conn, count: int, listener_id: str = "l1") -> bool:
    return sum(g["subscribed"] for g in groups(conn, listener_id) if g["connected"]) == count


def create_folder(emulator, mailbox: str, path: str, folder_class: str = "IPF.Note") -> str:
    return emulator.create_folder(mailbox, path, folder_class)["folder_id"]


def test_mail_filed_into_a_folder_made_while_no_listener_ran_is_caught_up(redis_client, emulator, listeners):
    mailboxes.add(redis_client, ["ann@example.com"])
    first = listeners(emulator)
    wait_for(lambda: streaming(redis_client, 1), message="streaming")
    assert first.terminate() == 0

    create_folder(emulator, "ann@example.com", "Customers/Acme")  # made while no listener ran
    ruled = emulator.deliver("ann@example.com", mail("re: filed by a rule"), folder="Customers/Acme/Replies")
    appointment = emulator.deliver("ann@example.com", mail("a calendar item"), folder="calendar")
    listeners(emulator)
    wait_for(lambda: ruled["item_id"] in queued(redis_client), message="rule-filed mail caught up after the restart")
    wait_for(lambda: caught_up(redis_client), message="catch-up done")
    assert queued(redis_client)[ruled["item_id"]]["via"] == "catchup"
    assert appointment["item_id"] not in queued(redis_client)


def test_non_mail_folders_never_make_a_job_and_new_folders_are_learned_while_streaming(redis_client, emulator,
                                                                                       listeners):
    mailboxes.add(redis_client, ["ben@example.com"])
    listeners(emulator)
    wait_for(lambda: streaming(redis_client, 1), message="streaming")
    create_folder(emulator, "ben@example.com", "Trips", "IPF.Appointment")  # a second calendar
    never = [emulator.deliver("ben@example.com", mail(f"not mail: {f}"), folder=f)["item_id"]
             for f in ("calendar", "contacts", "tasks", "Trips", "sentitems", "drafts")]
    nested = emulator.deliver("ben@example.com", mail("re: deep"), folder="Projects/2027/Replies")
    last = emulator.deliver("ben@example.com", mail("re: inbox, delivered last"))
    wait_for(lambda: {nested["item_id"], last["item_id"]} <= set(queued(redis_client)),
             message="nested new folder and inbox mail enqueued")
    wait_for(lambda: caught_up(redis_client), message="the new folders' catch-ups done")
    # the listener has now seen every event above (they were streamed before the last one) and
    # caught up the tree: none of the non-mail or sent/draft items became a job
    assert not set(never) & set(queued(redis_client))


def test_moves_deletes_and_hard_deletes_are_recorded_for_workers(redis_client, emulator, listeners):
    mailboxes.add(redis_client, ["cat@example.com"])
    proc = listeners(emulator, checkpoint_seconds=1, log_level="debug")
    wait_for(lambda: streaming(redis_client, 1), message="streaming")
    ledger = Ledger(redis_client)
    ids = [f"<move-{i}-{uuid.uuid4()}@customer.example>" for i in range(3)]
    items = [emulator.deliver("cat@example.com", mail(f"re: {i}", ids[i]))["item_id"] for i in range(3)]
    wait_for(lambda: set(items) <= set(queued(redis_client)), message="enqueued")
    for item_id, message_id in zip(items, ids):  # a worker processed them
        ledger.mark_processed("cat@example.com", normalize(message_id), item_id)
    checkpoints_before = len([line for line in proc.lines() if line.get("event") == "caught up"])
    moved = emulator.move(items[0], "Archive/2026")["item_id"]
    moved_twice = emulator.move(moved, "deleteditems")["item_id"]
    trashed = emulator.move(items[1], "deleteditems")["item_id"]
    emulator.delete(items[2])  # hard delete: to Recoverable Items, under a new id
    wait_for(lambda: ledger.where_now("cat@example.com", items[0]) == moved_twice, message="chain of moves followed")
    wait_for(lambda: ledger.where_now("cat@example.com", items[1]) == trashed, message="move to Deleted Items")
    wait_for(lambda: ledger.where_now("cat@example.com", items[2]) is not None, message="hard delete recorded")
    # the folders mail was moved into are read (a moved mail no job covers would be found there),
    # but processed mail is no new mail: the moved copies are not enqueued
    wait_for(lambda: len([line for line in proc.lines() if line.get("event") == "caught up"]) > checkpoints_before
             and caught_up(redis_client), message="the folders moved into were read")
    assert not {moved, moved_twice, trashed} & set(queued(redis_client))


@pytest.mark.slow
def test_a_restart_catches_up_only_the_gap(redis_client, emulator, listeners):
    """Mail that was processed is never enqueued again after a restart, however long ago (the
    queue's own memory of finished jobs is gone here), and the sync state was checkpointed while
    streaming."""
    mailboxes.add(redis_client, ["dan@example.com"])
    first = listeners(emulator, checkpoint_seconds=1, log_level="debug")
    wait_for(lambda: streaming(redis_client, 1), message="streaming")
    store, ledger = SyncStore(redis_client), Ledger(redis_client)
    wait_for(lambda: store.get("dan@example.com", "inbox"), message="first catch-up stored a state")
    state_at_start = store.get("dan@example.com", "inbox")
    ids = [f"<before-{i}-{uuid.uuid4()}@customer.example>" for i in range(12)]
    before = [emulator.deliver("dan@example.com", mail(f"before {i}", ids[i]))["item_id"] for i in range(12)]
    wait_for(lambda: set(before) <= set(queued(redis_client)), message="streamed mail enqueued")
    wait_for(lambda: store.get("dan@example.com", "inbox") != state_at_start, message="checkpointed while streaming")
    for item_id, message_id in zip(before, ids):  # what a worker does once it processed them
        ledger.mark_processed("dan@example.com", normalize(message_id), item_id)
    assert first.terminate() == 0
    queueing.make_queue(redis_client, QUEUE).empty()
    for key in redis_client.scan_iter("rq:job:*"):  # as if result_ttl had long run out
        redis_client.delete(key)
    store.drop("dan@example.com", "inbox")  # and the inbox read from scratch: only the ledger can tell

    gap = [emulator.deliver("dan@example.com", mail(f"gap {i}"))["item_id"] for i in range(3)]
    second = listeners(emulator, checkpoint_seconds=1, log_level="debug")
    wait_for(lambda: set(gap) <= set(queued(redis_client)), message="gap mail enqueued")
    wait_for(lambda: streaming(redis_client, 1), message="streaming again")
    wait_for(lambda: any(line.get("event") == "caught up" for line in second.lines()), message="catch-up finished")
    assert set(queued(redis_client)) == set(gap)
    enqueued = [line for line in second.lines() if line.get("event") == "enqueued"]
    assert sum(line["items"] for line in enqueued) == 3


def status(redis_server, emulator, **settings) -> dict:
    """`exchange-listener status --json` as an operator runs it."""
    env = service_env(redis_server.url, emulator.ews_url, allow_volatile_redis=True, **settings)
    done = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_one_mailbox_that_cannot_be_subscribed_never_disturbs_its_group(redis_client, redis_server, listeners):
    # the server closes streams every 2 s here (a "minute" of ConnectionTimeout is 2 s): the bad
    # mailbox is retried at those reconnects, never by cutting the group's stream
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--connection-timeout-minute-seconds", "2"]) as emulator:
        addresses = ["eve@example.com", "fay@example.com", "gus@example.com"]
        emulator.fault(kind="mailbox_error", mailbox="fay@example.com", code="ErrorImpersonateUserDenied")
        mailboxes.add(redis_client, addresses)
        proc = listeners(emulator, connection_timeout=1, log_level="debug")
        wait_for(lambda: streaming(redis_client, 2), message="the two good mailboxes streaming")
        wait_for(lambda: sum(g["failing_count"] for g in groups(redis_client)) == 1, message="the bad one reported")
        (failing,) = [f for g in groups(redis_client) for f in g["failing"]]
        assert failing["mailbox"] == "fay@example.com" and "ErrorImpersonateUserDenied" in failing["error"]
        # status shows it; unhealthy only past the bound
        within = status(redis_server, emulator, mailbox_failure_grace_seconds=3600)
        assert not any("fay@example.com" in p for p in within["problems"])
        assert any(f["mailbox"] == "fay@example.com" for lst in within["listeners"] for g in lst["groups"]
                   for f in g["failing"])
        past = status(redis_server, emulator, mailbox_failure_grace_seconds=0)
        assert any("fay@example.com cannot be subscribed" in p for p in past["problems"])
        text = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "status"], capture_output=True,
                              text=True, env=service_env(redis_server.url, emulator.ews_url, allow_volatile_redis=True),
                              timeout=60, check=False).stdout
        assert "1 failing to subscribe" in text and "fay@example.com: ErrorImpersonateUserDenied" in text
        items = [emulator.deliver(a, mail("re: hello"))["item_id"] for a in ("eve@example.com", "gus@example.com")]
        wait_for(lambda: set(items) <= set(queued(redis_client)), message="the group's other mail flows")

        def epoch(line: dict) -> float:
            return dt.datetime.fromisoformat(line["timestamp"].rstrip("Z")).replace(tzinfo=dt.UTC).timestamp()

        def failures() -> list[float]:
            return [epoch(line) for line in proc.lines() if line.get("mailbox") == "fay@example.com"
                    and "cannot subscribe" in line.get("event", "")]

        def catch_ups_after(moment: float) -> list[tuple[str, str]]:
            return [(line["mailbox"], line.get("reason")) for line in proc.lines()
                    if line.get("event") == "caught up" and epoch(line) > moment]

        # its first retry may cut the stream (a passing error is retried at once); later ones wait
        # for the stream's own reconnects and cost the good mailboxes nothing
        wait_for(lambda: len(failures()) >= 3, timeout=60, message="the bad mailbox retried twice")
        third = failures()[2]
        wait_for(lambda: caught_up(redis_client) and any(g["connected"] and g["last_activity"] > third + 1
                                                         for g in groups(redis_client)),
                 message="the stream delivering again after the second retry")
        assert catch_ups_after(third) == [], catch_ups_after(third)

        emulator.fault(kind="clear_mailbox_error", mailbox="fay@example.com")  # rights given back
        wait_for(lambda: streaming(redis_client, 3), timeout=60, message="retried on its own backoff and streaming")
        assert sum(g["failing_count"] for g in groups(redis_client)) == 0
        late = emulator.deliver("fay@example.com", mail("re: finally"))["item_id"]
        wait_for(lambda: late in queued(redis_client), message="its mail enqueued")


@pytest.mark.slow
def test_a_busy_anchor_re_forms_the_group_on_another_anchor(redis_client, emulator, listeners):
    addresses = ["hal@example.com", "ida@example.com"]
    mailboxes.add(redis_client, addresses)
    proc = listeners(emulator)
    wait_for(lambda: streaming(redis_client, 2), message="streaming")
    (group,) = groups(redis_client)
    old_anchor = group["anchor"]
    emulator.fault(kind="server_busy", anchor=old_anchor, count=-1, back_off_ms=200)  # until cleared
    emulator.fault(kind="reset_streams")
    wait_for(lambda: any("re-forming the group" in line.get("event", "") for line in proc.lines()),
             message="group re-formed")
    wait_for(lambda: streaming(redis_client, 2) and groups(redis_client)[0]["anchor"] != old_anchor,
             message="streaming on the new anchor")
    items = [emulator.deliver(a, mail("re: after re-forming"))["item_id"] for a in addresses]
    wait_for(lambda: set(items) <= set(queued(redis_client)), message="mail flows on the new anchor")


def test_a_connection_limit_folds_groups_together(redis_client, listeners):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--max-streams-per-account", "1"]) as emu:
        addresses = ["jo@example.com", "kim@example.com"]
        mailboxes.add(redis_client, addresses)
        listeners(emu, group_size=1)  # two groups wanted, the server allows one connection
        wait_for(lambda: streaming(redis_client, 2) and len(groups(redis_client)) == 1, timeout=60,
                 message="both mailboxes streaming on the one allowed connection")
        items = [emu.deliver(a, mail("re: one connection"))["item_id"] for a in addresses]
        wait_for(lambda: set(items) <= set(queued(redis_client)), message="mail of both enqueued")


@pytest.mark.slow
def test_a_backlog_held_during_a_redis_outage_never_costs_the_leases(emulator, listeners):
    with RedisServer(aof=True) as server:
        conn = redis.Redis.from_url(server.url)
        mailboxes.add(conn, ["lea@example.com"])
        proc = listeners(emulator, redis_url=server.url, lease_seconds=2)
        wait_for(lambda: streaming(conn, 1), message="streaming")
        server.stop()
        count = 4000
        outage = []
        for i in range(count):
            outage.append(emulator.deliver("lea@example.com", mail(f"during the outage {i}"))["item_id"])
        wait_for(lambda: any("holding new mail" in line.get("event", "") for line in proc.lines()),
                 message="listener holds mail in memory")
        time.sleep(1.0)  # the last notifications reach the listener
        server.start()
        conn = redis.Redis.from_url(server.url)
        lapses = []
        stop = threading.Event()

        def watch_lease():
            held_once = False
            while not stop.is_set():
                holder = conn.get(leases.lease_key("lea@example.com"))
                if holder == b"l1":
                    held_once = True
                elif held_once:
                    lapses.append(time.monotonic())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch_lease, daemon=True)
        watcher.start()
        try:
            wait_for(lambda: len(queued(conn)) >= count, timeout=120, message="the whole backlog enqueued")
            # and the listener's own backlog flushed (the catch-up after Redis came back may have
            # queued the same mail first, in jobs of 50, before the held copies went out)
            wait_for(lambda: conn.hget(keys.listener("l1"), "held_in_memory") == b"0", timeout=120,
                     message="the held backlog flushed")
        finally:
            stop.set()
            watcher.join(2)
        assert set(outage) <= set(queued(conn))
        assert not lapses, f"the lease lapsed {len(lapses)} time(s) while the backlog was flushed"
        flushed = [line for line in proc.lines() if "enqueued held mail" in line.get("event", "")]
        assert len(flushed) > 1  # in slices, between renewals
        assert not any(re.search("lost leases", line.get("event", "")) for line in proc.lines())
