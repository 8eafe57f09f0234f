"""The emulator's state, in memory: mailboxes, folders, items, subscriptions and their events.

Nothing here knows about HTTP or XML. Ids are opaque base64 strings like real EWS ids; the
store maps them back to objects. Every change to a folder's items is appended to that folder's
change log (what SyncFolderItems states point into); every change to the folder tree is
appended to the mailbox's hierarchy log (what SyncFolderHierarchy states point into); every
change also becomes events on the subscriptions that cover the folder.

User folders are addressed by a path of display names separated by ``/`` (``Projects/Acme``);
the first segment may also be a distinguished name (``inbox/Sub``). Top-level user folders sit
under msgfolderroot, beside the inbox.
"""
from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import hashlib
import itertools
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry
from email.parser import BytesParser
from email.utils import getaddresses

DISTINGUISHED = {
    # name: (display name, parent distinguished name, folder class)
    "root": ("Top of Information Store", None, None),
    "msgfolderroot": ("Top of Information Store", "root", "IPF.Note"),
    "inbox": ("Inbox", "msgfolderroot", "IPF.Note"),
    "junkemail": ("Junk Email", "msgfolderroot", "IPF.Note"),
    "sentitems": ("Sent Items", "msgfolderroot", "IPF.Note"),
    "deleteditems": ("Deleted Items", "msgfolderroot", "IPF.Note"),
    "drafts": ("Drafts", "msgfolderroot", "IPF.Note"),
    "outbox": ("Outbox", "msgfolderroot", "IPF.Note"),
    "calendar": ("Calendar", "msgfolderroot", "IPF.Appointment"),
    "contacts": ("Contacts", "msgfolderroot", "IPF.Contact"),
    "tasks": ("Tasks", "msgfolderroot", "IPF.Task"),
    "notes": ("Notes", "msgfolderroot", "IPF.StickyNote"),
    # the dumpster: outside the IPM subtree, so no client's folder view shows it
    "recoverableitemsroot": ("Recoverable Items", "root", None),
    "recoverableitemsdeletions": ("Deletions", "recoverableitemsroot", None),
}
DELETIONS = "recoverableitemsdeletions"
# the item class a folder's content has, by folder class (what GetItem reports)
ITEM_CLASSES = {"IPF.Appointment": "IPM.Appointment", "IPF.Contact": "IPM.Contact", "IPF.Task": "IPM.Task",
                "IPF.StickyNote": "IPM.StickyNote"}
EVENTS_PER_NOTIFICATION = 50
SUBSCRIPTION_PREFIX = b"\x1c\x00"


class StoreError(Exception):
    """An EWS error: ``code`` is the ResponseCode the client receives."""

    def __init__(self, code: str, text: str):
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


def _opaque(prefix: bytes, size: int = 32) -> str:
    return base64.b64encode(prefix + os.urandom(size)).decode()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


_FOLD = re.compile(r"\r?\n(?=[ \t])")
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def unfold(value: str) -> str:
    """A header value as Exchange reports it: line folds removed, leading space stripped."""
    return _XML_BAD.sub("", _FOLD.sub("", value)).strip()


def decoded(value: str) -> str:
    try:
        return unfold(str(make_header(decode_header(unfold(value)))))
    except (LookupError, ValueError):  # undecodable encoded-words: keep them raw, lose nothing
        return unfold(value)


@dataclass
class Folder:
    id: str
    mailbox: str
    name: str  # distinguished name or display name
    display_name: str
    parent_id: str | None
    folder_class: str | None
    distinguished: bool
    change_key: str = field(default_factory=lambda: _opaque(b"\x01\x00\x00\x00", 12))
    items: dict = field(default_factory=dict)  # item id -> Item, in arrival order
    changes: list = field(default_factory=list)  # (seq, kind, item_id, is_read)
    path: str = ""  # user folders: display names from msgfolderroot (or a distinguished top), "/"-joined

    @property
    def is_mail(self) -> bool:
        """Mail arriving here is new mail (NewMailEvent); calendar, contacts, tasks, notes are not."""
        return (self.folder_class or "").startswith("IPF.Note")

    @property
    def unread(self) -> int:
        return sum(1 for item in self.items.values() if not item.is_read)


def _header_text(value: str) -> str:
    """A header value as text: raw 8-bit bytes read as UTF-8, else Latin-1 (as Exchange does)."""
    raw = value.encode("ascii", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _ParsedHeaders(HeaderRegistry):
    """policy.default parses a part's Content-Type anew on every get(), ~16 times per message.
    A parsed header is a pure function of (name, value) and nothing here changes one, so each
    distinct pair is parsed once (bounded: a full cache is simply emptied)."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit
        self.parsed: dict = {}

    def __call__(self, name, value):
        key = (name, value)
        header = self.parsed.get(key)
        if header is None:
            if len(self.parsed) >= self.limit:
                self.parsed.clear()
            header = self.parsed[key] = super().__call__(name, value)
        return header


BODY_POLICY = email.policy.default.clone(header_factory=_ParsedHeaders())


def store_safe(text: str) -> str:
    return "".join(c for c in text if c in "\t\n\r" or ord(c) >= 0x20)


@dataclass
class Item:
    """A delivered message. ``raw``, ``mailbox``, ``received`` and ``item_class`` never change, so
    everything parsed from them is worked out once, on first use; only ``id``, ``change_key``,
    ``folder_id`` and ``is_read`` change (moves, read flags, touch)."""

    id: str
    mailbox: str
    folder_id: str
    raw: bytes
    received: dt.datetime
    is_read: bool = False
    change_key: str = field(default_factory=lambda: _opaque(b"\x16\x00\x00\x00", 12))
    item_class: str = "IPM.Note"  # set from the folder it was delivered to; a move keeps it
    _headers: list | None = field(default=None, repr=False, compare=False)
    _by_name: dict | None = field(default=None, repr=False, compare=False)  # lower-cased name -> [raw values]
    _addresses: dict = field(default_factory=dict, repr=False, compare=False)
    _subject: str | None = field(default=None, repr=False, compare=False)
    _body: tuple | None = field(default=None, repr=False, compare=False)  # (BodyType, text)
    _attached: bool | None = field(default=None, repr=False, compare=False)
    # XML of fields built only from the parts above that never change, by FieldURI (soap.item_xml fills it)
    rendered: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def headers(self) -> list[tuple[str, str]]:
        """(name, raw value) pairs in message order, parsed once (the header block only: the body
        is not needed for them)."""
        if self._headers is None:
            msg = BytesParser(policy=email.policy.compat32).parsebytes(self.raw, headersonly=True)
            self._headers = [(name, _header_text(str(value))) for name, value in msg.raw_items()]
        return self._headers

    def _values(self, name: str) -> list[str]:
        if self._by_name is None:
            by_name: dict[str, list[str]] = {}
            for key, value in self.headers:
                by_name.setdefault(key.lower(), []).append(value)
            self._by_name = by_name
        return self._by_name.get(name.lower(), [])

    def header(self, name: str) -> str | None:
        values = self._values(name)
        return values[0] if values else None

    def addresses(self, name: str) -> list[tuple[str, str]]:
        """(display name, address) pairs of an address header, names decoded."""
        key = name.lower()
        found = self._addresses.get(key)
        if found is None:
            values = self._values(key)
            found = self._addresses[key] = [(decoded(n), a) for n, a in getaddresses([unfold(v) for v in values])
                                            if a or n]
        return list(found)

    @property
    def subject(self) -> str:
        if self._subject is None:
            value = self.header("Subject")
            self._subject = decoded(value) if value is not None else ""
        return self._subject

    @property
    def body(self) -> tuple[str, str]:
        """(BodyType, content) of the message's main text part."""
        if self._body is None:
            msg = email.message_from_bytes(self.raw, policy=BODY_POLICY)
            part = msg.get_body(preferencelist=("plain", "html"))
            if part is None:
                self._body = ("Text", "")
            else:
                try:
                    content = part.get_content()
                except (LookupError, ValueError):  # unknown charset or undecodable payload
                    content = ""
                self._body = ("HTML" if part.get_content_subtype() == "html" else "Text"), store_safe(content)
        return self._body

    @property
    def has_attachments(self) -> bool:
        if self._attached is None:
            msg = email.message_from_bytes(self.raw, policy=BODY_POLICY)
            self._attached = any(True for _ in msg.iter_attachments()) if msg.is_multipart() else False
        return self._attached

    @property
    def conversation_id(self) -> str:
        topic = re.sub(r"^((re|fw|fwd|aw|wg|sv|tr)\s*:\s*)+", "", self.subject, flags=re.IGNORECASE).strip().lower()
        digest = hashlib.sha256(f"{self.mailbox}\0{topic}".encode()).digest()
        return base64.b64encode(b"\x00\x00\x00\x00" + digest[:16]).decode()


@dataclass
class Event:
    kind: str  # CreatedEvent, NewMailEvent, ModifiedEvent, MovedEvent, DeletedEvent
    watermark: str
    timestamp: dt.datetime
    item_id: str | None
    folder_id: str | None
    parent_folder_id: str
    old_item_id: str | None = None
    old_parent_folder_id: str | None = None
    unread_count: int | None = None


@dataclass
class Subscription:
    id: str
    owner: str  # the authenticated principal that created it
    mailbox: str
    folder_ids: frozenset | None  # None = all folders
    event_types: frozenset
    created: float = field(default_factory=time.monotonic)
    idle_since: float | None = field(default_factory=time.monotonic)  # None while a stream holds it
    queue: deque = field(default_factory=deque)
    stream: object | None = None  # the Stream currently delivering it
    missed: bool = False  # its queue overflowed: the client must resubscribe and resync

    def covers(self, folder_id: str) -> bool:
        return self.folder_ids is None or folder_id in self.folder_ids


def _looks_like_subscription_id(sub_id: str) -> bool:
    try:
        raw = base64.b64decode(sub_id, validate=True)
    except ValueError:
        return False
    return raw.startswith(SUBSCRIPTION_PREFIX) and len(raw) == len(SUBSCRIPTION_PREFIX) + 40


class Store:
    """Mailboxes, folders, items, subscriptions. Single-threaded (one asyncio loop) by design."""

    def __init__(self, *, idle_timeout: float = 300.0, max_subscriptions_per_mailbox: int = 0,
                 max_queued_events: int = 10_000):
        self.idle_timeout = idle_timeout
        self.max_queued_events = max_queued_events
        self.max_subscriptions_per_mailbox = max_subscriptions_per_mailbox
        self.mailboxes: dict[str, dict[str, Folder]] = {}  # address -> {distinguished name: Folder}
        self.folders: dict[str, Folder] = {}
        self.items: dict[str, Item] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.by_mailbox: dict[str, dict[str, Subscription]] = {}
        self.hierarchy_log: dict[str, list] = {}  # address -> [(seq, kind, Folder, ancestor ids)]
        self._seq = itertools.count(1)
        self._watermarks = itertools.count(1)
        self.on_event = None  # callback(subscription) when events were queued

    # -- mailboxes and folders -------------------------------------------------------------
    def mailbox(self, address: str, create: bool = True) -> dict[str, Folder]:
        """{key: Folder} of a mailbox: distinguished names, and lower-cased paths of user folders."""
        key = address.strip().lower()
        folders = self.mailboxes.get(key)
        if folders is None:
            if not create:
                raise StoreError("ErrorNonExistentMailbox", f"No mailbox with such guid or address: {address}")
            folders = {}
            for name, (display, parent, cls) in DISTINGUISHED.items():
                folder = Folder(id=_opaque(b"\x00\x00\x00\x01", 40), mailbox=key, name=name, display_name=display,
                                parent_id=folders[parent].id if parent else None, folder_class=cls, distinguished=True)
                folders[name] = folder
                self.folders[folder.id] = folder
            self.mailboxes[key] = folders
            self.hierarchy_log[key] = []
        return folders

    def folder(self, address: str, name: str, create_user_folder: bool = False,
               folder_class: str = "IPF.Note") -> Folder:
        """A folder by distinguished name or path (``Parent/Child``); missing user folders on demand."""
        folders = self.mailbox(address)
        key = name.strip().lower()
        if key in folders:
            return folders[key]
        segments = [part.strip() for part in name.strip().strip("/").split("/")]
        if not all(segments):
            raise StoreError("ErrorFolderNotFound", f"The folder path has an empty segment: {name!r}")
        parent = folders["msgfolderroot"]
        first = segments[0].lower()
        if first in folders and folders[first].distinguished:
            parent, segments = folders[first], segments[1:]
        for n, segment in enumerate(segments):
            child = next((f for f in self.children(parent) if f.display_name.lower() == segment.lower()), None)
            if child is None:
                if not create_user_folder:
                    raise StoreError("ErrorFolderNotFound", f"The specified folder could not be found: {name}")
                cls = folder_class if n == len(segments) - 1 else "IPF.Note"
                child = self._new_folder(parent, segment, cls)
            parent = child
        return parent

    def _new_folder(self, parent: Folder, display_name: str, folder_class: str) -> Folder:
        """A user folder under ``parent``: logged for SyncFolderHierarchy, CreatedEvent for the parent's subscribers."""
        path = display_name if parent.name == "msgfolderroot" else f"{parent.path or parent.name}/{display_name}"
        folder = Folder(id=_opaque(b"\x00\x00\x00\x01", 40), mailbox=parent.mailbox, name=path,
                        display_name=display_name, parent_id=parent.id, folder_class=folder_class,
                        distinguished=False, path=path)
        self.mailboxes[parent.mailbox][path.lower()] = folder
        self.folders[folder.id] = folder
        self._log_folder(folder, "Create")
        self._emit(parent, [Event("CreatedEvent", "", utcnow(), None, folder.id, parent.id)])
        return folder

    def create_folder(self, address: str, path: str, folder_class: str = "IPF.Note") -> tuple[Folder, bool]:
        """(folder, created?) for a user folder path; intermediate folders are mail folders."""
        try:
            return self.folder(address, path), False
        except StoreError:
            return self.folder(address, path, create_user_folder=True, folder_class=folder_class), True

    def delete_folder(self, address: str, path: str) -> Folder:
        """Hard-delete a user folder with its subfolders and items (DeletedEvent for the folder)."""
        folder = self.folder(address, path)
        if folder.distinguished:
            raise StoreError("ErrorDeleteDistinguishedFolder", "Distinguished folders cannot be deleted.")
        parent = self.folders[folder.parent_id]
        for gone in reversed([folder, *self.subtree(folder)]):  # children first, as their parents still exist
            self._log_folder(gone, "Delete")
            for item_id in list(gone.items):
                self.items.pop(item_id, None)
            self.folders.pop(gone.id, None)
            self.mailboxes[gone.mailbox].pop(gone.path.lower(), None)
        self._emit(parent, [Event("DeletedEvent", "", utcnow(), None, folder.id, parent.id)])
        return folder

    def folder_by_id(self, folder_id: str) -> Folder:
        folder = self.folders.get(folder_id)
        if folder is None:
            raise StoreError("ErrorFolderNotFound", "The specified folder could not be found in the store.")
        return folder

    def children(self, folder: Folder) -> list[Folder]:
        return [f for f in self.mailboxes[folder.mailbox].values() if f.parent_id == folder.id]

    def subtree(self, folder: Folder) -> list[Folder]:
        """Every folder below ``folder``, parents before their children."""
        found, queue = [], deque(self.children(folder))
        while queue:
            child = queue.popleft()
            found.append(child)
            queue.extend(self.children(child))
        return found

    def ancestors(self, folder: Folder) -> frozenset[str]:
        ids, parent_id = set(), folder.parent_id
        while parent_id:
            ids.add(parent_id)
            parent_id = self.folders[parent_id].parent_id
        return frozenset(ids)

    # -- items -------------------------------------------------------------------------------
    def item(self, item_id: str) -> Item:
        item = self.items.get(item_id)
        if item is None:
            raise StoreError("ErrorItemNotFound", "The specified object was not found in the store.")
        return item

    def deliver(self, address: str, raw: bytes, folder_name: str = "inbox") -> Item:
        """New mail in a mail folder: Created + NewMail + Modified(folder); elsewhere no NewMail."""
        folder = self.folder(address, folder_name, create_user_folder=True)
        item = Item(id=_opaque(b"\x00\x00\x00\x00", 64), mailbox=folder.mailbox, folder_id=folder.id, raw=raw,
                    received=utcnow(), item_class=ITEM_CLASSES.get(folder.folder_class or "", "IPM.Note"))
        folder.items[item.id] = item
        self.items[item.id] = item
        folder.changes.append((next(self._seq), "Create", item.id, False))
        now = utcnow()
        events = [Event("CreatedEvent", "", now, item.id, None, folder.id)]
        if folder.is_mail:
            events.append(Event("NewMailEvent", "", now, item.id, None, folder.id))
        events.append(Event("ModifiedEvent", "", now, None, folder.id, folder.parent_id or folder.id,
                            unread_count=folder.unread))
        self._emit(folder, events)
        return item

    def _relocate(self, item: Item, target: Folder) -> tuple[str, Folder]:
        """Move an item to ``target`` under a new id (as EWS does); returns (old id, source folder)."""
        source = self.folders[item.folder_id]
        del source.items[item.id]
        del self.items[item.id]
        old_id = item.id
        item.id = _opaque(b"\x00\x00\x00\x00", 64)
        item.folder_id = target.id
        target.items[item.id] = item
        self.items[item.id] = item
        source.changes.append((next(self._seq), "Delete", old_id, item.is_read))
        target.changes.append((next(self._seq), "Create", item.id, item.is_read))
        return old_id, source

    def _folder_modified(self, folder: Folder, when: dt.datetime) -> Event:
        return Event("ModifiedEvent", "", when, None, folder.id, folder.parent_id or folder.id,
                     unread_count=folder.unread)

    def move(self, item_id: str, folder_name: str) -> Item:
        """A user's move: MovedEvent (new id, OldItemId, OldParentFolderId), Modified for both folders."""
        item = self.item(item_id)
        target = self.folder(item.mailbox, folder_name, create_user_folder=True)
        if target.id == item.folder_id:
            return item
        old_id, source = self._relocate(item, target)
        now = utcnow()
        moved = Event("MovedEvent", "", now, item.id, None, target.id, old_item_id=old_id, old_parent_folder_id=source.id)
        self._emit_many([(source, moved), (target, moved)])
        self._emit(source, [self._folder_modified(source, now)])
        self._emit(target, [self._folder_modified(target, now)])
        return item

    def hard_delete(self, item_id: str) -> Item | None:
        """Shift-delete: the item goes to Recoverable Items\\Deletions under a new id; None if purged.

        Events follow Microsoft's table for Exchange Online / 2013 with an all-folders
        subscription: MovedEvent (old and new parent), ModifiedEvent for the old parent,
        DeletedEvent for the item. An item already in Deletions is purged instead.
        """
        item = self.item(item_id)
        deletions = self.mailbox(item.mailbox)[DELETIONS]
        if item.folder_id == deletions.id:
            self.purge(item_id)
            return None
        old_id, source = self._relocate(item, deletions)
        now = utcnow()
        moved = Event("MovedEvent", "", now, item.id, None, deletions.id, old_item_id=old_id,
                      old_parent_folder_id=source.id)
        self._emit_many([(source, moved), (deletions, moved)])
        self._emit(source, [self._folder_modified(source, now),
                            Event("DeletedEvent", "", now, old_id, None, source.id)])
        return item

    def set_read(self, item_id: str, is_read: bool) -> Item:
        item = self.item(item_id)
        if item.is_read != is_read:
            item.is_read = is_read
            item.change_key = _opaque(b"\x16\x00\x00\x00", 12)
            folder = self.folders[item.folder_id]
            folder.changes.append((next(self._seq), "ReadFlagChange", item.id, is_read))
            self._emit(folder, [Event("ModifiedEvent", "", utcnow(), item.id, None, folder.id)])
        return item

    def touch(self, item_id: str) -> Item:
        """The item changed in place (e.g. a flag or category): an Update for sync, a ModifiedEvent."""
        item = self.item(item_id)
        item.change_key = _opaque(b"\x16\x00\x00\x00", 12)
        folder = self.folders[item.folder_id]
        folder.changes.append((next(self._seq), "Update", item.id, item.is_read))
        self._emit(folder, [Event("ModifiedEvent", "", utcnow(), item.id, None, folder.id)])
        return item

    def purge(self, item_id: str) -> None:
        """Gone from the mailbox entirely (also from Recoverable Items): a DeletedEvent only."""
        item = self.item(item_id)
        folder = self.folders[item.folder_id]
        del folder.items[item.id]
        del self.items[item.id]
        folder.changes.append((next(self._seq), "Delete", item.id, item.is_read))
        self._emit(folder, [Event("DeletedEvent", "", utcnow(), item.id, None, folder.id)])

    def find(self, folder: Folder, message_id: str | None = None) -> list[Item]:
        """Items of a folder, newest first; optionally only those with this Internet Message-ID."""
        items = list(reversed(folder.items.values()))
        if message_id is not None:
            items = [i for i in items if unfold(i.header("Message-ID") or "") == message_id.strip()]
        return items

    # -- SyncFolderHierarchy -----------------------------------------------------------------
    def _log_folder(self, folder: Folder, kind: str) -> None:
        self.hierarchy_log[folder.mailbox].append((next(self._seq), kind, folder, self.ancestors(folder)))

    def sync_hierarchy(self, root: Folder, state: str | None) -> tuple[list[tuple[str, Folder]], str]:
        """Folder changes below ``root`` since ``state``: ([(Create|Update|Delete, Folder)], new state).

        No state: every folder below ``root`` as a Create, parents first. A state names its
        root folder; one from another folder or mailbox is ErrorInvalidSyncStateData.
        """
        log = self.hierarchy_log[root.mailbox]
        mark = log[-1][0] if log else 0
        if not state:
            return [("Create", f) for f in self.subtree(root)], self._hierarchy_state(root, mark)
        since = self._parse_hierarchy_state(root, state)
        merged: dict[str, tuple[str, Folder]] = {}
        for seq, kind, folder, ancestors in log:
            if seq <= since or root.id not in ancestors:
                continue
            previous = merged.get(folder.id)
            if previous and previous[0] == "Create" and kind == "Delete":
                del merged[folder.id]  # came and went between two syncs: nothing to tell
            elif previous and previous[0] == "Create":
                pass
            else:
                merged[folder.id] = (kind, folder)
        return list(merged.values()), self._hierarchy_state(root, max(mark, since))

    @staticmethod
    def _hierarchy_state(root: Folder, seq: int) -> str:
        return base64.b64encode(f"emu-hsync:{seq}:{root.id}".encode()).decode()

    @staticmethod
    def _parse_hierarchy_state(root: Folder, state: str) -> int:
        try:
            tag, seq, folder_id = base64.b64decode(state, validate=True).decode().split(":", 2)
            if tag != "emu-hsync" or folder_id != root.id:
                raise ValueError
            return int(seq)
        except ValueError:
            raise StoreError("ErrorInvalidSyncStateData", "Synchronization state data is corrupt or otherwise invalid.")

    # -- SyncFolderItems ---------------------------------------------------------------------
    @staticmethod
    def sync_state(folder: Folder, seq: int) -> str:
        return base64.b64encode(f"emu-sync:{seq}:{folder.id}".encode()).decode()

    def parse_sync_state(self, folder: Folder, state: str | None) -> int:
        if not state:
            return 0
        try:
            tag, seq, folder_id = base64.b64decode(state, validate=True).decode().split(":", 2)
            if tag != "emu-sync" or folder_id != folder.id:
                raise ValueError
            return int(seq)
        except ValueError:  # bad base64, not UTF-8, wrong shape
            raise StoreError("ErrorInvalidSyncStateData", "Synchronization state data is corrupt or otherwise invalid.")

    def sync(self, folder: Folder, state: str | None, max_changes: int, ignore: set[str] = frozenset()):
        """Changes after ``state``, oldest first, merged per item: (changes, new state, includes last)."""
        since = self.parse_sync_state(folder, state)
        pending = [c for c in folder.changes if c[0] > since]
        merged: dict[str, tuple[str, bool]] = {}
        last_seq = since
        consumed = 0
        for seq, kind, item_id, is_read in pending:
            previous = merged.get(item_id)
            if previous is None and len(merged) >= max_changes:
                break
            if previous and previous[0] == "Create" and kind == "Delete":
                del merged[item_id]
            elif previous and previous[0] == "Create":
                pass  # an update or read-flag change of a new item is part of its creation
            elif previous and previous[0] == "Update" and kind == "ReadFlagChange":
                pass  # the Update carries the item's current state
            else:
                merged[item_id] = (kind, is_read)
            last_seq = seq
            consumed += 1
        changes = []
        for item_id, (kind, is_read) in merged.items():
            if item_id in ignore:
                continue
            if kind in ("Create", "Update"):
                item = self.items.get(item_id)
                if item is None or item.folder_id != folder.id:
                    continue  # moved away since: its Delete follows
                changes.append((kind, item))
            else:
                changes.append((kind, item_id, is_read))
        return changes, self.sync_state(folder, last_seq), consumed == len(pending)

    # -- subscriptions and events ------------------------------------------------------------
    def subscribe(self, owner: str, mailbox: str, folder_ids, event_types) -> Subscription:
        key = mailbox.lower()
        self.mailbox(key)
        if self.max_subscriptions_per_mailbox:
            count = len(self.by_mailbox.get(key, ()))
            if count >= self.max_subscriptions_per_mailbox:
                raise StoreError("ErrorExceededSubscriptionCount",
                                 "You have exceeded the maximum number of subscriptions allowed for this mailbox.")
        sub = Subscription(id=_opaque(SUBSCRIPTION_PREFIX, 40), owner=owner, mailbox=key,
                           folder_ids=None if folder_ids is None else frozenset(folder_ids),
                           event_types=frozenset(event_types))
        self.subscriptions[sub.id] = sub
        self.by_mailbox.setdefault(key, {})[sub.id] = sub
        return sub

    def subscription(self, sub_id: str, owner: str) -> Subscription:
        sub = self.subscriptions.get(sub_id)
        if sub is not None and sub.idle_since is not None and time.monotonic() - sub.idle_since > self.idle_timeout:
            self.drop_subscription(sub)
            sub = None
        if sub is None:
            if not _looks_like_subscription_id(sub_id):
                raise StoreError("ErrorInvalidSubscription", "The subscription id is malformed.")
            raise StoreError("ErrorSubscriptionNotFound", "The specified subscription was not found.")
        if sub.owner != owner:
            raise StoreError("ErrorSubscriptionAccessDenied",
                             "A subscription can only be accessed by the account that created it.")
        return sub

    def drop_subscription(self, sub: Subscription) -> None:
        self.subscriptions.pop(sub.id, None)
        self.by_mailbox.get(sub.mailbox, {}).pop(sub.id, None)

    def expire_idle(self) -> int:
        now = time.monotonic()
        idle = [s for s in self.subscriptions.values()
                if s.idle_since is not None and now - s.idle_since > self.idle_timeout]
        for sub in idle:
            self.drop_subscription(sub)
        return len(idle)

    def _emit(self, folder: Folder, events: list[Event]) -> None:
        self._emit_many([(folder, e) for e in events])

    def _emit_many(self, pairs) -> None:
        touched = {}
        seen = set()
        for folder, event in pairs:
            for sub in list(self.by_mailbox.get(folder.mailbox, {}).values()):
                if event.kind not in sub.event_types or not sub.covers(folder.id):
                    continue
                if (sub.id, id(event)) in seen:
                    continue  # a move within one subscription's folders is reported once
                seen.add((sub.id, id(event)))
                if len(sub.queue) < self.max_queued_events:
                    sub.queue.append(event)
                else:
                    sub.missed = True
                touched[sub.id] = sub
        for event in {id(e): e for _, e in pairs}.values():
            event.watermark = base64.b64encode(f"emu-wm:{next(self._watermarks)}".encode()).decode()
        if self.on_event:
            for sub in touched.values():
                self.on_event(sub)
