"""Catch-up from SyncFolderItems state, against the emulator over HTTP with unmodified exchangelib."""
from __future__ import annotations

import io
import logging
import time
import uuid

import pytest
import redis
import structlog
from exchangelib.properties import ItemId

from exchange_listener import config, logs, queueing
from exchange_listener.sources import ews_account
from exchange_listener.sync_state import SKEW_SECONDS, SyncStore, catch_up

SERVICE_ACCOUNT = ("svc", "svc-password")
MAILBOX = "sam@example.com"


def mail(subject: str) -> bytes:
    return (f"From: p@customer.example\r\nTo: {MAILBOX}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@customer.example>\r\n\r\nhi\r\n").encode()


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


def test_first_catch_up_enqueues_only_mail_since_the_mailbox_was_added(emulator, account, redis_client, queue):
    store = SyncStore(redis_client)
    old = emulator.deliver(MAILBOX, mail("long before"))
    added_at = time.time() + SKEW_SECONDS + 1  # "added" after the old mail, past the skew margin
    assert catch_up(account, MAILBOX, "inbox", store, enqueuer(queue), added_at=added_at) == 0
    assert store.get(MAILBOX, "inbox")[0]  # a baseline state was stored
    new = emulator.deliver(MAILBOX, mail("after the baseline"))
    assert catch_up(account, MAILBOX, "inbox", store, enqueuer(queue)) == 1
    assert item_ids(queue) == {new["item_id"]}
    assert old["item_id"] not in item_ids(queue)
    assert catch_up(account, MAILBOX, "inbox", store, enqueuer(queue)) == 0  # nothing new: nothing enqueued


def test_catch_up_pages_through_more_than_512_changes(emulator, account, redis_client, queue):
    store = SyncStore(redis_client)
    catch_up(account, MAILBOX, "inbox", store, enqueuer(queue), added_at=time.time())
    delivered = {emulator.deliver(MAILBOX, mail(f"n{i}"))["item_id"] for i in range(530)}
    assert catch_up(account, MAILBOX, "inbox", store, enqueuer(queue)) == 530
    assert item_ids(queue) == delivered


def test_state_advances_only_after_the_items_are_enqueued(emulator, account, redis_client, queue):
    store = SyncStore(redis_client)
    catch_up(account, MAILBOX, "inbox", store, enqueuer(queue), added_at=time.time())
    state_before = store.get(MAILBOX, "inbox")[0]
    item = emulator.deliver(MAILBOX, mail("must not be lost"))

    def broken(_mails):
        raise redis.exceptions.ConnectionError("Redis went away")

    with pytest.raises(redis.exceptions.ConnectionError):
        catch_up(account, MAILBOX, "inbox", store, broken)
    assert store.get(MAILBOX, "inbox")[0] == state_before
    assert catch_up(account, MAILBOX, "inbox", store, enqueuer(queue)) == 1
    assert item_ids(queue) == {item["item_id"]}


@pytest.fixture
def log_output():
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_invalid_sync_state_is_reset_and_says_so(emulator, account, redis_client, queue, log_output):
    store = SyncStore(redis_client)
    catch_up(account, MAILBOX, "inbox", store, enqueuer(queue), added_at=time.time())
    item = emulator.deliver(MAILBOX, mail("after the good state"))
    store.put(MAILBOX, "inbox", "bm90LWEtc3RhdGU=", at=time.time() - 60)  # corrupt state, last good a minute ago
    assert catch_up(account, MAILBOX, "inbox", store, enqueuer(queue)) == 1
    assert item_ids(queue) == {item["item_id"]}
    assert "sync state rejected by the server" in log_output.getvalue()
    assert store.get(MAILBOX, "inbox")[0] != "bm90LWEtc3RhdGU="


def test_user_folder_catch_up(emulator, account, redis_client, queue):
    store = SyncStore(redis_client)
    first = emulator.deliver(MAILBOX, mail("filed by a rule"), folder="Prospects")
    # the stream reports the folder id as the new item's parent; here we ask the server for it
    fetched = list(account.fetch(ids=[ItemId(id=first["item_id"])], only_fields=["parent_folder_id"]))
    folder_id = fetched[0].parent_folder_id.id
    store.learn_user_folder(MAILBOX, folder_id)
    catch_up(account, MAILBOX, folder_id, store, enqueuer(queue), added_at=time.time() - 5)
    assert item_ids(queue) == {first["item_id"]}


def test_first_catch_up_failing_half_way_does_not_replay_history_on_retry(emulator, account, redis_client, queue):
    """A first sync filters out mail from before the mailbox was added; if it fails after its
    first page was stored, the retry must go on filtering, not enqueue the older mail."""
    store = SyncStore(redis_client)
    for i in range(520):  # more than one 512-change page of mail from before the mailbox was added
        emulator.deliver(MAILBOX, mail(f"history {i}"))
    added = time.time() + 1 + SKEW_SECONDS  # cutoff one second after the history (seconds resolution)
    time.sleep(2.1)
    new = emulator.deliver(MAILBOX, mail("arrived after the mailbox was added"))

    def broken(_mails):
        raise redis.exceptions.ConnectionError("Redis went away")

    with pytest.raises(redis.exceptions.ConnectionError):  # page 1 filtered and stored, page 2 fails
        catch_up(account, MAILBOX, "inbox", store, broken, added_at=added)
    assert store.get(MAILBOX, "inbox")[0]
    assert catch_up(account, MAILBOX, "inbox", store, enqueuer(queue), added_at=added) == 1
    assert item_ids(queue) == {new["item_id"]}
    assert store.cutoff(MAILBOX, "inbox") is None  # finished: later catch-ups take everything new
