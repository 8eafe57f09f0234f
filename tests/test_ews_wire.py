"""Our EWS services read whole answers: a cut-off answer is a clear error, and the next call works;
the stream is split into whole envelopes however its chunks fall.

Every service but GetStreamingEvents parses the body requests already holds (``sources.ews.wire``).
These go over real HTTP to the emulator, whose ``truncated_xml`` fault answers HTTP 200 with
half a document, as a dying backend or proxy does.
"""
from __future__ import annotations

import pytest
from exchangelib.errors import SOAPError
from hypothesis import given
from hypothesis import strategies as st

from exchange_listener.core import config
from exchange_listener.sources.ews import account as ews_account
from exchange_listener.sources.ews.catch_up import (
    DISTINGUISHED,
    SyncStore,
    catch_up,
    distinguished_folder_ids,
)
from exchange_listener.sources.ews.fetch import EwsFetcher, FetchError
from exchange_listener.sources.ews.stream import GroupSubscribe
from exchange_listener.sources.ews.wire import envelopes
from exchange_listener.sources.ledger import Ledger

MAILBOX = "rep@ours.example"
REPLY = (b"From: p@prospect.example\r\nTo: rep@ours.example\r\nSubject: Re: hi\r\n"
         b"Message-ID: <wire-1@prospect.example>\r\nIn-Reply-To: <send-1@ours.example>\r\n\r\nyes\r\n")


@pytest.fixture
def settings(emulator):
    return config.load(env={}, overrides={"ews_url": emulator.ews_url, "ews_username": "svc",
                                          "ews_password": "svc-password"})


@pytest.fixture
def account(settings):
    return ews_account.make_account(settings, MAILBOX, ews_account.make_configuration(settings, pool="wire-test"))


class _Group:
    anchor = MAILBOX
    cookie = None


def test_folder_ids_cut_off_answer_is_an_error_then_the_same_ids(emulator, account):
    first = distinguished_folder_ids(account, MAILBOX)
    assert set(first) <= set(DISTINGUISHED) and "inbox" in first
    emulator.fault(kind="truncated_xml", count=1)
    with pytest.raises(SOAPError, match="cut off"):
        distinguished_folder_ids(account, MAILBOX)
    assert distinguished_folder_ids(account, MAILBOX) == first


def test_subscribe_cut_off_answer_is_an_error_then_a_subscription(emulator, account):
    def subscribe():
        svc = GroupSubscribe(account=account)
        svc.group = _Group
        return svc.get(folders=None, event_types=["NewMailEvent"])

    emulator.fault(kind="truncated_xml", count=1)
    with pytest.raises(SOAPError, match="cut off"):
        subscribe()
    subscription_id = subscribe()
    assert isinstance(subscription_id, str) and subscription_id


def test_fetch_cut_off_answer_is_a_retryable_fetch_error(emulator, settings):
    item_id = emulator.deliver(MAILBOX, REPLY)["item_id"]
    fetcher = EwsFetcher(settings)
    try:
        emulator.fault(kind="truncated_xml", count=1)
        with pytest.raises(FetchError, match="cut off"):
            fetcher.fetch(MAILBOX, [item_id])
        (msg,) = fetcher.fetch(MAILBOX, [item_id])
        assert msg.internet_message_id == "<wire-1@prospect.example>"
        assert msg.in_reply_to == "<send-1@ours.example>"
    finally:
        fetcher.close()


def test_catch_up_cut_off_page_keeps_its_state_and_the_next_run_enqueues(emulator, account, redis_client):
    """SyncFolderItems puts the SyncState before the changes: half a page used to store the new
    state with only some changes read, and the rest of the mail was never enqueued."""
    store, ledger = SyncStore(redis_client), Ledger(redis_client)
    queued: list = []
    catch_up(account, MAILBOX, "inbox", store, ledger, queued.extend, since=0)
    state_before = store.get(MAILBOX, "inbox")
    assert state_before
    delivered = {emulator.deliver(MAILBOX, REPLY.replace(b"wire-1", f"wire-c{i}".encode()))["item_id"]
                 for i in range(30)}
    queued.clear()
    emulator.fault(kind="truncated_xml", count=1)
    with pytest.raises(SOAPError, match="cut off"):
        catch_up(account, MAILBOX, "inbox", store, ledger, queued.extend, since=0)
    assert queued == [] and store.get(MAILBOX, "inbox") == state_before
    assert catch_up(account, MAILBOX, "inbox", store, ledger, queued.extend, since=0) == 30
    assert {m.item_id for m in queued} == delivered


def test_hand_built_getfolder_request_is_valid_ews(account):
    """FolderIds builds its request without exchangelib's models: it must still be schema-valid."""
    from lxml import etree

    from emulators.ews.validation import violations
    from exchange_listener.sources.ews.catch_up import FolderIds

    payload = FolderIds(account=account).get_payload(folders=[(n, MAILBOX) for n in DISTINGUISHED],
                                                     additional_fields=set(), shape="IdOnly")
    body = etree.tostring(payload)
    envelope = (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
                b'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
                b'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><s:Body>'
                + body + b"</s:Body></s:Envelope>")
    assert violations(envelope) == []
    refs = etree.fromstring(envelope).findall(".//{*}DistinguishedFolderId")
    assert [r.get("Id") for r in refs] == list(DISTINGUISHED)
    assert {r.findtext("{*}Mailbox/{*}EmailAddress") for r in refs} == {MAILBOX}


# -- the streaming splitter -------------------------------------------------------------------
_PREFIXES = st.sampled_from(["s:", "soap:", "", "env:"])
_GAPS = st.sampled_from(["", "\r\n", "\n\n", "<?xml version='1.0' encoding='utf-8'?>\n", "  "])
_AFTER_NAME = st.sampled_from([" ", "\n ", "\t", "\r\n  "])


@st.composite
def _stream(draw):
    docs = []
    for i in range(draw(st.integers(1, 6))):
        prefix = draw(_PREFIXES)
        text = draw(st.text(alphabet="abc <>&;/:=\"'\n", max_size=40)).replace("<", "&lt;").replace(">", "&gt;")
        docs.append((f'<{prefix}Envelope{draw(_AFTER_NAME)}xmlns:{prefix.rstrip(":") or "d"}="urn:x">'
                     f"<{prefix}Body><m:Note n=\"{i}\">{text}</m:Note></{prefix}Body></{prefix}Envelope"
                     f"{draw(st.sampled_from(['', ' ', chr(10)]))}>").encode())
    gaps = [draw(_GAPS).encode() for _ in range(len(docs) + 1)]
    whole = gaps[0] + b"".join(doc + gap for doc, gap in zip(docs, gaps[1:]))
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=12)))
    chunks = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
    return docs, chunks


@given(_stream())
def test_envelopes_come_out_whole_however_the_stream_is_chunked(case):
    docs, chunks = case
    assert list(envelopes(chunks)) == docs


def test_envelopes_byte_by_byte_and_a_cut_off_last_one():
    one = b'<s:Envelope\n xmlns:s="urn:x"><s:Body>1</s:Body></s:Envelope>'
    two = b'<s:Envelope xmlns:s="urn:x"><s:Body>2</s:Body></s:Envelope >'
    cut = b'<s:Envelope xmlns:s="urn:x"><s:Body>3</s:Bo'
    stream = one + b"\r\n" + two + cut
    assert list(envelopes(stream[i:i + 1] for i in range(len(stream)))) == [one, two]


def test_notification_read_by_local_names_as_exchange_and_the_schema_write_it():
    """Exchange writes m:Notification with t:SubscriptionId; the ids a new or moved mail carries
    are read, folder and status events carry none."""
    from lxml import etree

    from exchange_listener.sources.ews.stream import read_notification

    xml = (b'<m:Notification xmlns:m="urn:m" xmlns:t="urn:t"><t:SubscriptionId>sub-1</t:SubscriptionId>'
           b'<t:StatusEvent><t:Watermark>w</t:Watermark></t:StatusEvent>'
           b'<t:NewMailEvent><t:Watermark>w</t:Watermark><t:TimeStamp>2026-11-30T10:00:00Z</t:TimeStamp>'
           b'<t:ItemId Id="item-1" ChangeKey="c"/><t:ParentFolderId Id="inbox-id" ChangeKey="c"/></t:NewMailEvent>'
           b'<t:MovedEvent><t:TimeStamp>2026-11-30T10:00:01Z</t:TimeStamp><t:ItemId Id="item-2" ChangeKey="c"/>'
           b'<t:ParentFolderId Id="junk-id"/><t:OldItemId Id="item-1"/><t:OldParentFolderId Id="inbox-id"/>'
           b'</t:MovedEvent><t:CreatedEvent><t:TimeStamp>2026-11-30T10:00:02Z</t:TimeStamp>'
           b'<t:FolderId Id="new-folder"/><t:ParentFolderId Id="root-id"/></t:CreatedEvent></m:Notification>')
    note = read_notification(etree.fromstring(xml))
    assert note.subscription_id == "sub-1"
    assert [e.kind for e in note.events] == ["StatusEvent", "NewMailEvent", "MovedEvent", "CreatedEvent"]
    status, new, moved, folder = note.events
    assert status.item_id is None and folder.item_id is None
    assert (new.item_id.id, new.parent_folder_id.id) == ("item-1", "inbox-id")
    assert (moved.item_id.id, moved.parent_folder_id.id, moved.old_item_id.id, moved.old_parent_folder_id.id) == \
        ("item-2", "junk-id", "item-1", "inbox-id")
