"""GraphFetcher against the Graph emulator over real HTTP: RFC 5322 mail delivered, read back
as workers see it (one $batch per job, the MIME fallback for headers, outgoing mail, gone items)."""
from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import pytest

from exchange_listener.core import config
from exchange_listener.sources.base import FetchedMessage, ItemGone
from exchange_listener.sources.graph.client import GraphClient
from exchange_listener.sources.graph.fetch import (
    FetchError,
    GraphFetcher,
    GraphNotConfigured,
    mime_headers,
    needs_mime_headers,
)
from workers.context import Context

MAILBOX = "sam@example.com"


def reply(subject: str = "Re: our offer", *, parent: str = "<offer-1@sales.example>") -> tuple[bytes, str]:
    message_id = f"<{uuid.uuid4()}@customer.example>"
    raw = (f"From: Pat Prospect <pat@customer.example>\r\nSender: assistant@customer.example\r\n"
           f"To: Sam <{MAILBOX}>, other@example.com\r\nCc: boss@customer.example\r\nSubject: {subject}\r\n"
           f"Date: Tue, 02 Jan 2024 10:00:00 +0000\r\nMessage-ID: {message_id}\r\n"
           f"In-Reply-To: {parent}\r\nReferences: <root@sales.example> {parent}\r\n"
           f"Content-Type: text/plain; charset=utf-8\r\n\r\nYes, let's talk.\r\n").encode()
    return raw, message_id


@pytest.fixture
def fetcher(graph):
    settings = config.load(env=graph.settings_env(), overrides={"graph_poll_seconds": 60})
    f = GraphFetcher(settings)
    yield f
    f.close()


def test_fetch_reads_the_fields_workers_need(graph, fetcher):
    raw, message_id = reply()
    item = graph.deliver(MAILBOX, raw)
    before = graph.stats()["batches"]
    (got,) = fetcher.fetch(MAILBOX, [item["item_id"]])
    assert isinstance(got, FetchedMessage)
    assert got.item_id == item["item_id"] and got.mailbox == MAILBOX
    assert got.internet_message_id == message_id
    assert got.subject == "Re: our offer"
    assert got.from_address == "pat@customer.example"
    assert got.sender == "assistant@customer.example"
    assert got.to == [MAILBOX, "other@example.com"] and got.cc == ["boss@customer.example"]
    assert got.in_reply_to == "<offer-1@sales.example>"
    assert got.references == "<root@sales.example> <offer-1@sales.example>"
    assert ("Message-ID", message_id) in got.headers
    assert got.received_at is not None and got.received_at.tzinfo is not None
    assert abs((dt.datetime.now(dt.UTC) - got.received_at).total_seconds()) < 120
    assert got.conversation_id
    assert got.outgoing is False and got.mime is None  # no fallback was needed
    assert graph.stats()["batches"] == before + 1  # messages and the own-folder ids in one $batch


def test_one_batch_per_job_and_gone_items_in_place(graph, fetcher):
    items = [graph.deliver(MAILBOX, reply(f"Re: {n}")[0])["item_id"] for n in range(4)]
    graph.delete(items[1], purge=True)
    fetcher.fetch(MAILBOX, [items[0]])  # the own-folder ids are now known
    before = graph.stats()["batches"]
    got = fetcher.fetch(MAILBOX, [*items, "not-an-id"])
    assert [type(g) for g in got] == [FetchedMessage, ItemGone, FetchedMessage, FetchedMessage, ItemGone]
    assert [g.item_id for g in got if isinstance(g, FetchedMessage)] == [items[0], items[2], items[3]]
    assert graph.stats()["batches"] == before + 1


def test_moved_and_hard_deleted_mail_is_still_found_by_its_immutable_id(graph, fetcher):
    moved = graph.deliver(MAILBOX, reply()[0])["item_id"]
    graph.move(moved, "Customers/Pat")
    deleted = graph.deliver(MAILBOX, reply()[0])["item_id"]
    graph.delete(deleted)  # to Recoverable Items\Deletions, as Exchange does
    got = fetcher.fetch(MAILBOX, [moved, deleted])
    assert all(isinstance(g, FetchedMessage) and not g.outgoing for g in got)
    assert got[0].in_reply_to == "<offer-1@sales.example>"


def test_missing_reply_headers_are_read_from_the_mime(graph, fetcher):
    graph.fault(kind="strip_reply_headers", count=1)
    raw, _ = reply(parent="<offer-7@sales.example>")
    item_id = graph.deliver(MAILBOX, raw)["item_id"]
    (got,) = fetcher.fetch(MAILBOX, [item_id])
    assert isinstance(got, FetchedMessage)
    assert got.in_reply_to == "<offer-7@sales.example>"
    assert got.references == "<root@sales.example> <offer-7@sales.example>"
    assert ("In-Reply-To", "<offer-7@sales.example>") in got.headers
    assert got.mime is not None and b"Yes, let's talk." in got.mime
    requests_before = graph.stats()["requests"]
    assert fetcher.fetch_mime(MAILBOX, item_id) == got.mime  # kept from the fallback: no request
    assert graph.stats()["requests"] == requests_before
    assert b"Yes, let's talk." in fetcher.fetch_mime(MAILBOX, item_id)  # asked again: read from Graph
    assert graph.stats()["requests"] > requests_before


def test_new_thread_falls_back_once_and_finds_no_reply_headers(graph, fetcher):
    raw = (f"From: pat@customer.example\r\nTo: {MAILBOX}\r\nSubject: hello\r\n"
           f"Message-ID: <{uuid.uuid4()}@customer.example>\r\n\r\nhi\r\n").encode()
    item_id = graph.deliver(MAILBOX, raw)["item_id"]
    (got,) = fetcher.fetch(MAILBOX, [item_id])
    assert isinstance(got, FetchedMessage)
    assert got.in_reply_to is None and got.references is None and got.mime == raw


def test_mail_in_sent_items_drafts_and_outbox_is_outgoing(graph, fetcher):
    ids = {folder: graph.deliver(MAILBOX, reply()[0], folder=folder)["item_id"]
           for folder in ("sentitems", "drafts", "inbox", "junkemail")}
    got = dict(zip(ids, fetcher.fetch(MAILBOX, list(ids.values()))))
    assert got["sentitems"].outgoing and got["drafts"].outgoing
    assert not got["inbox"].outgoing and not got["junkemail"].outgoing
    moved = ids["inbox"]
    graph.move(moved, "sentitems")
    (again,) = fetcher.fetch(MAILBOX, [moved])  # folder ids cached; the mail moved there since
    assert again.outgoing


def test_mail_below_sent_items_drafts_and_outbox_is_outgoing(graph, fetcher):
    """A reply-looking mail the rep filed in a subfolder (at any depth) of Sent Items, Drafts or
    Outbox is the rep's own: outgoing. Subfolders of Inbox and the rep's own top folders are not."""
    folders = ("sentitems/Sub", "sentitems/Sub/Deeper", "drafts/Later", "outbox/Stuck",
               "Inbox/Replies", "Customers/Pat", "deleteditems/Old sent")
    ids = {folder: graph.deliver(MAILBOX, reply()[0], folder=folder)["item_id"] for folder in folders}
    got = dict(zip(ids, fetcher.fetch(MAILBOX, list(ids.values()))))
    assert all(isinstance(g, FetchedMessage) for g in got.values())
    assert {f for f, g in got.items() if g.outgoing} == {"sentitems/Sub", "sentitems/Sub/Deeper", "drafts/Later",
                                                          "outbox/Stuck"}
    assert got["Inbox/Replies"].in_reply_to == "<offer-1@sales.example>"
    # the folders' places are cached: the same folders again cost the one $batch of the job
    before = graph.stats()["batches"]
    again = fetcher.fetch(MAILBOX, [graph.deliver(MAILBOX, reply()[0], folder=f)["item_id"] for f in folders])
    assert [g.outgoing for g in again] == [True, True, True, True, False, False, False]
    assert graph.stats()["batches"] == before + 1


def test_no_mime_is_read_for_outgoing_mail(graph, fetcher):
    """Graph gives Sent Items and Drafts no internetMessageHeaders; their mail is skipped as our
    own, so its MIME is not read for the headers (nor for anything else)."""
    fetcher.fetch(MAILBOX, [graph.deliver(MAILBOX, reply()[0])["item_id"]])  # the own-folder ids are known
    ids = [graph.deliver(MAILBOX, reply()[0], folder=f)["item_id"] for f in ("sentitems", "drafts", "sentitems/Sub")]
    fetcher.fetch(MAILBOX, ids[2:])  # Sub's place is known
    before = graph.stats()
    got = fetcher.fetch(MAILBOX, ids)
    after = graph.stats()
    assert all(isinstance(g, FetchedMessage) and g.outgoing and g.mime is None for g in got)
    assert after["batches"] == before["batches"] + 1  # no second $batch of /$value
    assert after["batch_requests"] == before["batch_requests"] + len(ids)


def test_own_folder_ids_not_all_read_is_a_fetch_error_and_nothing_partial_is_kept(graph):
    """Graph throttles a mailbox past 4 concurrent requests: here another request holds one slot,
    so the job's $batch gets a 429 on one own-folder lookup (its Retry-After past the budget).
    The job must not go on without knowing every own folder (mail in it would not be outgoing):
    FetchError (the job is retried), and the next attempt reads the ids and marks it."""
    settings = config.load(env=graph.settings_env(), overrides={"graph_poll_seconds": 60})
    fetcher, other = GraphFetcher(settings), GraphClient(settings)
    fetcher.client.budget = 0.3  # below the emulator's Retry-After of 1 s
    other.token()
    item_id = graph.deliver(MAILBOX, reply()[0], folder="outbox")["item_id"]
    graph.fault(kind="latency", count=1, seconds=3)
    before = graph.stats()["requests"]
    slow = threading.Thread(target=other.get_json, args=(f"users/{MAILBOX}/mailFolders/inbox",))
    slow.start()
    try:
        deadline = time.monotonic() + 5
        while graph.stats()["requests"] == before and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(FetchError):
            fetcher.fetch(MAILBOX, [item_id])
        assert graph.stats()["concurrency_throttled"] >= 1
    finally:
        slow.join()
        other.close()
    try:
        (got,) = fetcher.fetch(MAILBOX, [item_id])
        assert isinstance(got, FetchedMessage) and got.outgoing
    finally:
        fetcher.close()


def test_broken_mime_in_the_fallback_does_not_crash(graph, fetcher):
    graph.fault(kind="strip_reply_headers", count=1)
    raw = (b"From: \"unterminated <pat@customer.example\r\nTo: <<<@@@>>>, ,;\r\n"
           b"Subject: =?utf-8?q?broken=ZZ?=\r\nX-Eight-Bit: caf\xe9 \xff\xfe\r\n"
           b"In-Reply-To: <offer-9@sales.example>\r\n"
           b"References: <offer-9@sales.example>\r\n"
           b"Content-Type: multipart/mixed; boundary=\"nope\"\r\nX-Bad: \x00\x01\r\n\r\n--other\r\ngarbage\r\n")
    item_id = graph.deliver(MAILBOX, raw)["item_id"]
    (got,) = fetcher.fetch(MAILBOX, [item_id])
    assert isinstance(got, FetchedMessage)
    assert got.in_reply_to == "<offer-9@sales.example>"  # read from the MIME (Graph's copy lacks it)
    assert (header := next(v for n, v in got.headers if n == "X-Eight-Bit")).startswith("caf")
    assert "\ufffd" in header
    for name, value in got.headers:
        value.encode("utf-8")  # no lone surrogates: safe to log and store
        name.encode("utf-8")


def test_mime_headers_never_raise():
    for raw in (b"", b"\x00\xff\xfe", b"no colon here\r\n\r\nbody", b"From: a@b\r\n continued\r\n\r\n",
                b"To: \"x\r\nSubject: =?x-unknown?b?!!!?=\r\n\r\n", b":\r\n\r\n"):
        headers = mime_headers(raw)
        assert isinstance(headers, list)
    assert mime_headers(b"In-Reply-To: <a@b>\r\nReferences:\r\n <a@b>\r\n <c@d>\r\n\r\nx") == [
        ("In-Reply-To", "<a@b>"), ("References", "<a@b> <c@d>")]
    assert needs_mime_headers([]) and needs_mime_headers([("Subject", "x")])
    assert not needs_mime_headers([("references", "<a@b>")])


def test_throttled_fetch_recovers(graph, fetcher):
    item_id = graph.deliver(MAILBOX, reply()[0])["item_id"]
    graph.fault(kind="throttle", count=3, retry_after=0.2)
    (got,) = fetcher.fetch(MAILBOX, [item_id])
    assert isinstance(got, FetchedMessage)
    assert graph.stats()["throttled"] == 3


def test_throttled_past_the_budget_is_a_fetch_error(graph):
    settings = config.load(env=graph.settings_env(), overrides={"graph_poll_seconds": 60})
    fetcher = GraphFetcher(settings)
    fetcher.client.budget = 0.3
    item_id = graph.deliver(MAILBOX, reply()[0])["item_id"]
    graph.fault(kind="throttle", count=50, retry_after=2)
    with pytest.raises(FetchError):
        fetcher.fetch(MAILBOX, [item_id])


def test_texts_from_unique_body(graph, fetcher):
    item_id = graph.deliver(MAILBOX, reply()[0])["item_id"]
    gone = graph.deliver(MAILBOX, reply()[0])["item_id"]
    graph.delete(gone, purge=True)
    texts = fetcher.fetch_texts(MAILBOX, [item_id, gone])
    assert texts[0] == "Yes, let's talk." and isinstance(texts[1], ItemGone)
    assert fetcher.fetch_text(MAILBOX, item_id) == "Yes, let's talk."
    with pytest.raises(ItemGone):
        fetcher.fetch_mime(MAILBOX, gone)


def test_workers_build_the_graph_fetcher_without_graph_settings():
    """warm_up builds every fetcher in every worker, also where only EWS is configured; only a
    Graph job complains."""
    ctx = Context(config.load(env={}))
    ctx.warm_up()
    fetcher = ctx.fetcher("graph")
    assert isinstance(fetcher, GraphFetcher)
    with pytest.raises(GraphNotConfigured, match="client_id"):
        fetcher.fetch(MAILBOX, ["AAkAxyz"])
    ctx.close()
