"""Catch-up: find every mail that arrived while no stream watched, in every folder mail can be in.

Streaming subscriptions cannot resume: whatever arrives while no stream is attached (a
reconnect, a restart, a takeover) is found again only through SyncFolderItems from a stored
state. So, per mailbox:

- **the folder tree** is learned with SyncFolderHierarchy from a stored state, so a folder that a
  rule files mail into is known even when it was created while no listener ran;
- **the folders that count** are the inbox, junk, Deleted Items, Recoverable Items\\Deletions
  (where a hard-deleted mail goes) and every user mail folder at any depth; never Sent Items,
  Drafts, Outbox or anything below them, never non-mail folders (calendar, contacts, tasks...);
- **each such folder** is caught up with SyncFolderItems from its stored state. A created item
  is enqueued unless the ledger says its mail was already processed (it was moved here, or a
  restart replays it) or it was received before the mailbox was watched or before the ledger's
  horizon. The new items of a page go out in jobs of up to ``MAX_MAILS_PER_JOB`` mails. The new
  state is stored only *after* the items it covers are enqueued, so a crash in between
  re-delivers (the same chunks, so job ids dedupe) instead of losing mail.

The listener runs a catch-up after every gap (start, reconnect, resubscribe, takeover), when a
stream reports mail in a folder it does not know, and as a *checkpoint* of the folders that had
new mail while streaming, so a restart only has the gap left to read.

Keys (named in ``exchange_listener.core.keys``):

- ``el:sync:<mailbox>`` — hash: folder key -> SyncFolderItems state; ``@tree`` -> the
  SyncFolderHierarchy state; ``@caught_up`` -> epoch seconds of the last complete catch-up.
  A folder key is a distinguished name (``inbox``) or an EWS folder id.
- ``el:folders:<mailbox>`` — hash: distinguished name -> folder id (one GetFolder, cached).
- ``el:tree:<mailbox>`` — hash: folder id -> JSON ``[parent id, folder class]``.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis
from exchangelib import Account
from exchangelib.errors import ErrorFolderNotFound, ErrorInvalidSyncStateData
from exchangelib.fields import FieldPath
from exchangelib.folders import Folder
from exchangelib.items import Message
from exchangelib.properties import (
    DistinguishedFolderId,
    FolderId,
    Mailbox,
    ParentFolderId,
)
from exchangelib.services import GetFolder, SyncFolderHierarchy, SyncFolderItems
from exchangelib.util import TNS, add_xml_child, create_element

from exchange_listener.core import keys, logs, metrics, redis_conn
from exchange_listener.mail.message_ids import (
    normalize,  # the same canonical id the workers record in the ledger
)
from exchange_listener.sources.base import MAX_MAILS_PER_JOB, SKEW_SECONDS, NewMail
from exchange_listener.sources.ews.wire import WholeBody
from exchange_listener.sources.ledger import Ledger, identity

MAX_CHANGES = 512
# Folders mail can land in, always watched when the server has them.
WATCHED = ("inbox", "junkemail", "deleteditems", "recoverableitemsdeletions")
# Never watched, nor anything below them: mail there is our own.
NEVER = ("sentitems", "drafts", "outbox")
# Asked for once per mailbox: the watched and never-watched ones, the root of the mail folders,
# and the usual non-mail folders (so their events are known to be ignorable from the start).
DISTINGUISHED = (*WATCHED, *NEVER, "msgfolderroot", "calendar", "contacts", "tasks", "notes", "journal")
NOT_MAIL_ITEMS = frozenset({"CalendarItem", "Contact", "DistributionList", "Task"})


def is_mail_class(folder_class: str | None) -> bool:
    """Folders of class IPF.Note (and its subclasses) hold mail; a folder made without a class does too."""
    return not folder_class or folder_class in ("IPF", "IPF.Note") or folder_class.startswith("IPF.Note.")


def watched_folders(distinguished: dict[str, str], tree: dict[str, tuple[str | None, str | None]]) -> dict[str, str]:
    """Folder id -> folder key of every folder mail can arrive in (see the module docstring)."""
    names_by_id = {fid: name for name, fid in distinguished.items()}
    excluded = {distinguished[n] for n in NEVER if n in distinguished}
    watched = {distinguished[n]: n for n in WATCHED if n in distinguished}
    for fid, (_parent, folder_class) in tree.items():
        name = names_by_id.get(fid)
        if fid in watched or (name and name not in WATCHED) or not is_mail_class(folder_class):
            continue
        current: str | None = fid
        hops = 0
        while current and hops < 64:  # below Sent Items, Drafts or Outbox: never
            if current in excluded:
                break
            current = tree.get(current, (None, None))[0]
            hops += 1
        else:
            watched[fid] = fid
    return watched


class SyncStore:
    """Sync states and folder knowledge of mailboxes, in Redis."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn

    def get(self, mailbox: str, folder: str) -> str | None:
        state = self.conn.hget(keys.sync(mailbox), folder)
        return redis_conn.text(state) if state else None

    def put(self, mailbox: str, folder: str, state: str) -> None:
        self.conn.hset(keys.sync(mailbox), folder, state)

    def drop(self, mailbox: str, folder: str) -> None:
        self.conn.hdel(keys.sync(mailbox), folder)

    def mark_caught_up(self, mailbox: str) -> None:
        self.conn.hset(keys.sync(mailbox), "@caught_up", repr(time.time()))

    def caught_up_at(self, mailbox: str) -> float | None:
        value = self.conn.hget(keys.sync(mailbox), "@caught_up")
        return float(value) if value else None

    def folder_ids(self, mailbox: str) -> dict[str, str]:
        return {redis_conn.text(k): redis_conn.text(v) for k, v in self.conn.hgetall(keys.folders(mailbox)).items()}

    def save_folder_ids(self, mailbox: str, ids: dict[str, str]) -> None:
        if ids:
            # a copy typed as redis-py's mapping (a dict[str, str] is not one: Mapping's keys are invariant)
            self.conn.hset(keys.folders(mailbox), mapping=dict(ids.items()))

    def tree(self, mailbox: str) -> dict[str, tuple[str | None, str | None]]:
        return {redis_conn.text(k): tuple(json.loads(v)) for k, v in self.conn.hgetall(keys.tree(mailbox)).items()}

    def update_tree(self, mailbox: str, upserts: dict[str, tuple[str | None, str | None]], deletes: Iterable[str],
                    state: str | None, *, replace: bool = False) -> None:
        """Apply a SyncFolderHierarchy page and store its state, in one step."""
        pipe = self.conn.pipeline()
        if replace:
            pipe.delete(keys.tree(mailbox))
        if upserts:
            pipe.hset(keys.tree(mailbox), mapping={k: json.dumps(list(v)) for k, v in upserts.items()})
        deletes = list(deletes)
        if deletes:
            pipe.hdel(keys.tree(mailbox), *deletes)
        if state:
            pipe.hset(keys.sync(mailbox), "@tree", state)
        pipe.execute()

    def watched(self, mailbox: str) -> dict[str, str]:
        return watched_folders(self.folder_ids(mailbox), self.tree(mailbox))

    def known(self, mailbox: str) -> tuple[dict[str, str], set[str]]:
        """(watched folder id -> key, ids of every other known folder): what a stream needs."""
        distinguished, tree = self.folder_ids(mailbox), self.tree(mailbox)
        watched = watched_folders(distinguished, tree)
        return watched, (set(distinguished.values()) | set(tree)) - set(watched)

    def forget_mailbox(self, mailbox: str) -> None:
        self.conn.delete(keys.sync(mailbox), keys.folders(mailbox), keys.tree(mailbox))


def folder_ref(mailbox: str, folder: str) -> DistinguishedFolderId | FolderId:
    """The EWS id element for ``folder`` (a distinguished name or a folder id)."""
    if folder in DISTINGUISHED:
        return DistinguishedFolderId(id=folder, mailbox=Mailbox(email_address=mailbox))
    return FolderId(id=folder)


# -- folders ------------------------------------------------------------------------------------
class FolderIds(WholeBody, GetFolder):
    """GetFolder that returns only each folder's id (no Folder objects, no root lookup).

    ``folders`` are (distinguished name, mailbox) pairs. The request is built directly: through
    exchangelib's models, 14 DistinguishedFolderIds cost more CPU than the rest of the call.
    """

    def get_payload(self, folders: Iterable[tuple[str, str]], additional_fields: Any, shape: str) -> Any:
        if shape != "IdOnly" or additional_fields:
            raise ValueError("FolderIds asks for folder ids only")
        payload = create_element("m:GetFolder")
        folder_shape = create_element("m:FolderShape")
        add_xml_child(folder_shape, "t:BaseShape", "IdOnly")
        payload.append(folder_shape)
        ids = create_element("m:FolderIds")
        for name, mailbox in folders:
            ref = create_element("t:DistinguishedFolderId", attrs={"Id": name})
            owner = create_element("t:Mailbox")
            add_xml_child(owner, "t:EmailAddress", mailbox)
            ref.append(owner)
            ids.append(ref)
        payload.append(ids)
        return payload

    def _elems_to_objs(self, elems: Iterable[Any]) -> Iterator[Any]:
        for elem in elems:
            if isinstance(elem, Exception) or elem is None:
                yield elem
                continue
            fid = elem.find(FolderId.response_tag())
            yield None if fid is None else fid.get("Id")


def distinguished_folder_ids(account: Account, mailbox: str) -> dict[str, str]:
    """Ids of the distinguished folders this server has (one GetFolder; missing ones are left out).

    Answers are matched to names by position: a cut-off answer is refused (``wire``), not zipped short.
    """
    found: dict[str, str] = {}
    refs = [(name, mailbox) for name in DISTINGUISHED]
    for name, value in zip(DISTINGUISHED, FolderIds(account=account).call(folders=refs, additional_fields=set(),
                                                                           shape="IdOnly")):
        if isinstance(value, str):
            found[name] = value
    return found


class FolderChanges(WholeBody, SyncFolderHierarchy):
    """SyncFolderHierarchy yielding (change, folder id, parent id, folder class): no Folder objects."""

    def _elem_to_obj(self, elem: Any) -> tuple[Any, str | None, str | None, str | None]:
        change = self.change_types_map[elem.tag]
        if change == self.DELETE:
            fid = elem.find(FolderId.response_tag())
            return change, (fid.get("Id") if fid is not None else None), None, None
        folder = elem[0]
        fid = folder.find(FolderId.response_tag())
        parent = folder.find(ParentFolderId.response_tag())
        folder_class = folder.find(f"{{{TNS}}}FolderClass")
        return (change, fid.get("Id") if fid is not None else None, parent.get("Id") if parent is not None else None,
                folder_class.text if folder_class is not None else None)


class _ItemChanges(WholeBody, SyncFolderItems):
    pass


_TREE_FIELDS = {FieldPath(field=Folder.get_field_by_fieldname(n)) for n in ("parent_folder_id", "folder_class")}


def refresh_tree(account: Account, mailbox: str, store: SyncStore) -> int:
    """Bring the stored folder tree up to date; returns how many folders changed."""
    log = logs.get_logger(mailbox=mailbox)
    state = redis_conn.text(store.conn.hget(keys.sync(mailbox), "@tree") or b"") or None
    replace = state is None
    changed = 0
    while True:
        svc = FolderChanges(account=account)
        try:
            changes = list(svc.call(folder=folder_ref(mailbox, "msgfolderroot"), shape="IdOnly",
                                    additional_fields=_TREE_FIELDS, sync_state=state))
        except ErrorInvalidSyncStateData:
            log.warning("folder hierarchy sync state rejected by the server; reading the whole tree again")
            state, replace = None, True
            continue
        upserts, deletes = {}, []
        for change in changes:
            if isinstance(change, Exception) or not change[1]:
                continue
            kind, fid, parent, folder_class = change
            if kind == "delete":
                deletes.append(fid)
            else:
                upserts[fid] = (parent, folder_class)
        store.update_tree(mailbox, upserts, deletes, svc.sync_state, replace=replace)
        replace = False
        changed += len(upserts) + len(deletes)
        if svc.includes_last_item_in_range or not svc.sync_state or svc.sync_state == state:
            return changed
        state = svc.sync_state


# -- items ----------------------------------------------------------------------------------------
_ITEM_FIELDS = {FieldPath(field=Message.get_field_by_fieldname(n)) for n in ("datetime_received", "message_id")}


def catch_up(account: Account, mailbox: str, folder: str, store: SyncStore, ledger: Ledger,
             enqueue: Callable[[Sequence[NewMail]], None], *, since: float) -> int:
    """Enqueue every mail created in ``folder`` since its stored state that is not processed yet.

    Mail received before ``since`` is skipped (it predates the mailbox being watched, or the
    ledger's memory). ``enqueue`` must raise when it cannot enqueue; the state then stays
    where it was. Returns how many mails were enqueued.
    """
    log = logs.get_logger(mailbox=mailbox, folder=folder)
    state = store.get(mailbox, folder)
    total = 0
    while True:
        svc = _ItemChanges(account=account)
        try:
            changes = list(svc.call(folder=folder_ref(mailbox, folder), shape="IdOnly", additional_fields=_ITEM_FIELDS,
                                    sync_state=state, ignore=None, max_changes_returned=MAX_CHANGES, sync_scope=None))
        except ErrorInvalidSyncStateData:
            log.warning("sync state rejected by the server; reading the folder again (processed mail is skipped)")
            store.drop(mailbox, folder)
            state = None
            continue
        except ErrorFolderNotFound:
            if folder in DISTINGUISHED:
                raise
            log.info("folder no longer exists; forgetting its sync state")  # deleted: its mail went elsewhere
            store.drop(mailbox, folder)
            return total
        now = time.time()
        candidates = []
        for change_type, item in changes:
            if change_type != "create" or isinstance(item, Exception) or not getattr(item, "id", None):
                continue
            if type(item).__name__ in NOT_MAIL_ITEMS:
                continue
            received = getattr(item, "datetime_received", None)
            if received is not None and received.timestamp() < since:
                continue
            message_id = normalize(getattr(item, "message_id", None) or "") or ""
            candidates.append((identity(message_id or None, item.id), item, message_id, received))
        done = ledger.processed(mailbox, [c[0] for c in candidates])
        mails = [NewMail(mailbox=mailbox, item_id=item.id, folder=folder, seen_at=now, via="catchup",
                         message_id=message_id, received_at=received.timestamp() if received else 0.0)
                 for ident, item, message_id, received in candidates if ident not in done]
        for start in range(0, len(mails), MAX_MAILS_PER_JOB):  # many mails per job: RQ's cost is per job
            enqueue(mails[start:start + MAX_MAILS_PER_JOB])
        if mails:
            metrics.CATCHUP_ITEMS.inc(len(mails))
            total += len(mails)
        new_state = svc.sync_state
        if new_state:
            store.put(mailbox, folder, new_state)
        if svc.includes_last_item_in_range or not new_state or new_state == state:
            break
        state = new_state
    if total:
        log.info("catch-up enqueued mail", items=total)
    return total


def catch_up_mailbox(account: Account, mailbox: str, store: SyncStore, ledger: Ledger,
                     enqueue: Callable[[Sequence[NewMail]], None], *, added_at: float | None,
                     folders: Iterable[str] | None = None) -> tuple[int, dict[str, str] | None]:
    """Catch up ``folders`` (keys), or the whole mailbox with its folder tree refreshed first.

    Returns (mails enqueued, the watched folder map when the tree was refreshed, else None).
    """
    since = max(added_at or 0.0, ledger.horizon()) - SKEW_SECONDS
    if folders is not None:
        return sum(catch_up(account, mailbox, f, store, ledger, enqueue, since=since) for f in folders), None
    if not store.folder_ids(mailbox):
        store.save_folder_ids(mailbox, distinguished_folder_ids(account, mailbox))
    refresh_tree(account, mailbox, store)
    watched = store.watched(mailbox)
    total = 0
    for key in sorted(set(watched.values()), key=lambda k: (k not in WATCHED, k)):
        total += catch_up(account, mailbox, key, store, ledger, enqueue, since=since)
    store.mark_caught_up(mailbox)
    return total, watched
