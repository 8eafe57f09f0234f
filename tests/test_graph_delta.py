"""Graph catch-up by per-folder message delta: a real redis-server (links, folders, the ledger, the
RQ queue) and the Graph emulator over real HTTP."""
from __future__ import annotations

import base64
import datetime as dt
import time
import uuid

import pytest
import redis

from emulators.services import RedisServer
from exchange_listener import queueing
from exchange_listener.core import config, keys
from exchange_listener.mail.message_ids import normalize
from exchange_listener.sources.base import SKEW_SECONDS
from exchange_listener.sources.graph.client import (
    GraphClient,
    GraphUnavailable,
    NotFound,
    SyncStateNotFound,
)
from exchange_listener.sources.graph.delta import (
    DeltaStore,
    catch_up_folder,
    catch_up_mailbox,
    watched_folders,
    watched_of,
)
from exchange_listener.sources.ledger import Ledger

MAILBOX = "sam@example.com"


def mail(subject: str = "hello", message_id: str | None = None) -> bytes:
    message_id = message_id or f"<{uuid.uuid4()}@customer.example>"
    return (f"From: p@customer.example\r\nTo: {MAILBOX}\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\nhi\r\n").encode()


@pytest.fixture
def client(graph):
    settings = config.load(env=graph.settings_env(), overrides={"graph_poll_seconds": 60})
    c = GraphClient(settings)
    yield c
    c.close()


@pytest.fixture
def store(redis_client):
    return DeltaStore(redis_client)


@pytest.fixture
def ledger(redis_client):
    return Ledger(redis_client, processed_days=14)


@pytest.fixture
def queue(redis_client):
    return queueing.make_queue(redis_client, "exchange-listener")


def enqueuer(queue):
    return lambda mails: queueing.enqueue_new_mail(queue, mails, source="graph")


def queued(queue) -> list[str]:
    """Item ids of every queued job, in job order (a repeat shows up twice)."""
    return [m["item_id"] for job in queue.jobs for m in job.args[0]["mails"]]


def run(client, store, ledger, queue, *, added_at=None, folders=None, enqueue=None, **kwargs) -> int:
    added = time.time() - 60 if added_at is None else added_at
    return catch_up_mailbox(client, MAILBOX, store, ledger, enqueue or enqueuer(queue), added_at=added,
                            folders=folders, **kwargs)


def mark_processed(ledger, raw: bytes, item_id: str) -> None:
    message_id = raw.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
    ledger.mark_processed(MAILBOX, normalize(message_id), item_id)


def test_first_catch_up_takes_mail_received_after_the_mailbox_was_added(graph, client, store, ledger, queue):
    old = graph.deliver(MAILBOX, mail("old"))["item_id"]
    time.sleep(1.1)  # receivedDateTime has whole seconds
    since = float(int(time.time()))
    new = graph.deliver(MAILBOX, mail("new"))
    enqueue = enqueuer(queue)
    assert catch_up_folder(client, MAILBOX, new["folder_id"], store, ledger, enqueue, since=since) == 1
    assert queued(queue) == [new["item_id"]]
    (job,) = queue.jobs
    (payload_mail,) = job.args[0]["mails"]
    assert job.args[0]["source"] == "graph"
    assert payload_mail["via"] == "catchup" and payload_mail["folder"] == new["folder_id"]
    assert payload_mail["message_id"] == normalize(new["internet_message_id"])
    assert payload_mail["received_at"] >= since - 1
    assert old not in queued(queue)


def test_added_at_bounds_the_first_catch_up_with_the_skew(graph, client, store, ledger, queue):
    graph.deliver(MAILBOX, mail())
    assert run(client, store, ledger, queue, added_at=time.time() + SKEW_SECONDS + 60) == 0
    store.forget_mailbox(MAILBOX)
    assert run(client, store, ledger, queue, added_at=time.time() + SKEW_SECONDS - 60) == 1  # within the skew


def test_second_run_enqueues_only_new_mail(graph, client, store, ledger, queue):
    first = [graph.deliver(MAILBOX, mail(f"a{n}"))["item_id"] for n in range(3)]
    assert run(client, store, ledger, queue) == 3
    assert sorted(queued(queue)) == sorted(first)
    assert store.caught_up_at(MAILBOX) is not None
    assert run(client, store, ledger, queue) == 0
    later = [graph.deliver(MAILBOX, mail(f"b{n}"))["item_id"] for n in range(2)]
    assert run(client, store, ledger, queue) == 2
    assert sorted(queued(queue)) == sorted(first + later)


def test_processed_mail_is_skipped(graph, client, store, ledger, queue):
    raws = [mail(f"p{n}") for n in range(3)]
    ids = [graph.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    no_id = b"From: p@customer.example\r\nTo: sam@example.com\r\nSubject: no id\r\n\r\nhi\r\n"
    no_id_item = graph.deliver(MAILBOX, no_id)["item_id"]
    mark_processed(ledger, raws[1], ids[1])
    ledger.mark_processed(MAILBOX, None, no_id_item)  # no Message-ID: known by its item id
    assert run(client, store, ledger, queue) == 2
    assert sorted(queued(queue)) == sorted([ids[0], ids[2]])


def test_many_mails_go_out_in_jobs_of_fifty(graph, client, store, ledger, queue):
    ids = [graph.deliver(MAILBOX, mail(f"m{n}"))["item_id"] for n in range(120)]
    assert run(client, store, ledger, queue) == 120
    sizes = sorted(len(job.args[0]["mails"]) for job in queue.jobs)
    assert max(sizes) <= 50 and sum(sizes) == 120
    assert sorted(queued(queue)) == sorted(ids)


def test_every_folder_that_counts_and_never_our_own(graph, client, store, ledger, queue):
    graph.create_folder(MAILBOX, "Customers/Pat/2024")
    graph.create_folder(MAILBOX, "sentitems/Old")
    counted = {
        "inbox": graph.deliver(MAILBOX, mail())["item_id"],
        "junk": graph.deliver(MAILBOX, mail(), folder="junkemail")["item_id"],
        "deleted": graph.deliver(MAILBOX, mail(), folder="deleteditems")["item_id"],
        "archive": graph.deliver(MAILBOX, mail(), folder="archive")["item_id"],
        "deep": graph.deliver(MAILBOX, mail(), folder="Customers/Pat/2024")["item_id"],
    }
    own = [graph.deliver(MAILBOX, mail(), folder=f)["item_id"] for f in ("sentitems", "drafts", "outbox",
                                                                        "sentitems/Old")]
    watched = watched_folders(client, MAILBOX, store)
    names = set(watched.values())
    assert {"Inbox", "Junk Email", "Deleted Items", "Archive", "2024"} <= names
    assert not names & {"Sent Items", "Drafts", "Outbox", "Old"}
    assert run(client, store, ledger, queue) == len(counted)
    assert sorted(queued(queue)) == sorted(counted.values())
    assert not set(own) & set(queued(queue))
    assert store.watched(MAILBOX) == watched  # the same answer from the stored tree, no request


def test_mail_in_a_new_subfolder_is_found(graph, client, store, ledger, queue):
    assert run(client, store, ledger, queue) == 0
    item = graph.deliver(MAILBOX, mail(), folder="Customers/New")  # a rule filed it into a new folder
    assert run(client, store, ledger, queue) == 1
    assert queued(queue) == [item["item_id"]]
    assert queue.jobs[0].args[0]["mails"][0]["folder"] == item["folder_id"]


def test_mail_moved_during_a_gap_is_found_where_it_went(graph, client, store, ledger, queue):
    graph.create_folder(MAILBOX, "Projects")
    assert run(client, store, ledger, queue) == 0
    raw = mail("moved")
    item_id = graph.deliver(MAILBOX, raw)["item_id"]
    graph.move(item_id, "Projects")  # before any catch-up saw it in the inbox
    assert run(client, store, ledger, queue) == 1
    assert queued(queue) == [item_id]
    mark_processed(ledger, raw, item_id)  # the worker did its job
    graph.move(item_id, "inbox")  # moved back: created in the inbox, but processed
    assert run(client, store, ledger, queue) == 0


def test_hard_deleted_mail_is_found_in_recoverable_items(graph, client, store, ledger, queue):
    assert run(client, store, ledger, queue) == 0
    item_id = graph.deliver(MAILBOX, mail())["item_id"]
    graph.delete(item_id)  # shift-delete before we looked: Recoverable Items\Deletions
    assert run(client, store, ledger, queue) == 1
    assert queued(queue) == [item_id]


def test_expired_delta_tokens_mean_a_full_resync_without_duplicates(graph, client, store, ledger, queue):
    raws = [mail(f"e{n}") for n in range(4)]
    ids = [graph.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    assert run(client, store, ledger, queue) == 4
    for raw, item_id in zip(raws, ids):
        mark_processed(ledger, raw, item_id)
    inbox = graph.deliver(MAILBOX, mail("after"))["folder_id"]
    link = store.get(MAILBOX, inbox)
    graph.fault(kind="expire_delta_tokens")
    assert run(client, store, ledger, queue) == 1  # every folder read again; only the new mail taken
    assert store.get(MAILBOX, inbox) not in (None, link)
    assert len(queued(queue)) == 5 and len(set(queued(queue))) == 5


def test_token_lost_in_the_middle_of_a_round(graph, client, store, ledger, queue):
    """A 410 on a nextLink: the folder is read again from the start; what this run enqueued
    before the 410 is not enqueued again."""
    ids = [graph.deliver(MAILBOX, mail(f"r{n}"))["item_id"] for n in range(5)]
    inbox = watched_folders(client, MAILBOX, store)
    (inbox_id,) = [fid for fid, name in inbox.items() if name == "Inbox"]
    plain = enqueuer(queue)
    calls = []

    def enqueue_then_lose_tokens(mails):
        plain(mails)
        calls.append(len(mails))
        if len(calls) == 1:
            graph.fault(kind="expire_delta_tokens")

    enqueued = catch_up_folder(client, MAILBOX, inbox_id, store, ledger, enqueue_then_lose_tokens, since=0,
                               page_size=2)
    assert enqueued == 5 and len(calls) == 3  # 2 before the 410; the re-read's first page only repeats them
    assert sorted(queued(queue)) == sorted(ids)
    assert store.get(MAILBOX, inbox_id) and "deltatoken" in store.get(MAILBOX, inbox_id)


def test_nothing_advances_when_enqueueing_fails(graph, client, store, ledger, queue):
    """Enqueue into a Redis that is down: the catch-up raises and keeps the old links; once Redis
    is back the same mail is delivered."""
    first = graph.deliver(MAILBOX, mail("first"))
    assert run(client, store, ledger, queue) == 1
    link = store.get(MAILBOX, first["folder_id"])
    second = graph.deliver(MAILBOX, mail("second"))["item_id"]
    with RedisServer() as other:
        down_conn = redis.Redis.from_url(other.url, socket_timeout=2)
        down_queue = queueing.make_queue(down_conn, "exchange-listener")
        other.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            run(client, store, ledger, queue, enqueue=enqueuer(down_queue))
    assert store.get(MAILBOX, first["folder_id"]) == link
    assert run(client, store, ledger, queue) == 1
    assert queued(queue)[-1] == second


def test_first_round_interrupted_keeps_what_it_enqueued(graph, client, store, ledger, queue):
    ids = [graph.deliver(MAILBOX, mail(f"i{n}"))["item_id"] for n in range(5)]
    inbox_id = graph.deliver(MAILBOX, mail("i5"))["folder_id"]
    plain = enqueuer(queue)
    calls = []

    def fail_second_time(mails):
        calls.append(1)
        if len(calls) == 2:
            raise redis.exceptions.ConnectionError("down")
        plain(mails)

    with pytest.raises(redis.exceptions.ConnectionError):
        catch_up_folder(client, MAILBOX, inbox_id, store, ledger, fail_second_time, since=0, page_size=2)
    link = store.get(MAILBOX, inbox_id)
    assert link and "skiptoken" in link  # the page enqueued before the failure is not read again
    assert catch_up_folder(client, MAILBOX, inbox_id, store, ledger, plain, since=0, page_size=2) == 4
    assert len(queued(queue)) == 6 and len(set(queued(queue))) == 6
    assert set(ids) <= set(queued(queue))


def test_graph_restart(graph, client, store, ledger, queue):
    raw = mail("before")
    item_id = graph.deliver(MAILBOX, raw)["item_id"]
    assert run(client, store, ledger, queue) == 1
    mark_processed(ledger, raw, item_id)
    graph.fault(kind="restart", seconds=1.0)  # 503s for a second; every delta token lost
    short = GraphClient(client.settings, budget=0.2)
    with pytest.raises(GraphUnavailable):
        run(short, store, ledger, queue)
    time.sleep(1.1)
    after = graph.deliver(MAILBOX, mail("after"))["item_id"]
    assert run(client, store, ledger, queue) == 1  # full resync: the processed one is skipped
    assert queued(queue) == [item_id, after]


def test_a_folder_that_is_gone_is_forgotten(graph, client, store, ledger, queue):
    unknown = base64.urlsafe_b64encode(b"\x00" + uuid.uuid4().bytes * 2).decode()
    store.put(MAILBOX, unknown, client.url(f"users/{MAILBOX}/mailFolders/{unknown}/messages/delta"))
    assert run(client, store, ledger, queue, folders=[unknown]) == 0
    assert store.get(MAILBOX, unknown) is None


def test_a_mailbox_that_is_gone_raises(graph, client, store, ledger, queue):
    with pytest.raises(NotFound):
        catch_up_mailbox(client, "nobody@example.com", store, ledger, enqueuer(queue), added_at=time.time())


def test_store_keys_and_forgetting(graph, client, store, ledger, queue, redis_client):
    graph.deliver(MAILBOX, mail())
    run(client, store, ledger, queue)
    assert redis_client.exists(keys.graph_delta(MAILBOX)) and redis_client.exists(keys.graph_folders(MAILBOX))
    folders = store.folders(MAILBOX)
    assert any(kind == "sentitems" for _n, _p, kind in folders.values())
    store.put(MAILBOX, "stale-folder", "http://x/delta")
    store.save_folders(MAILBOX, folders)  # a tree without that folder: its link goes
    assert store.get(MAILBOX, "stale-folder") is None
    store.forget_mailbox(MAILBOX)
    assert not redis_client.exists(keys.graph_delta(MAILBOX), keys.graph_folders(MAILBOX))


def test_watched_of_excludes_everything_below_our_own_folders():
    folders = {
        "root-child": ("Inbox", "root", "inbox"),
        "sent": ("Sent Items", "root", "sentitems"),
        "sent-sub": ("2023", "sent", ""),
        "sent-sub-sub": ("Q1", "sent-sub", ""),
        "user": ("Customers", "root", ""),
        "user-sub": ("Pat", "user", ""),
        "loop-a": ("A", "loop-b", ""),
        "loop-b": ("B", "loop-a", ""),
    }
    assert watched_of(folders) == {"root-child": "Inbox", "user": "Customers", "user-sub": "Pat",
                                   "loop-a": "A", "loop-b": "B"}


# -- an incremental round takes every new entry; one bad folder does not block the others ----------
def iso_days_ago(days: float) -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_an_incremental_round_after_a_long_gap_takes_mail_received_early_in_the_gap(graph, client, store, ledger,
                                                                                   queue, redis_client):
    """A listener down for 16 days (processed_days is 14): a reply that came on day one is new to
    the folder's delta, so it is enqueued although received before the ledger's horizon."""
    watched_since = time.time() - 60 * 86400
    assert run(client, store, ledger, queue, added_at=watched_since) == 0  # links stored before the gap
    redis_client.hset(keys.graph_delta(MAILBOX), "@caught_up", repr(time.time() - 16 * 86400))
    early = graph.deliver(MAILBOX, mail("early in the gap"), received=iso_days_ago(15))["item_id"]
    late = graph.deliver(MAILBOX, mail("late in the gap"), received=iso_days_ago(0.5))["item_id"]
    assert run(client, store, ledger, queue, added_at=watched_since) == 2
    assert sorted(queued(queue)) == sorted([early, late])
    assert run(client, store, ledger, queue, added_at=watched_since) == 0  # nothing is enqueued twice


def test_old_mail_the_rep_moves_into_a_folder_is_not_new_mail(graph, client, store, ledger, queue):
    """Caught up a minute ago: a 30-day-old mail filed into a watched folder now (delta lists it as
    created there) is older than the ledger's horizon and is left alone, as EWS does."""
    watched_since = time.time() - 60 * 86400
    assert run(client, store, ledger, queue, added_at=watched_since) == 0
    graph.deliver(MAILBOX, mail("archived long ago"), folder="Customers", received=iso_days_ago(30))
    fresh = graph.deliver(MAILBOX, mail("today"), folder="Customers")["item_id"]
    assert run(client, store, ledger, queue, added_at=watched_since) == 1
    assert queued(queue) == [fresh]


def test_mail_from_before_the_mailbox_was_added_never_counts_even_after_a_gap(graph, client, store, ledger, queue,
                                                                             redis_client):
    """A stale @caught_up (the mailbox removed and added again) never reaches before added_at."""
    assert run(client, store, ledger, queue) == 0
    redis_client.hset(keys.graph_delta(MAILBOX), "@caught_up", repr(time.time() - 16 * 86400))
    graph.deliver(MAILBOX, mail("before it was watched"), received=iso_days_ago(10))
    assert run(client, store, ledger, queue, added_at=time.time() - 3600) == 0


def test_a_full_round_after_a_long_gap_goes_back_to_the_last_complete_catch_up(graph, client, store, ledger,
                                                                              queue, redis_client):
    """Last caught up 16 days ago; meanwhile a rule filed a reply into a new folder and every sync
    state was lost: both full rounds take what came after the last catch-up, nothing older."""
    assert run(client, store, ledger, queue) == 0
    redis_client.hset(keys.graph_delta(MAILBOX), "@caught_up", repr(time.time() - 16 * 86400))
    before = graph.deliver(MAILBOX, mail("before the gap"), received=iso_days_ago(17))["item_id"]
    graph.deliver(MAILBOX, mail("filed before"), folder="Customers", received=iso_days_ago(17))
    inbox = graph.deliver(MAILBOX, mail("in the gap"), received=iso_days_ago(15))["item_id"]
    filed = graph.deliver(MAILBOX, mail("filed"), folder="Customers", received=iso_days_ago(15))["item_id"]
    graph.fault(kind="expire_delta_tokens")
    assert run(client, store, ledger, queue, added_at=time.time() - 60 * 86400) == 2
    assert sorted(queued(queue)) == sorted([inbox, filed]) and before not in queued(queue)
    assert store.caught_up_at(MAILBOX) > time.time() - 60


def test_a_first_round_resumed_from_its_nextlink_still_skips_old_mail(graph, client, store, ledger, queue):
    """The cut-off belongs to the whole first round, also when it resumes from a stored nextLink."""
    new = [graph.deliver(MAILBOX, mail(f"n{n}"))["item_id"] for n in range(3)]
    inbox_id = graph.deliver(MAILBOX, mail("old0"), received=iso_days_ago(30))["folder_id"]
    graph.deliver(MAILBOX, mail("old1"), received=iso_days_ago(30))
    plain = enqueuer(queue)
    calls = []

    def fail_second_time(mails):
        calls.append(1)
        if len(calls) == 2:
            raise redis.exceptions.ConnectionError("down")
        plain(mails)

    since = time.time() - 60
    with pytest.raises(redis.exceptions.ConnectionError):
        catch_up_folder(client, MAILBOX, inbox_id, store, ledger, fail_second_time, since=since, page_size=2)
    assert "skiptoken" in (store.get(MAILBOX, inbox_id) or "")
    assert catch_up_folder(client, MAILBOX, inbox_id, store, ledger, plain, since=since, page_size=2) == 1
    assert sorted(queued(queue)) == sorted(new)


def test_a_404_on_the_link_of_a_folder_that_exists_means_a_resync(graph, client, store, ledger, queue):
    assert run(client, store, ledger, queue) == 0
    item = graph.deliver(MAILBOX, mail("after"))
    inbox, archive = item["folder_id"], graph.create_folder(MAILBOX, "archive")["id"]
    link = store.get(MAILBOX, inbox)
    assert link and f"mailFolders('{inbox}')" in link
    # a link Graph answers 404 ErrorItemNotFound for, while the folder itself is there
    bad = link.replace(f"mailFolders('{inbox}')", f"mailFolders('{archive}')/childFolders('{inbox}')")
    store.put(MAILBOX, inbox, bad)
    with pytest.raises(NotFound):
        client.get_json(store.get(MAILBOX, inbox) or "")
    assert run(client, store, ledger, queue) == 1
    assert queued(queue) == [item["item_id"]]
    assert "childFolders" not in (store.get(MAILBOX, inbox) or "")
    assert store.caught_up_at(MAILBOX) is not None
    assert run(client, store, ledger, queue) == 0  # the new link works: nothing repeats


def test_a_stored_link_on_another_host_means_a_resync(graph, client, store, ledger, queue):
    """graph_url changed (another cloud, a proxy): the stored links point elsewhere and our client
    refuses to send the token there; the folder is read again from graph_url, not failed forever."""
    assert run(client, store, ledger, queue) == 0
    item = graph.deliver(MAILBOX, mail("after the move"))
    inbox = item["folder_id"]
    link = store.get(MAILBOX, inbox) or ""
    elsewhere = "https://graph.elsewhere.example" + link[link.index("/v1.0"):]
    store.put(MAILBOX, inbox, elsewhere)
    assert run(client, store, ledger, queue) == 1
    assert queued(queue) == [item["item_id"]]
    assert (store.get(MAILBOX, inbox) or "").startswith(graph.graph_url)


def test_one_failing_folder_does_not_stop_the_others(graph, client, store, ledger, queue):
    """The inbox (caught up first) loses its sync state after every page, past MAX_RESYNCS: the
    other folders are still caught up, the error is raised at the end, the mailbox is not marked
    caught up; the next run catches the inbox up."""
    inbox_items = [graph.deliver(MAILBOX, mail(f"in{n}")) for n in range(4)]
    inbox = inbox_items[0]["folder_id"]
    others = [graph.deliver(MAILBOX, mail("junk"), folder="junkemail")["item_id"],
              graph.deliver(MAILBOX, mail("filed"), folder="Customers")["item_id"]]
    plain = enqueuer(queue)

    def enqueue_losing_inbox_tokens(mails):
        plain(mails)
        if any(m.folder == inbox for m in mails):
            graph.fault(kind="expire_delta_tokens")

    with pytest.raises(SyncStateNotFound):
        run(client, store, ledger, queue, enqueue=enqueue_losing_inbox_tokens, page_size=1)
    assert set(others) <= set(queued(queue))
    assert store.caught_up_at(MAILBOX) is None
    assert all("deltatoken" in store.links(MAILBOX)[f] for f in store.watched(MAILBOX) if f != inbox)
    run(client, store, ledger, queue)
    assert store.caught_up_at(MAILBOX) is not None
    assert {i["item_id"] for i in inbox_items} | set(others) == set(queued(queue))


def test_a_mailbox_gone_during_a_folder_catch_up_raises_not_found(graph, client, store, ledger, queue):
    gone = "nobody@example.com"
    with pytest.raises(NotFound):
        catch_up_mailbox(client, gone, store, ledger, enqueuer(queue), added_at=time.time(),
                         folders=["inbox", "junkemail"])
    assert queue.jobs == []


def test_hidden_folders_are_not_watched(graph, client, store, ledger, queue):
    """Hidden folders are the system's (Teams and Yammer data, conversation settings): no reply
    lands there, and some refuse delta, which would fail the mailbox's every catch-up."""
    assert run(client, store, ledger, queue) == 0
    assert "Conversation Action Settings" not in store.watched(MAILBOX).values()  # hidden (isHidden) in Graph
    assert "Inbox" in store.watched(MAILBOX).values()
