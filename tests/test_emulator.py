"""The emulator as unmodified exchangelib sees it: auth, folders, streaming, GetItem, FindItem, sync."""
from __future__ import annotations

import base64
import time

import pytest
from ews_client import (
    StreamReader,
    account,
    message,
    oauth_account,
    open_streams,
    wait_for,
)
from exchangelib import Message
from exchangelib.errors import (
    ErrorExceededConnectionCount,
    ErrorExceededSubscriptionCount,
    ErrorImpersonateUserDenied,
    ErrorInvalidArgument,
    ErrorInvalidOperation,
    ErrorInvalidSyncStateData,
    ErrorSubscriptionAccessDenied,
    ErrorSubscriptionNotFound,
    UnauthorizedError,
)

from emulators.services import Emulator

ALICE = "alice@example.com"


def test_impersonation_with_basic_auth_reaches_the_mailbox(emulator):
    emulator.deliver(ALICE, message("<m1@customer.example>"))
    acc = account(emulator, ALICE)
    assert acc.inbox.name == "Inbox"
    assert acc.inbox.total_count == 1
    assert acc.root.name == "Top of Information Store"


def test_wrong_password_is_rejected_with_401(emulator):
    with pytest.raises(UnauthorizedError):
        account(emulator, ALICE, password="wrong").root.refresh()


def test_account_without_impersonation_rights_is_denied():
    with Emulator(accounts=["svc:svc-password"], extra_args=["--plain-account", "bob@example.com:pw"]) as emu:
        with pytest.raises(ErrorImpersonateUserDenied):
            account(emu, ALICE, user="bob@example.com", password="pw").root.refresh()
        assert account(emu, "bob@example.com", user="bob@example.com", password="pw").inbox.total_count == 0


def test_oauth2_client_credentials_stream_and_fetch(monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the emulator speaks plain HTTP on loopback
    with Emulator(accounts=[], heartbeat_seconds=1, oauth_clients=["app-id:app-secret"]) as emu:
        acc = oauth_account(emu, ALICE, "app-id", "app-secret")
        sub = acc.inbox.subscribe_to_streaming()
        reader = StreamReader(oauth_account(emu, ALICE, "app-id", "app-secret").inbox, [sub]).start()
        wait_for(lambda: open_streams(emu) == 1)
        delivered = emu.deliver(ALICE, message("<oauth@customer.example>"))
        wait_for(lambda: reader.events("NewMailEvent"))
        item_id = reader.events("NewMailEvent")[0].item_id.id
        assert item_id == delivered["item_id"]
        fetched = next(iter(acc.fetch([(item_id, None)], only_fields=["message_id"])))
        assert fetched.message_id == "<oauth@customer.example>"


def test_oauth2_wrong_secret_gets_no_token(monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    with Emulator(accounts=[], oauth_clients=["app-id:app-secret"]) as emu:
        with pytest.raises(Exception) as info:
            oauth_account(emu, ALICE, "app-id", "not-the-secret").root.refresh()
        assert "invalid_client" in str(info.value)


def test_inbox_subscription_gets_created_newmail_and_modified_events(emulator):
    acc = account(emulator, ALICE)
    sub = acc.inbox.subscribe_to_streaming()
    reader = StreamReader(account(emulator, ALICE).inbox, [sub]).start()
    wait_for(lambda: open_streams(emulator) == 1)
    delivered = emulator.deliver(ALICE, message("<m2@customer.example>"))
    wait_for(lambda: len(reader.events()) >= 3)
    kinds = [type(e).__name__ for e in reader.events()]
    assert kinds == ["CreatedEvent", "NewMailEvent", "ModifiedEvent"]
    created, new_mail, modified = reader.events()
    assert created.item_id.id == new_mail.item_id.id == delivered["item_id"]
    assert new_mail.parent_folder_id.id == acc.inbox.id
    assert modified.folder_id.id == acc.inbox.id and modified.unread_count == 1
    assert reader.notifications[0].subscription_id == sub


def test_all_folders_subscription_sees_other_folders_and_moves(emulator):
    acc = account(emulator, ALICE)
    every = acc.subscribe_to_streaming()
    inbox_only = acc.inbox.subscribe_to_streaming()
    reader = StreamReader(account(emulator, ALICE).inbox, [every, inbox_only]).start()
    wait_for(lambda: open_streams(emulator) == 1)
    junk = emulator.deliver(ALICE, message("<junk@spam.example>"), folder="junkemail")
    wait_for(lambda: any(e.item_id and e.item_id.id == junk["item_id"] for e in reader.events("NewMailEvent")))
    inbox = emulator.deliver(ALICE, message("<moved@customer.example>"))

    def item_ids(sub):
        return {e.item_id.id for n in reader.notifications if n.subscription_id == sub for e in n.events
                if getattr(e, "item_id", None)}

    # both subscriptions saw the later inbox mail, so anything about the junk mail (which came
    # first, on the same stream) has arrived too: only the all-folders subscription had it
    wait_for(lambda: inbox["item_id"] in item_ids(inbox_only) and inbox["item_id"] in item_ids(every))
    assert junk["item_id"] in item_ids(every) and junk["item_id"] not in item_ids(inbox_only)
    moved = emulator.move(inbox["item_id"], "deleteditems")
    wait_for(lambda: reader.events("MovedEvent"))
    event = reader.events("MovedEvent")[0]
    assert event.old_item_id.id == inbox["item_id"] and event.item_id.id == moved["item_id"]
    assert event.old_parent_folder_id.id == acc.inbox.id


def test_getitem_returns_headers_exactly_as_delivered(emulator):
    raw = (b"Received: from mx.customer.example by mx.example.com;\r\n Thu, 26 Nov 2026 10:00:01 +0000\r\n"
           b"From: =?utf-8?q?Bj=C3=B6rn_Buyer?= <bjorn@customer.example>\r\n"
           b"Sender: Assistant <assist@customer.example>\r\n"
           b"To: Alice <alice@example.com>, carol@example.com\r\nCc: Dave <dave@example.com>\r\n"
           b"Subject: =?utf-8?q?Re:_Pr=C3=BCfung?=\r\nMessage-ID: <reply-1@customer.example>\r\n"
           b"In-Reply-To: <send-2@example.com>\r\n"
           b"References: <send-1@example.com>,\r\n <send-2@example.com>\r\n"
           b"Auto-Submitted: no\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\nBody text\r\n")
    delivered = emulator.deliver(ALICE, raw)
    acc = account(emulator, ALICE)
    fields = ["message_id", "in_reply_to", "references", "headers", "subject", "author", "sender",
              "to_recipients", "cc_recipients", "datetime_received", "conversation_id", "mime_content"]
    item = next(iter(acc.fetch([(delivered["item_id"], None)], only_fields=fields)))
    assert item.message_id == "<reply-1@customer.example>"
    assert item.in_reply_to == "<send-2@example.com>"
    assert item.references == "<send-1@example.com>, <send-2@example.com>"
    assert item.subject == "Re: Prüfung"
    assert (item.author.name, item.author.email_address) == ("Björn Buyer", "bjorn@customer.example")
    assert item.sender.email_address == "assist@customer.example"
    assert [m.email_address for m in item.to_recipients] == ["alice@example.com", "carol@example.com"]
    assert [(m.name, m.email_address) for m in item.cc_recipients] == [("Dave", "dave@example.com")]
    assert item.mime_content == raw
    assert item.datetime_received is not None and item.conversation_id.id
    headers = [(h.name, h.value) for h in item.headers]
    assert headers[0] == ("Received", "from mx.customer.example by mx.example.com; Thu, 26 Nov 2026 10:00:01 +0000")
    assert ("Auto-Submitted", "no") in headers
    assert ("Subject", "=?utf-8?q?Re:_Pr=C3=BCfung?=") in headers
    assert len(headers) == 11


def test_getitem_serves_raw_8bit_and_control_bytes_in_headers_as_text(emulator):
    """Unencoded 8-bit header bytes (UTF-8 or Latin-1) and control characters must not break
    the XML: Exchange returns them as text, and so do we."""
    raw = (b"From: \xc3\xa9l\xc3\xa8ve <utf8@customer.example>\r\nTo: alice@example.com\r\n"
           b"Subject: caf\xe9 \x01bell\r\nMessage-ID: <eight@customer.example>\r\n\r\nbody\r\n")
    delivered = emulator.deliver(ALICE, raw)
    item = next(iter(account(emulator, ALICE).fetch([(delivered["item_id"], None)],
                                                    only_fields=["subject", "author", "headers"])))
    assert item.author.email_address == "utf8@customer.example"
    headers = {h.name: h.value for h in item.headers}
    assert headers["From"] == "\u00e9l\u00e8ve <utf8@customer.example>"
    assert headers["Subject"].startswith("caf\u00e9 ") and headers["Subject"].endswith("bell")
    assert "\x01" not in headers["Subject"]


def test_getitem_of_unknown_id_is_item_not_found(emulator):
    from exchangelib.errors import ErrorItemNotFound

    acc = account(emulator, ALICE)
    fake = base64.b64encode(b"\0" * 68).decode()
    assert isinstance(next(iter(acc.fetch([(fake, None)], only_fields=["subject"]))), ErrorItemNotFound)


def test_sync_folder_items_catches_up_on_what_arrived_while_nobody_listened(emulator):
    acc = account(emulator, ALICE)
    emulator.deliver(ALICE, message("<before@customer.example>"))
    assert [c for c, _ in acc.inbox.sync_items()] == ["create"]
    state = acc.inbox.item_sync_state
    ids = [emulator.deliver(ALICE, message(f"<gap-{n}@customer.example>"))["item_id"] for n in range(5)]
    later = account(emulator, ALICE)
    changes = list(later.inbox.sync_items(sync_state=state, max_changes_returned=2, only_fields=["message_id"]))
    assert [(c, i.id) for c, i in changes] == [("create", i) for i in ids]
    assert [i.message_id for _, i in changes] == [f"<gap-{n}@customer.example>" for n in range(5)]
    assert list(later.inbox.sync_items(sync_state=later.inbox.item_sync_state)) == []


def test_sync_folder_items_reports_updates_deletes_and_read_flags(emulator):
    acc = account(emulator, ALICE)
    first = emulator.deliver(ALICE, message("<a@customer.example>"))["item_id"]
    second = emulator.deliver(ALICE, message("<b@customer.example>"))["item_id"]
    third = emulator.deliver(ALICE, message("<c@customer.example>"))["item_id"]
    fourth = emulator.deliver(ALICE, message("<d@customer.example>"))["item_id"]
    list(acc.inbox.sync_items())
    state = acc.inbox.item_sync_state
    emulator.mark_read(first)
    emulator.move(second, "deleteditems")
    emulator.touch(third)
    emulator.delete(fourth)
    changes = list(acc.inbox.sync_items(sync_state=state, only_fields=["message_id"]))
    assert changes[0][0] == "read_flag_change" and changes[0][1][0].id == first and changes[0][1][1] is True
    assert changes[1][0] == "delete" and changes[1][1].id == second
    assert changes[2][0] == "update" and changes[2][1].message_id == "<c@customer.example>"
    assert changes[3][0] == "delete" and changes[3][1].id == fourth
    assert len(changes) == 4


def test_bad_sync_state_is_invalid_sync_state_data(emulator):
    acc = account(emulator, ALICE)
    with pytest.raises(ErrorInvalidSyncStateData):
        list(acc.inbox.sync_items(sync_state="bm90LWEtc3RhdGU="))


def test_finditem_finds_by_message_id_and_pages(emulator):
    for n in range(7):
        emulator.deliver(ALICE, message(f"<page-{n}@customer.example>"))
    acc = account(emulator, ALICE)
    found = list(acc.inbox.filter(message_id="<page-3@customer.example>").only("message_id"))
    assert [m.message_id for m in found] == ["<page-3@customer.example>"]
    assert list(acc.inbox.filter(message_id="<nope@customer.example>")) == []
    query = acc.inbox.all().only("message_id")
    query.page_size = 3
    assert sorted(m.message_id for m in query) == sorted(f"<page-{n}@customer.example>" for n in range(7))


def test_unsubscribe_ends_the_subscription(emulator):
    acc = account(emulator, ALICE)
    sub = acc.inbox.subscribe_to_streaming()
    acc.inbox.unsubscribe(sub)
    with pytest.raises(ErrorSubscriptionNotFound):
        list(acc.inbox.get_streaming_events(sub, connection_timeout=1))


def test_subscription_belongs_to_the_account_that_made_it():
    with Emulator(accounts=["svc:svc-password", "other:other-password"]) as emu:
        sub = account(emu, ALICE).inbox.subscribe_to_streaming()
        stranger = account(emu, ALICE, user="other", password="other-password")
        with pytest.raises(ErrorSubscriptionAccessDenied):
            list(stranger.inbox.get_streaming_events(sub, connection_timeout=1))


def test_stream_closes_at_connection_timeout():
    extra = ["--connection-timeout-minute-seconds", "1.5"]
    with Emulator(heartbeat_seconds=0.3, extra_args=extra) as emu:
        acc = account(emu, ALICE)
        sub = acc.inbox.subscribe_to_streaming()
        started = time.monotonic()
        reader = StreamReader(acc.inbox, [sub]).start()
        reader.join(timeout=20)
        # closed by the server when the one "minute" (1.5 s) ran out, not before; heartbeats
        # in between yield nothing
        assert time.monotonic() - started >= 1.4
        assert reader.error is None and reader.notifications == []


def test_connection_timeout_outside_1_to_30_is_rejected(emulator):
    acc = account(emulator, ALICE)
    sub = acc.inbox.subscribe_to_streaming()
    with pytest.raises(ErrorInvalidArgument):
        list(acc.inbox.get_streaming_events(sub, connection_timeout=31))


def test_more_than_200_subscriptions_per_stream_are_rejected(emulator):
    acc = account(emulator, ALICE)
    sub = acc.inbox.subscribe_to_streaming()
    with pytest.raises(ErrorInvalidArgument):
        list(acc.inbox.get_streaming_events([sub] * 201, connection_timeout=1))


def test_idle_subscription_expires():
    with Emulator(idle_timeout=0.5) as emu:
        acc = account(emu, ALICE)
        sub = acc.inbox.subscribe_to_streaming()
        # nobody streaming: swept once idle past the timeout (the sweeper looks every 0.5 s)
        wait_for(lambda: emu.stats()["subscriptions"] == 0, timeout=2)
        with pytest.raises(ErrorSubscriptionNotFound):
            list(acc.inbox.get_streaming_events(sub, connection_timeout=1))


def test_connection_and_subscription_limits():
    extra = ["--max-streams-per-account", "1", "--max-subscriptions-per-mailbox", "2"]
    with Emulator(heartbeat_seconds=1, extra_args=extra) as emu:
        acc = account(emu, ALICE, max_connections=1)
        first, second = acc.inbox.subscribe_to_streaming(), acc.inbox.subscribe_to_streaming()
        with pytest.raises(ErrorExceededSubscriptionCount):
            acc.inbox.subscribe_to_streaming()
        reader = StreamReader(account(emu, ALICE).inbox, [first]).start()
        wait_for(lambda: open_streams(emu) == 1)
        with pytest.raises(ErrorExceededConnectionCount):
            list(acc.inbox.get_streaming_events(second, connection_timeout=1))
        assert reader.error is None and not reader.finished.is_set()


def test_operation_the_emulator_does_not_implement_is_a_soap_fault(emulator):
    acc = account(emulator, ALICE)
    with pytest.raises(ErrorInvalidOperation):
        Message(account=acc, folder=acc.drafts, subject="draft").save()


def test_overflowing_subscription_reports_missed_events():
    from exchangelib.errors import ErrorMissedNotificationEvents

    with Emulator(extra_args=["--max-queued-events", "5"]) as emu:
        acc = account(emu, ALICE)
        sub = acc.inbox.subscribe_to_streaming()
        for n in range(3):  # 9 events for a queue of 5, nobody listening
            emu.deliver(ALICE, message(f"<overflow-{n}@customer.example>"))
        with pytest.raises(ErrorMissedNotificationEvents) as info:
            list(acc.inbox.get_streaming_events(sub, connection_timeout=1))
        assert sub in str(info.value)
        with pytest.raises(ErrorSubscriptionNotFound):  # it is gone: resubscribe and resync
            list(acc.inbox.get_streaming_events(sub, connection_timeout=1))


def test_malformed_subscription_id_is_invalid_subscription(emulator):
    from exchangelib.errors import ErrorInvalidSubscription

    acc = account(emulator, ALICE)
    with pytest.raises(ErrorInvalidSubscription):
        list(acc.inbox.get_streaming_events("not-a-subscription-id", connection_timeout=1))


def test_reset_gives_back_a_fresh_emulator_in_the_same_process(emulator):
    """What the suite's shared emulator relies on: nothing of one test is left for the next."""
    pid = emulator.stats()["pid"]
    acc = account(emulator, ALICE)
    old_item = emulator.deliver(ALICE, message("<before-reset@customer.example>"))["item_id"]
    sub = acc.inbox.subscribe_to_streaming()
    reader = StreamReader(account(emulator, ALICE).inbox, [sub]).start()
    wait_for(lambda: open_streams(emulator) == 1)
    emulator.fault(kind="latency", ms=5_000)
    emulator.fault(kind="mailbox_error", mailbox=ALICE, code="ErrorAccessDenied", operations=["GetFolder"])

    assert emulator.reset() == {"reset": True, "streams_reset": 1}
    reader.join()  # the open stream was cut
    assert reader.error is not None
    stats = emulator.stats()
    assert stats["pid"] == pid
    assert (stats["streams"], stats["subscriptions"], stats["mailboxes"], stats["items"]) == (0, 0, 0, 0)
    assert stats["operations"] == {}
    fresh = account(emulator, ALICE)
    started = time.monotonic()
    assert fresh.inbox.total_count == 0  # no latency, no mailbox error, no mail
    assert time.monotonic() - started < 4
    from exchangelib.errors import ErrorItemNotFound

    assert isinstance(next(iter(fresh.fetch([(old_item, None)], only_fields=["subject"]))), ErrorItemNotFound)
    with pytest.raises(ErrorSubscriptionNotFound):
        list(fresh.inbox.get_streaming_events(sub, connection_timeout=1))


def test_reset_makes_the_started_with_mailboxes_again():
    with Emulator(mailboxes=[ALICE]) as emu:
        emu.deliver(ALICE, message("<gone@customer.example>"))
        emu.reset()
        assert (emu.stats()["mailboxes"], emu.stats()["items"]) == (1, 0)
        assert account(emu, ALICE).inbox.total_count == 0

