"""The emulator's mailboxes: folders, messages, both kinds of Graph ids and the change log.

Every message has an immutable id (what ``Prefer: IdType="ImmutableId"`` shows; it never
changes) and a regular id that is replaced each time the message moves, as Exchange's entry ids
are; an old regular id then answers 404. Every arrival in and departure from a folder is
appended to that folder's change log with a global sequence number: delta reads the log, and the
notifier is told through ``listeners``.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import itertools
import struct
import uuid
from collections.abc import Callable
from typing import Any

from emulators.graph import messages
from emulators.graph.errors import GraphError, malformed_id, not_found_item

# well-known name -> display name of the folders every mailbox starts with under msgfolderroot
WELL_KNOWN = {
    "inbox": "Inbox", "drafts": "Drafts", "sentitems": "Sent Items", "deleteditems": "Deleted Items",
    "junkemail": "Junk Email", "archive": "Archive", "outbox": "Outbox", "conversationhistory": "Conversation History",
    "syncissues": "Sync Issues",
}
SYNC_ISSUES = {"conflicts": "Conflicts", "localfailures": "Local Failures", "serverfailures": "Server Failures"}
OTHER_TOP = (("RSS Feeds", False), ("Conversation Action Settings", True))  # name, hidden
# Graph v1.0's other well-known names: folders these mailboxes do not have (404, not 400)
ABSENT = frozenset({"clutter", "scheduled", "searchfolders"})
DELETIONS = "recoverableitemsdeletions"  # Recoverable Items\Deletions: outside msgfolderroot, not listed
NO_HEADERS = frozenset({"sentitems", "drafts"})  # Graph returns no internetMessageHeaders for these
ROOT = "msgfolderroot"
_NAMESPACE = uuid.UUID("6f1c0b6e-4b8e-4d59-9a53-2f0e7c1a9d41")
_REGULAR, _IMMUTABLE, _FOLDER = b"\x00\x03\x24\x00", b"\x00\x09\x00\x2e", b"\x00\x03\x24\x00"


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def well_formed(ref: str) -> bool:
    """True if ``ref`` decodes as an Exchange id could (base64, leading zero byte)."""
    try:
        raw = base64.urlsafe_b64decode(ref + "=" * (-len(ref) % 4))
    except (ValueError, TypeError):
        return False
    return len(raw) >= 16 and raw[0] == 0


class Folder:
    def __init__(self, mailbox: Mailbox, folder_id: str, name: str, parent: Folder | None,
                 well_known: str | None = None, hidden: bool = False):
        self.mailbox, self.id, self.name, self.parent = mailbox, folder_id, name, parent
        self.well_known, self.hidden = well_known, hidden
        self.children: list[Folder] = []
        self.messages: dict[int, Message] = {}  # key -> message, in arrival order
        self.log: list[Change] = []

    @property
    def path(self) -> str:
        """Display names from below msgfolderroot ("Inbox/Replies"; "Recoverable Items/Deletions")."""
        parts, folder = [], self
        while folder.parent is not None and folder.well_known != ROOT:
            parts.append(folder.name)
            folder = folder.parent
        return "/".join(reversed(parts))

    @property
    def ipm(self) -> bool:
        """Under msgfolderroot: what ``users/{u}/messages`` covers."""
        folder: Folder | None = self.parent
        while folder is not None:
            if folder.well_known == ROOT:
                return True
            folder = folder.parent
        return False

    def child(self, name: str) -> Folder | None:
        return next((c for c in self.children if c.name.lower() == name.lower()), None)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "displayName": self.name,
                "parentFolderId": self.parent.id if self.parent else None,
                "childFolderCount": len(self.children), "unreadItemCount": len(self.messages),
                "totalItemCount": len(self.messages),
                "sizeInBytes": sum(len(m.raw) for m in self.messages.values()), "isHidden": self.hidden}


@dataclasses.dataclass
class Change:
    seq: int
    key: int
    event: str  # "in", "moved_out" or "deleted"
    regular_id: str  # the id the message had in this folder
    immutable_id: str


class Message:
    def __init__(self, key: int, mailbox: Mailbox, folder: Folder, raw: bytes, received: dt.datetime,
                 strip_reply_headers: bool):
        self.key, self.mailbox, self.folder, self.raw = key, mailbox, folder, raw
        self.parsed = messages.parse(raw)
        self.received = received
        self.modified = received
        self.version = 0
        self.strip_reply_headers = strip_reply_headers
        self.immutable_id = self._id(_IMMUTABLE, 0)
        self.regular_id = self._id(_REGULAR, 0)
        self.conversation_id = "AAQkA" + _b64(hashlib.sha256(
            f"{mailbox.object_id}|{self.parsed.thread_root}".encode()).digest()[:24])

    def _id(self, prefix: bytes, version: int) -> str:
        digest = hashlib.sha256(f"{self.mailbox.object_id}|{self.key}|{version}|{prefix!r}".encode()).digest()
        return _b64(prefix + self.mailbox.guid.bytes + b"\x00\x46\x00\x00" + struct.pack(">QI", self.key, version)
                    + digest)

    def moved(self) -> None:
        self.version += 1
        self.regular_id = self._id(_REGULAR, self.version)
        self.modified = dt.datetime.now(dt.UTC)

    @property
    def change_key(self) -> str:
        digest = hashlib.sha256(f"{self.immutable_id}|{self.version}".encode()).digest()
        return base64.b64encode(b"\x09\x00\x00\x00\x16\x00\x00\x00" + digest[:22]).decode()

    def graph_id(self, immutable: bool) -> str:
        return self.immutable_id if immutable else self.regular_id

    def headers(self) -> list[dict[str, str]] | None:
        """internetMessageHeaders as Graph shows them (None where Graph shows none)."""
        if self.folder.well_known in NO_HEADERS:
            return None
        if self.strip_reply_headers:
            return [h for h in self.parsed.headers if h["name"].lower() not in messages.REPLY_HEADERS]
        return [dict(h) for h in self.parsed.headers]

    def to_json(self, select: tuple[str, ...] | None, immutable: bool, as_text: bool = False) -> dict[str, Any]:
        """The message resource: every default property, or the id and what ``select`` names."""
        p = self.parsed
        graph_id = self.graph_id(immutable)
        values: dict[str, Any] = {
            "createdDateTime": iso(self.received), "lastModifiedDateTime": iso(self.modified),
            "changeKey": self.change_key, "categories": [], "receivedDateTime": iso(self.received),
            "sentDateTime": p.sent or iso(self.received), "hasAttachments": p.has_attachments,
            "internetMessageId": p.internet_message_id, "subject": p.subject, "bodyPreview": messages.preview(p),
            "importance": p.importance, "parentFolderId": self.folder.id, "conversationId": self.conversation_id,
            "conversationIndex": messages.conversation_index(p, hashlib.sha256(self.conversation_id.encode()).digest()),
            "isDeliveryReceiptRequested": False, "isReadReceiptRequested": p.read_receipt, "isRead": False,
            "isDraft": self.folder.well_known == "drafts", "webLink": messages.web_link(graph_id),
            "inferenceClassification": "focused", "sender": p.sender, "from": p.from_, "toRecipients": p.to,
            "ccRecipients": p.cc, "bccRecipients": p.bcc, "replyTo": p.reply_to, "flag": {"flagStatus": "notFlagged"},
        }
        out: dict[str, Any] = {"@odata.etag": f'W/"{self.change_key}"', "id": graph_id}
        wanted = select if select is not None else tuple(n for n in messages.PROPERTIES
                                                        if n not in messages.SELECT_ONLY)
        for name in wanted:
            if name == "id":
                continue
            if name == "internetMessageHeaders":
                headers = self.headers()
                if headers is not None:
                    out[name] = headers
            elif name in ("body", "uniqueBody"):
                out[name] = messages.body(p, as_text, unique=name == "uniqueBody")
            else:
                out[name] = values[name]
        return out


class Mailbox:
    def __init__(self, store: Store, address: str):
        self.address = address
        self.object_id = str(uuid.uuid5(_NAMESPACE, address.lower()))
        self.guid = uuid.UUID(self.object_id)
        local = address.split("@", 1)[0]
        self.display_name = " ".join(p.capitalize() for p in local.replace("_", ".").split(".") if p) or address
        self.folders: dict[str, Folder] = {}
        top = store.new_folder(self, "Root", None, hidden=True)
        self.root = store.new_folder(self, "Top of Information Store", top, ROOT)
        self.named: dict[str, Folder] = {ROOT: self.root}
        for well_known, name in WELL_KNOWN.items():
            self.named[well_known] = store.new_folder(self, name, self.root, well_known)
        for well_known, name in SYNC_ISSUES.items():
            self.named[well_known] = store.new_folder(self, name, self.named["syncissues"], well_known)
        for name, hidden in OTHER_TOP:
            store.new_folder(self, name, self.root, hidden=hidden)
        recoverable = store.new_folder(self, "Recoverable Items", top, hidden=True)
        self.named[DELETIONS] = store.new_folder(self, "Deletions", recoverable, DELETIONS, hidden=True)

    def well_known(self, name: str) -> Folder | None:
        return self.named.get(name.lower())

    def to_json(self) -> dict[str, Any]:
        given, _, surname = self.display_name.partition(" ")
        return {"businessPhones": [], "displayName": self.display_name, "givenName": given or None, "jobTitle": None,
                "mail": self.address, "mobilePhone": None, "officeLocation": None, "preferredLanguage": "en-US",
                "surname": surname or None, "userPrincipalName": self.address, "id": self.object_id}


Listener = Callable[[str, "Message", Folder], None]  # (event, message, folder): "in" | "moved_out" | "deleted"


class Store:
    def __init__(self):
        self.listeners: list[Listener] = []
        self.clear()

    def clear(self) -> None:
        self.mailboxes: dict[str, Mailbox] = {}  # lower-case address -> mailbox
        self.by_object_id: dict[str, Mailbox] = {}
        self.by_immutable: dict[str, Message] = {}
        self.by_regular: dict[str, Message] = {}
        self.folders: dict[str, Folder] = {}
        self._keys = itertools.count(1)
        self._folder_serial = itertools.count(1)
        self._seq = itertools.count(1)
        self.seq = 0  # the last change's sequence number

    # mailboxes and folders
    def add_mailbox(self, address: str) -> Mailbox:
        address = address.strip()
        found = self.mailboxes.get(address.lower())
        if found is None:
            found = Mailbox(self, address)
            self.mailboxes[address.lower()] = found
            self.by_object_id[found.object_id] = found
        return found

    def new_folder(self, mailbox: Mailbox, name: str, parent: Folder | None, well_known: str | None = None,
                   hidden: bool = False) -> Folder:
        raw = _FOLDER + mailbox.guid.bytes + b"\x2e\x00" + struct.pack(">I", next(self._folder_serial)) + bytes(6)
        folder = Folder(mailbox, _b64(raw), name, parent, well_known, hidden)
        if parent is not None:
            parent.children.append(folder)
            parent.children.sort(key=lambda f: f.name.lower())
        mailbox.folders[folder.id] = folder
        self.folders[folder.id] = folder
        return folder

    def user(self, ref: str) -> Mailbox | None:
        """The mailbox for ``users/{ref}``: an address (any case) or the object id."""
        ref = ref.strip()
        return self.mailboxes.get(ref.lower()) or self.by_object_id.get(ref.lower())

    def folder(self, mailbox: Mailbox, ref: str) -> Folder:
        """``mailFolders/{ref}``: a well-known name or a folder id of this mailbox."""
        found = mailbox.well_known(ref)
        if found is not None:
            return found
        folder = mailbox.folders.get(ref)
        if folder is not None:
            return folder
        if ref.lower() in ABSENT:
            raise not_found_item()
        if not well_formed(ref):
            raise malformed_id()
        raise not_found_item()

    def folder_path(self, mailbox: Mailbox, path: str, create: bool = True) -> Folder:
        """A well-known name, then a display-name path under msgfolderroot ("Inbox/Replies",
        "recoverableitemsdeletions"), made if missing."""
        parts = [p.strip() for p in path.strip().strip("/").split("/") if p.strip()]
        if not parts:
            raise ValueError("empty folder path")
        folder = mailbox.well_known(parts[0]) or mailbox.root.child(parts[0])
        if folder is None:
            if not create:
                raise KeyError(path)
            folder = self.new_folder(mailbox, parts[0], mailbox.root)
        for part in parts[1:]:
            child = folder.child(part)
            if child is None:
                if not create:
                    raise KeyError(path)
                child = self.new_folder(mailbox, part, folder)
            folder = child
        return folder

    # messages
    def message(self, ref: str, mailbox: Mailbox | None = None) -> Message:
        """A message by immutable or current regular id (an old regular id is gone: 404)."""
        found = self.by_immutable.get(ref) or self.by_regular.get(ref)
        if found is None or (mailbox is not None and found.mailbox is not mailbox):
            if not well_formed(ref):
                raise malformed_id()
            raise not_found_item()
        return found

    def _log(self, folder: Folder, message: Message, event: str) -> None:
        self.seq = next(self._seq)
        folder.log.append(Change(self.seq, message.key, event, message.regular_id, message.immutable_id))
        for listener in self.listeners:
            listener(event, message, folder)

    def deliver(self, mailbox: Mailbox, raw: bytes, folder: Folder, strip_reply_headers: bool = False,
                received: dt.datetime | None = None) -> Message:
        message = Message(next(self._keys), mailbox, folder, raw, received or dt.datetime.now(dt.UTC),
                          strip_reply_headers)
        folder.messages[message.key] = message
        self.by_immutable[message.immutable_id] = message
        self.by_regular[message.regular_id] = message
        self._log(folder, message, "in")
        return message

    def move(self, message: Message, folder: Folder, event: str = "moved_out") -> Message:
        """Move to ``folder``: a new regular id, the old one gone (a move to the same folder does nothing)."""
        if folder is message.folder:
            return message
        source = message.folder
        self._log(source, message, event)
        del source.messages[message.key]
        self.by_regular.pop(message.regular_id, None)
        message.moved()
        message.folder = folder
        folder.messages[message.key] = message
        self.by_regular[message.regular_id] = message
        self._log(folder, message, "in")
        return message

    def delete(self, message: Message, purge: bool = False) -> None:
        """Hard delete, as Exchange does it: to Recoverable Items\\Deletions (a new regular id, the
        same immutable id; the folder it left sees a deletion). ``purge`` (or a message already in
        Deletions): gone from the mailbox, both ids answer 404."""
        deletions = message.mailbox.well_known(DELETIONS)
        if not purge and deletions is not None and message.folder is not deletions:
            self.move(message, deletions, event="deleted")
            return
        folder = message.folder
        self._log(folder, message, "deleted")
        del folder.messages[message.key]
        self.by_regular.pop(message.regular_id, None)
        self.by_immutable.pop(message.immutable_id, None)

    def check_user(self, ref: str) -> Mailbox:
        mailbox = self.user(ref)
        if mailbox is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{ref}' is invalid.")
        return mailbox
