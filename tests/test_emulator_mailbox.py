"""The emulator as a real mailbox behaves, seen through unmodified exchangelib: nested user
folders, moves (new ids, MovedEvent), hard delete to Recoverable Items, purge, folder
hierarchy sync, non-mail folders, per-mailbox errors and a busy anchor mailbox."""
from __future__ import annotations

import urllib.error

import pytest
from ews_client import (
    StreamReader,
    account,
    create_folder,
    hard_delete,
    hook,
    message,
    open_streams,
    wait_for,
)
from exchangelib.errors import (
    ErrorAccessDenied,
    ErrorImpersonateUserDenied,
    ErrorInvalidSyncStateData,
    ErrorItemNotFound,
    ErrorMailboxMoveInProgress,
    ErrorNonExistentMailbox,
    ErrorServerBusy,
)
from exchangelib.folders import FolderCollection
from exchangelib.services import SyncFolderHierarchy

ALICE = "alice@example.com"
BOB = "bob@example.com"


def _all_folders_stream(emulator, mailbox=ALICE):
    sub = account(emulator, mailbox).subscribe_to_streaming()
    reader = StreamReader(account(emulator, mailbox).inbox, [sub]).start()
    wait_for(lambda: open_streams(emulator) == 1)
    return reader


def _fetch(acc, item_id, fields=("message_id", "parent_folder_id")):
    return next(iter(acc.fetch([(item_id, None)], only_fields=list(fields))))


def _find(folder, message_id):
    return [m.id for m in folder.filter(message_id=message_id).only("message_id")]


def test_move_into_a_nested_user_folder_gives_a_new_id_and_a_moved_event(emulator):
    delivered = emulator.deliver(ALICE, message("<nested@customer.example>"))
    reader = _all_folders_stream(emulator)
    moved = emulator.move(delivered["item_id"], "Customers/Acme/2026")
    assert moved["item_id"] != delivered["item_id"] and moved["folder"] == "Customers/Acme/2026"
    wait_for(lambda: reader.events("MovedEvent"))
    (event,) = reader.events("MovedEvent")
    acc = account(emulator, ALICE)
    assert event.old_item_id.id == delivered["item_id"] and event.item_id.id == moved["item_id"]
    assert event.old_parent_folder_id.id == acc.inbox.id
    assert event.parent_folder_id.id == moved["folder_id"]
    created = [e.folder_id.id for e in reader.events("CreatedEvent") if e.folder_id]
    assert len(created) == 3 and created[-1] == moved["folder_id"]  # Customers, Acme, 2026, created on demand
    fetched = _fetch(acc, moved["item_id"])
    assert fetched.message_id == "<nested@customer.example>" and fetched.parent_folder_id.id == moved["folder_id"]
    assert isinstance(_fetch(acc, delivered["item_id"]), ErrorItemNotFound)
    again = emulator.deliver(ALICE, message("<nested-2@customer.example>"), folder="Customers/Acme/2026")
    assert again["folder_id"] == moved["folder_id"]  # the same path is the same folder


def test_inbox_subfolder_is_a_child_of_the_inbox(emulator):
    acc = account(emulator, ALICE)
    folder = create_folder(emulator, ALICE, "Inbox/Follow-up")
    assert folder["created"] and folder["path"] == "inbox/Follow-up"
    changes = {f.id: f for _, f in acc.msg_folder_root.sync_hierarchy()}
    assert changes[folder["folder_id"]].parent_folder_id.id == acc.inbox.id
    assert create_folder(emulator, ALICE, "inbox/follow-up")["created"] is False  # names are case-insensitive


def test_move_to_deleted_items_is_found_there_by_message_id(emulator):
    delivered = emulator.deliver(ALICE, message("<trashed@customer.example>"))
    moved = emulator.move(delivered["item_id"], "deleteditems")
    acc = account(emulator, ALICE)
    assert moved["folder_id"] == acc.trash.id
    assert _find(acc.trash, "<trashed@customer.example>") == [moved["item_id"]]
    assert _find(acc.inbox, "<trashed@customer.example>") == []


def test_hard_delete_moves_to_recoverable_items_with_exchanges_events(emulator):
    acc = account(emulator, ALICE)
    delivered = emulator.deliver(ALICE, message("<shift-deleted@customer.example>"))
    list(acc.inbox.sync_items())
    inbox_state = acc.inbox.item_sync_state
    deletions = acc.recoverable_items_deletions
    list(deletions.sync_items())
    deletions_state = deletions.item_sync_state
    reader = _all_folders_stream(emulator)

    result = hard_delete(emulator, delivered["item_id"])

    assert result["deleted"] is True and result["purged"] is False
    assert result["folder"] == "recoverableitemsdeletions" and result["folder_id"] == deletions.id
    new_id = result["item_id"]
    assert new_id != delivered["item_id"]
    wait_for(lambda: reader.events("DeletedEvent"))
    kinds = [type(e).__name__ for e in reader.events()]
    assert kinds == ["MovedEvent", "ModifiedEvent", "DeletedEvent"]
    moved, modified, deleted = reader.events()
    assert (moved.old_item_id.id, moved.item_id.id) == (delivered["item_id"], new_id)
    assert (moved.old_parent_folder_id.id, moved.parent_folder_id.id) == (acc.inbox.id, deletions.id)
    assert modified.folder_id.id == acc.inbox.id and modified.unread_count == 0
    assert (deleted.item_id.id, deleted.parent_folder_id.id) == (delivered["item_id"], acc.inbox.id)
    # "find the message again by its InternetMessageId": only in Recoverable Items
    assert _find(deletions, "<shift-deleted@customer.example>") == [new_id]
    assert _find(acc.inbox, "<shift-deleted@customer.example>") == []
    assert _find(acc.trash, "<shift-deleted@customer.example>") == []
    assert [(c, i.id) for c, i in acc.inbox.sync_items(sync_state=inbox_state)] == [("delete", delivered["item_id"])]
    assert [(c, i.id) for c, i in deletions.sync_items(sync_state=deletions_state)] == [("create", new_id)]
    assert _fetch(acc, new_id).message_id == "<shift-deleted@customer.example>"


def test_purge_leaves_the_message_nowhere(emulator):
    acc = account(emulator, ALICE)
    delivered = emulator.deliver(ALICE, message("<purged@customer.example>"))
    reader = _all_folders_stream(emulator)
    result = hard_delete(emulator, delivered["item_id"], purge=True)
    assert result == {"deleted": True, "purged": True, "item_id": None, "folder": None, "folder_id": None}
    wait_for(lambda: reader.events("DeletedEvent"))
    assert [type(e).__name__ for e in reader.events()] == ["DeletedEvent"]
    everywhere = FolderCollection(account=acc, folders=[acc.inbox, acc.junk, acc.trash,
                                                        acc.recoverable_items_deletions])
    assert list(everywhere.filter(message_id="<purged@customer.example>")) == []
    assert isinstance(_fetch(acc, delivered["item_id"]), ErrorItemNotFound)


def test_one_finditem_searches_several_folders_including_recoverable_items(emulator):
    acc = account(emulator, ALICE)
    kept = emulator.deliver(ALICE, message("<twice@customer.example>"))
    removed = emulator.deliver(ALICE, message("<twice@customer.example>"), folder="Archive/Old")
    in_dumpster = hard_delete(emulator, removed["item_id"])["item_id"]
    everywhere = FolderCollection(account=acc, folders=[acc.inbox, acc.trash, acc.recoverable_items_deletions])
    found = {m.id for m in everywhere.filter(message_id="<twice@customer.example>").only("message_id")}
    assert found == {kept["item_id"], in_dumpster}


def test_hard_delete_of_an_item_already_in_recoverable_items_purges_it(emulator):
    delivered = emulator.deliver(ALICE, message("<twice-deleted@customer.example>"))
    first = hard_delete(emulator, delivered["item_id"])
    assert hard_delete(emulator, first["item_id"])["purged"] is True
    acc = account(emulator, ALICE)
    assert _find(acc.recoverable_items_deletions, "<twice-deleted@customer.example>") == []


def test_recoverable_items_are_outside_the_ipm_subtree(emulator):
    acc = account(emulator, ALICE)
    deletions = acc.recoverable_items_deletions
    assert deletions.name == "Deletions"
    assert deletions.parent_folder_id.id == acc.recoverable_items_root.id
    assert acc.recoverable_items_root.parent_folder_id.id == acc.root.id
    names = {f.name for _, f in acc.msg_folder_root.sync_hierarchy()}
    assert {"Inbox", "Calendar", "Contacts", "Tasks", "Notes", "Deleted Items"} <= names
    assert not names & {"Deletions", "Recoverable Items"}


def test_non_mail_folders_answer_get_folder_with_their_class(emulator):
    acc = account(emulator, ALICE)
    assert (acc.calendar.folder_class, acc.contacts.folder_class) == ("IPF.Appointment", "IPF.Contact")
    assert (acc.tasks.folder_class, acc.notes.folder_class) == ("IPF.Task", "IPF.StickyNote")
    assert acc.calendar.parent_folder_id.id == acc.msg_folder_root.id


def test_folder_hierarchy_sync_reports_only_what_changed_since_a_stored_state(emulator):
    acc = account(emulator, ALICE)
    first = list(acc.msg_folder_root.sync_hierarchy())
    assert all(change == "create" for change, _ in first) and len(first) == 10
    state = acc.msg_folder_root.folder_sync_state

    clients = create_folder(emulator, ALICE, "Clients/Acme")
    team = create_folder(emulator, ALICE, "Team calendar", "IPF.Appointment")
    # a process restarted from the stored state: a fresh Account, the state from storage
    later = account(emulator, ALICE)
    svc = SyncFolderHierarchy(account=later)
    delta = list(svc.call(folder=later.msg_folder_root, shape="IdOnly", additional_fields=None, sync_state=state))
    assert svc.includes_last_item_in_range is True
    by_name = {f.name: f for _, f in delta}
    assert [c for c, _ in delta] == ["create"] * 3 and set(by_name) == {"Clients", "Acme", "Team calendar"}
    assert by_name["Acme"].id == clients["folder_id"]
    assert by_name["Acme"].parent_folder_id.id == by_name["Clients"].id
    assert by_name["Clients"].parent_folder_id.id == later.msg_folder_root.id
    assert (by_name["Team calendar"].id, by_name["Team calendar"].folder_class) == (team["folder_id"],
                                                                                    "IPF.Appointment")
    second = svc.sync_state
    assert list(svc.call(folder=later.msg_folder_root, shape="IdOnly", additional_fields=None,
                         sync_state=second)) == []

    hook(emulator, "DELETE", "/emulator/mailboxes/alice@example.com/folders?path=Clients")
    gone = list(svc.call(folder=later.msg_folder_root, shape="IdOnly", additional_fields=None, sync_state=second))
    assert sorted((c, f.id) for c, f in gone) == sorted([("delete", clients["folder_id"]),
                                                         ("delete", by_name["Clients"].id)])


def test_bad_hierarchy_sync_state_is_invalid_sync_state_data(emulator):
    acc = account(emulator, ALICE)
    list(acc.inbox.sync_hierarchy())
    inbox_state = acc.inbox.folder_sync_state
    with pytest.raises(ErrorInvalidSyncStateData):
        list(acc.msg_folder_root.sync_hierarchy(sync_state="bm90LWEtc3RhdGU="))
    with pytest.raises(ErrorInvalidSyncStateData):  # a state belongs to the folder it was made for
        list(acc.msg_folder_root.sync_hierarchy(sync_state=inbox_state))


def test_creating_a_folder_tells_the_parents_subscribers(emulator):
    acc = account(emulator, ALICE)
    sub = acc.inbox.subscribe_to_streaming()
    reader = StreamReader(account(emulator, ALICE).inbox, [sub]).start()
    wait_for(lambda: open_streams(emulator) == 1)
    created = create_folder(emulator, ALICE, "Inbox/Rules")
    wait_for(lambda: reader.events("CreatedEvent"))
    (event,) = reader.events("CreatedEvent")
    assert event.folder_id.id == created["folder_id"] and event.parent_folder_id.id == acc.inbox.id


def test_delivery_into_the_calendar_is_not_new_mail(emulator):
    reader = _all_folders_stream(emulator)
    invite = emulator.deliver(ALICE, message("<invite@customer.example>", subject="Meeting"), folder="calendar")
    mail = emulator.deliver(ALICE, message("<mail@customer.example>"))
    wait_for(lambda: reader.events("NewMailEvent"))  # the inbox mail came after the invite: all is in
    assert [e.item_id.id for e in reader.events("NewMailEvent")] == [mail["item_id"]]
    assert invite["item_id"] in [e.item_id.id for e in reader.events("CreatedEvent") if e.item_id]
    acc = account(emulator, ALICE)
    assert any(e.folder_id and e.folder_id.id == acc.calendar.id for e in reader.events("ModifiedEvent"))
    item = _fetch(acc, invite["item_id"], fields=("item_class", "subject", "parent_folder_id"))
    assert type(item).__name__ == "Item" and item.item_class == "IPM.Appointment"
    assert item.subject == "Meeting" and item.parent_folder_id.id == acc.calendar.id


@pytest.mark.parametrize("code, error", [
    ("ErrorImpersonateUserDenied", ErrorImpersonateUserDenied),
    ("ErrorNonExistentMailbox", ErrorNonExistentMailbox),
    ("ErrorMailboxMoveInProgress", ErrorMailboxMoveInProgress),
    ("ErrorAccessDenied", ErrorAccessDenied),
])
def test_mailbox_error_fails_only_that_mailbox(emulator, code, error):
    emulator.fault(kind="mailbox_error", mailbox=BOB, code=code)
    with pytest.raises(error):
        account(emulator, BOB).subscribe_to_streaming()
    with pytest.raises(error):
        account(emulator, BOB).inbox.refresh()  # GetFolder
    assert account(emulator, ALICE).subscribe_to_streaming()
    emulator.fault(kind="clear_mailbox_error", mailbox=BOB)
    assert account(emulator, BOB).subscribe_to_streaming()


def test_mailbox_error_on_chosen_operations_only(emulator):
    item = emulator.deliver(BOB, message("<bob@customer.example>"))["item_id"]
    emulator.fault(kind="mailbox_error", mailbox=BOB, code="ErrorMailboxMoveInProgress",
                   operations=["GetItem", "SyncFolderItems"])
    acc = account(emulator, BOB)
    assert acc.subscribe_to_streaming()
    with pytest.raises(ErrorMailboxMoveInProgress):  # exchangelib raises this one rather than return it
        _fetch(acc, item)
    with pytest.raises(ErrorMailboxMoveInProgress):
        list(acc.inbox.sync_items())


def test_unknown_mailbox_error_code_is_refused(emulator):
    with pytest.raises(urllib.error.HTTPError) as info:
        emulator.fault(kind="mailbox_error", mailbox=BOB, code="ErrorSomethingElse")
    assert info.value.code == 400


def test_busy_anchor_refuses_only_requests_anchored_on_it(emulator):
    bob, alice = account(emulator, BOB), account(emulator, ALICE)
    emulator.fault(kind="server_busy", anchor=BOB, count=-1, back_off_ms=2500)
    for _ in range(3):
        with pytest.raises(ErrorServerBusy) as info:
            bob.subscribe_to_streaming()
        assert info.value.back_off == 2.5
    assert alice.subscribe_to_streaming()
    emulator.fault(kind="server_busy", anchor=BOB, count=0)
    assert bob.subscribe_to_streaming()

    emulator.fault(kind="server_busy", anchor=BOB, count=2, back_off_ms=100)
    for _ in range(2):
        with pytest.raises(ErrorServerBusy):
            bob.subscribe_to_streaming()
    assert bob.subscribe_to_streaming()  # only N refusals
