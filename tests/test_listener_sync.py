"""Catch-up from SyncFolderItems state, against the emulator over HTTP with unmodified exchangelib."""
from __future__ import annotations

import io
import logging
import time
import uuid

import pytest
import redis
import structlog

from exchange_listener import queueing
from exchange_listener.core import config, logs
from exchange_listener.mail.message_ids import normalize
from exchange_listener.sources.ews import account as ews_account
from exchange_listener.sources.ews.catch_up import (
    SyncStore,
    catch_up,
    catch_up_mailbox,
)
from exchange_listener.sources.ledger import Ledger

SERVICE_ACCOUNT = ("svc", "svc-password")
MAILBOX = "sam@example.com"


def mail(subject: str, message_id: str | None = None) -> bytes:
    message_id = message_id or f"<{uuid.uuid4()}@customer.example>"
    return (f"From: p@customer.example\r\nTo: {MAILBOX}\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\nhi\r\n").encode()


@pytest.fixture
def account(emulator):
    settings = config.load(env={}, overrides={"ews_url": emulator.ews_url, "ews_username": SERVICE_ACCOUNT[0],
                                              "ews_password": SERVICE_ACCOUNT[1]})
    configuration = ews_account.make_configuration(settings, pool=f"test-sync-{uuid.uuid4().hex}")
    return ews_account.make_account(settings, MAILBOX, configuration)


@pytest.fixture
def queue(redis_client):
    return queueing.make_queue(redis_client, "exchange-listener")


def enqueuer(queue):
    return lambda mails: queueing.enqueue_new_mail(queue, mails)


def item_ids(queue) -> set[str]:
    return {m["item_id"] for job in queue.jobs for m in job.args[0]["mails"]}


@pytest.fixture
def ledger(redis_client):
    return Ledger(redis_client, processed_days=14)


def run(account, store, ledger, queue, folder="inbox", since=None, enqueue=None):
    since = time.time() - 3600 if since is None else since
    return catch_up(account, MAILBOX, folder, store, ledger, enqueue or enqueuer(queue), since=since)


def test_catch_up_enqueues_only_mail_received_since_the_mailbox_was_watched(emulator, account, redis_client, queue,
                                                                             ledger):
    store = SyncStore(redis_client)
    old = emulator.deliver(MAILBOX, mail("long before"))
    watched_from = int(time.time()) + 1  # "added" after the old mail (the server counts whole seconds)
    time.sleep(watched_from + 0.05 - time.time())
    assert run(account, store, ledger, queue, since=watched_from) == 0
    assert store.get(MAILBOX, "inbox")  # a baseline state was stored
    new = emulator.deliver(MAILBOX, mail("after the baseline"))
    assert run(account, store, ledger, queue, since=watched_from) == 1
    assert item_ids(queue) == {new["item_id"]}
    assert old["item_id"] not in item_ids(queue)
    assert run(account, store, ledger, queue, since=watched_from) == 0  # nothing new: nothing enqueued


def test_catch_up_pages_through_more_than_512_changes(emulator, account, redis_client, queue, ledger):
    store = SyncStore(redis_client)
    run(account, store, ledger, queue)
    delivered = {emulator.deliver(MAILBOX, mail(f"n{i}"))["item_id"] for i in range(530)}
    assert run(account, store, ledger, queue) == 530
    assert item_ids(queue) == delivered


def test_catch_up_puts_up_to_fifty_mails_of_a_mailbox_in_one_job(emulator, account, redis_client, queue, ledger):
    """RQ's own work per job costs more than a mail's: a catch-up of 120 mails makes 3 jobs, each
    item in exactly one, and running it again from the same state makes the same jobs (same ids)."""
    store = SyncStore(redis_client)
    run(account, store, ledger, queue)
    state = store.get(MAILBOX, "inbox")
    delivered = {emulator.deliver(MAILBOX, mail(f"c{i}"))["item_id"] for i in range(120)}
    assert run(account, store, ledger, queue) == 120
    jobs = queue.jobs
    assert sorted(len(job.args[0]["mails"]) for job in jobs) == [20, 50, 50]
    carried = [m["item_id"] for job in jobs for m in job.args[0]["mails"]]
    assert sorted(carried) == sorted(delivered)
    store.put(MAILBOX, "inbox", state)  # a crash before the state was stored: the same chunks again
    assert run(account, store, ledger, queue) == 120
    assert {job.id for job in queue.jobs} == {job.id for job in jobs}


def test_state_advances_only_after_the_items_are_enqueued(emulator, account, redis_client, queue, ledger):
    store = SyncStore(redis_client)
    run(account, store, ledger, queue)
    state_before = store.get(MAILBOX, "inbox")
    item = emulator.deliver(MAILBOX, mail("must not be lost"))

    def broken(_mails):
        raise redis.exceptions.ConnectionError("Redis went away")

    with pytest.raises(redis.exceptions.ConnectionError):
        run(account, store, ledger, queue, enqueue=broken)
    assert store.get(MAILBOX, "inbox") == state_before
    assert run(account, store, ledger, queue) == 1
    assert item_ids(queue) == {item["item_id"]}


def test_processed_mail_is_never_enqueued_again_wherever_it_moves(emulator, account, redis_client, queue, ledger):
    """A restart replays the folder from an old state, and a move makes a new item: neither may
    cost a GetItem for mail a worker already processed (the ledger says so, however long ago)."""
    store = SyncStore(redis_client)
    run(account, store, ledger, queue)
    done = emulator.deliver(MAILBOX, mail("processed", "<done@customer.example>"))
    fresh = emulator.deliver(MAILBOX, mail("not processed yet", "<fresh@customer.example>"))
    ledger.mark_processed(MAILBOX, normalize("<done@customer.example>"), done["item_id"])
    assert run(account, store, ledger, queue) == 1
    assert item_ids(queue) == {fresh["item_id"]}
    queue.empty()
    run(account, store, ledger, queue, folder="deleteditems")  # baseline of Deleted Items
    moved = emulator.move(done["item_id"], "deleteditems")
    assert moved["item_id"] != done["item_id"]
    assert run(account, store, ledger, queue, folder="deleteditems") == 0
    assert run(account, store, ledger, queue) == 0
    # the unprocessed one, moved, is enqueued under its new id, with its Message-ID for the worker
    moved_fresh = emulator.move(fresh["item_id"], "deleteditems")
    assert run(account, store, ledger, queue, folder="deleteditems") == 1
    (job,) = queue.jobs
    (carried,) = job.args[0]["mails"]
    assert carried["item_id"] == moved_fresh["item_id"]
    assert carried["message_id"] == "<fresh@customer.example>"


@pytest.fixture
def log_output():
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_invalid_sync_state_is_reset_and_processed_mail_skipped(emulator, account, redis_client, queue, ledger,
                                                                 log_output):
    store = SyncStore(redis_client)
    run(account, store, ledger, queue)
    seen = emulator.deliver(MAILBOX, mail("processed before the state broke", "<seen@customer.example>"))
    ledger.mark_processed(MAILBOX, "<seen@customer.example>", seen["item_id"])
    item = emulator.deliver(MAILBOX, mail("after the good state"))
    store.put(MAILBOX, "inbox", "bm90LWEtc3RhdGU=")  # corrupt state
    assert run(account, store, ledger, queue) == 1
    assert item_ids(queue) == {item["item_id"]}
    assert "sync state rejected by the server" in log_output.getvalue()
    assert store.get(MAILBOX, "inbox") != "bm90LWEtc3RhdGU="


def create_folder(emulator, path: str, folder_class: str = "IPF.Note") -> str:
    return emulator.create_folder(MAILBOX, path, folder_class)["folder_id"]


def test_whole_mailbox_catch_up_covers_every_mail_folder_and_nothing_else(emulator, account, redis_client, queue,
                                                                          ledger):
    """Folders made while no listener ran, at any depth, Deleted Items and Recoverable Items
    count; Sent Items, Drafts, Outbox (and below) and non-mail folders never do."""
    store = SyncStore(redis_client)
    added = time.time() - 5
    assert catch_up_mailbox(account, MAILBOX, store, ledger, enqueuer(queue), added_at=added)[0] == 0
    create_folder(emulator, "Sent Items/Archive")
    create_folder(emulator, "Trips", "IPF.Appointment")
    counted = [
        emulator.deliver(MAILBOX, mail("inbox"))["item_id"],
        emulator.deliver(MAILBOX, mail("junk"), folder="junkemail")["item_id"],
        emulator.deliver(MAILBOX, mail("rule filed, new nested folder"), folder="Customers/Acme/Replies")["item_id"],
        emulator.deliver(MAILBOX, mail("under the inbox"), folder="Inbox/Later")["item_id"],
        emulator.deliver(MAILBOX, mail("deleted by a rule"), folder="deleteditems")["item_id"],
    ]
    hard_deleted = emulator.deliver(MAILBOX, mail("hard deleted before any worker ran"))
    emulator.delete(hard_deleted["item_id"])
    for folder in ("sentitems", "drafts", "outbox", "Sent Items/Archive", "calendar", "Trips"):
        emulator.deliver(MAILBOX, mail(f"never counts: {folder}"), folder=folder)
    total, watched = catch_up_mailbox(account, MAILBOX, store, ledger, enqueuer(queue), added_at=added)
    found = item_ids(queue)
    assert set(counted) <= found
    assert total == len(found) == len(counted) + 1  # + the hard-deleted mail, under its Recoverable Items id
    folders = {m["folder"] for job in queue.jobs for m in job.args[0]["mails"]}
    assert "recoverableitemsdeletions" in folders and "deleteditems" in folders
    assert "recoverableitemsdeletions" in watched.values()
    # a second run reads only changes: nothing new, nothing enqueued
    assert catch_up_mailbox(account, MAILBOX, store, ledger, enqueuer(queue), added_at=added)[0] == 0
