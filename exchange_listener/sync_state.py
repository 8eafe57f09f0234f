"""SyncFolderItems state per mailbox and folder, and the catch-up that uses it.

Streaming subscriptions cannot resume: whatever arrives while no stream is attached (a
reconnect, a restart, a takeover) is found again only through SyncFolderItems from a stored
state. The new state is stored only *after* the items it covers are enqueued, so a crash in
between re-delivers (harmless: job ids dedupe) instead of losing mail.

Keys (all under ``el:``):

- ``el:sync:<mailbox>`` — hash, folder -> SyncState, and ``<folder>@at`` -> epoch seconds of
  the last completed catch-up of that folder. ``folder`` is a distinguished name (``inbox``,
  ``junkemail``) or an EWS folder id.
- ``el:folders:<mailbox>`` — hash, distinguished folder name -> folder id (cached GetFolder).
- ``el:userfolders:<mailbox>`` — set of ids of other folders new mail was seen in (folders inbox
  rules file mail into); they are caught up as well.
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import redis
from exchangelib.errors import ErrorInvalidSyncStateData
from exchangelib.fields import FieldPath
from exchangelib.items import Message
from exchangelib.properties import DistinguishedFolderId, FolderId, Mailbox
from exchangelib.services import SyncFolderItems

from exchange_listener import logs, metrics
from exchange_listener.sources.base import NewMail

MAX_CHANGES = 512
# A reset (invalid state) or first catch-up enqueues mail received since this long before the
# last known good point, to cover clock skew between us and the server.
SKEW_SECONDS = 300
DISTINGUISHED_INCOMING = ("inbox", "junkemail")


def _sync_key(mailbox: str) -> str:
    return f"el:sync:{mailbox}"


class SyncStore:
    """Sync states and folder knowledge of mailboxes, in Redis."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn

    def get(self, mailbox: str, folder: str) -> tuple[str | None, float | None]:
        state, at = self.conn.hmget(_sync_key(mailbox), [folder, f"{folder}@at"])
        return (state.decode() if state else None), (float(at) if at else None)

    def put(self, mailbox: str, folder: str, state: str, at: float | None = None, cutoff: float | None = None) -> None:
        """Store a state; ``cutoff`` marks a first sync still filtering old mail, so a retry
        after a failure half-way goes on filtering instead of replaying the history."""
        mapping = {folder: state, f"{folder}@at": repr(time.time() if at is None else at)}
        if cutoff is not None:
            mapping[f"{folder}@since"] = repr(cutoff)
        self.conn.hset(_sync_key(mailbox), mapping=mapping)

    def cutoff(self, mailbox: str, folder: str) -> float | None:
        value = self.conn.hget(_sync_key(mailbox), f"{folder}@since")
        return float(value) if value else None

    def clear_cutoff(self, mailbox: str, folder: str) -> None:
        self.conn.hdel(_sync_key(mailbox), f"{folder}@since")

    def drop(self, mailbox: str, folder: str) -> None:
        self.conn.hdel(_sync_key(mailbox), folder)

    def folder_ids(self, mailbox: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.conn.hgetall(f"el:folders:{mailbox}").items()}

    def save_folder_ids(self, mailbox: str, ids: dict[str, str]) -> None:
        if ids:
            self.conn.hset(f"el:folders:{mailbox}", mapping=ids)

    def user_folders(self, mailbox: str) -> set[str]:
        return {v.decode() for v in self.conn.smembers(f"el:userfolders:{mailbox}")}

    def learn_user_folder(self, mailbox: str, folder_id: str) -> bool:
        """Remember a folder mail was filed into; its first catch-up starts from now (less the
        skew margin), not from when the mailbox was added: the stream already delivered that."""
        pipe = self.conn.pipeline()
        pipe.sadd(f"el:userfolders:{mailbox}", folder_id)
        pipe.hsetnx(_sync_key(mailbox), f"{folder_id}@at", repr(time.time()))
        return bool(pipe.execute()[0])

    def forget_mailbox(self, mailbox: str) -> None:
        self.conn.delete(_sync_key(mailbox), f"el:folders:{mailbox}", f"el:userfolders:{mailbox}")


def folder_ref(mailbox: str, folder: str):
    """The EWS id element for ``folder`` (a distinguished name or a folder id)."""
    if folder in DISTINGUISHED_INCOMING:
        return DistinguishedFolderId(id=folder, mailbox=Mailbox(email_address=mailbox))
    return FolderId(id=folder)


_RECEIVED = FieldPath(field=Message.get_field_by_fieldname("datetime_received"))


def catch_up(account, mailbox: str, folder: str, store: SyncStore, enqueue: Callable[[Sequence[NewMail]], None],
             *, added_at: float | None = None) -> int:
    """Enqueue every mail created in ``folder`` since its stored state; returns how many.

    Without a stored state (first sight of the mailbox, or the state was invalid) only mail
    received since ``added_at`` / the last good catch-up (minus a skew margin) is enqueued,
    so adding a mailbox does not replay its whole history. ``enqueue`` must raise when it
    cannot enqueue; the state then stays where it was.
    """
    log = logs.get_logger(mailbox=mailbox, folder=folder)
    state, last_at = store.get(mailbox, folder)
    since = store.cutoff(mailbox, folder)  # a filtered first sync that did not finish
    if since is None and not state:
        since = (last_at or added_at or time.time()) - SKEW_SECONDS
    total = 0
    while True:
        svc = SyncFolderItems(account=account)
        try:
            changes = list(svc.call(folder=folder_ref(mailbox, folder), shape="IdOnly", additional_fields={_RECEIVED},
                                    sync_state=state, ignore=None, max_changes_returned=MAX_CHANGES, sync_scope=None))
        except ErrorInvalidSyncStateData:
            since = (last_at or added_at or time.time()) - SKEW_SECONDS
            log.warning("sync state rejected by the server; starting a fresh sync and enqueueing mail received since "
                        "the last good catch-up", since=datetime.datetime.fromtimestamp(since, datetime.UTC).isoformat())
            store.drop(mailbox, folder)
            state = None
            continue
        now = time.time()
        mails = []
        for change_type, item in changes:
            if change_type != "create" or isinstance(item, Exception) or not getattr(item, "id", None):
                continue
            if since is not None:
                received = getattr(item, "datetime_received", None)
                if received is None or received.timestamp() < since:
                    continue
            mails.append(NewMail(mailbox=mailbox, item_id=item.id, folder=folder, seen_at=now, via="catchup"))
        for mail in mails:
            enqueue([mail])  # one job per item: the same id the stream would give it
        if mails:
            metrics.CATCHUP_ITEMS.inc(len(mails))
            total += len(mails)
        new_state = svc.sync_state
        if new_state:
            store.put(mailbox, folder, new_state, at=now, cutoff=since)
        if svc.includes_last_item_in_range or not new_state or new_state == state:
            if since is not None:
                store.clear_cutoff(mailbox, folder)
            break
        state = new_state
    if total:
        log.info("catch-up enqueued mail", items=total)
    return total


def incoming_folders(mailbox: str, store: SyncStore) -> list[str]:
    """Folders a reply can land in that we know of: inbox, junk, and learned user folders."""
    return [*DISTINGUISHED_INCOMING, *sorted(store.user_folders(mailbox))]

