"""Catch-up for the Graph source: per-folder message delta from stored deltaLinks.

Graph's change notifications are a hint (they are dropped, delayed, duplicated; a subscription
can vanish): what arrived is known for sure only from message delta, which is per folder. So,
per mailbox:

- **the folders that count** are every mail folder (``mailFolders`` and their ``childFolders`` at
  any depth, paged; hidden ones left out: system folders (Teams and Yammer data, conversation
  settings) hold no replies, and some of them refuse delta, which would fail the mailbox for good) plus Recoverable Items\\Deletions (where a hard-deleted
  mail goes; it is not listed, only reachable by its well-known name), except Sent Items, Drafts,
  Outbox and anything below them: mail there is our own;
- **each such folder** is read by ``messages/delta`` from its stored link (none yet, or a resync:
  the whole folder). Mail received before the cut-off is skipped, as EWS does: the ledger's
  horizon (``processed_days``), but reaching back to the last complete catch-up when that is
  older (a reply that came early in a long outage is still new), and never before the mailbox
  was added; less ``SKEW_SECONDS``. Old mail a rep moves into a folder is not new mail. Mail the
  ledger says was processed is skipped. The rest goes out in jobs of up to
  ``MAX_MAILS_PER_JOB`` mails. The link after a page (the nextLink, then the round's deltaLink) is
  stored only *after* that page's mails are enqueued, so a crash in between re-delivers (the same
  pages, so the same job ids dedupe) and never loses mail; ``enqueue`` raises when it cannot
  enqueue (Redis down) and nothing advances.
- ``changeType=created``: a mail moved into a folder is new *to that folder* (Exchange's
  incremental sync reports it as created there, as EWS SyncFolderItems reports a Create), so it
  comes through; updates (read, flagged, categorised) are left out, so a rep reading mail does not
  re-list it. Graph still sends some of those (read-state changes, per its docs): the ledger
  and the cut-off filter them, and an entry with neither a receivedDateTime
  nor an internetMessageId (a bare state change) is not taken for new mail.
- ``@removed`` entries are ignored: ids are immutable, a moved mail keeps its id and a job for it
  still finds it.
- a 410 (``SyncStateNotFound``, also in the middle of a round), or a 404 for a folder that still
  exists, drops the link and reads the folder again from the start (the ledger and the cut-off
  keep that from re-processing); more than ``MAX_RESYNCS`` times in one catch-up is an error. A
  folder that no longer exists (404) is forgotten.
- a folder that fails does not hold up the others: they are caught up, then its error is raised
  (the run is retried) and the mailbox is not marked caught up.

Keys (named in ``exchange_listener.core.keys``):

- ``el:graph:delta:<mailbox>`` — hash: folder id -> delta (or next) link; ``@caught_up`` -> epoch
  seconds of the last complete catch-up of every folder.
- ``el:graph:folders:<mailbox>`` — hash: folder id -> JSON ``[displayName, parentFolderId, kind]``,
  kind being the folder's well-known name (``inbox``, ``sentitems``...) or "" for the rep's own.
"""
from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis

from exchange_listener.core import keys, logs, metrics, redis_conn
from exchange_listener.mail.message_ids import (
    normalize,  # the same canonical id the workers record
)
from exchange_listener.sources.base import MAX_MAILS_PER_JOB, SKEW_SECONDS, NewMail
from exchange_listener.sources.graph.client import (
    AuthenticationFailed,
    GraphClient,
    GraphError,
    GraphUnavailable,
    NotFound,
    SyncStateNotFound,
    user_path,
)
from exchange_listener.sources.ledger import Ledger, identity

PAGE_SIZE = 100  # Prefer: odata.maxpagesize for delta pages
FOLDER_PAGE = 100  # $top for folder listings
DELTA_SELECT = "internetMessageId,receivedDateTime,parentFolderId"
FOLDER_SELECT = "id,displayName,parentFolderId,childFolderCount"
NEVER = ("sentitems", "drafts", "outbox")  # never watched, nor anything below them: our own mail
# Asked for by well-known name once per tree refresh: the never-watched ones, the usual landing
# folders (to name them), and Recoverable Items\Deletions (not listed by mailFolders).
WELL_KNOWN = ("inbox", "junkemail", "deleteditems", "archive", "recoverableitemsdeletions", *NEVER)
FIRST = ("inbox", "junkemail")  # caught up before the others: where new mail lands
MAX_RESYNCS = 2  # full re-reads of one folder per catch-up after 410s; past that the 410 is raised
MAX_DEPTH = 64
CAUGHT_UP = "@caught_up"

Folder = tuple[str, str, str]  # displayName, parentFolderId, kind


def _epoch(value: Any) -> float | None:
    if not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


class MailboxNotFound(NotFound):
    """404 for the mailbox itself: no folder of it can be caught up."""


def watched_of(folders: dict[str, Folder]) -> dict[str, str]:
    """Folder id -> name of every stored folder that counts (see the module docstring)."""
    never = {fid for fid, (_name, _parent, kind) in folders.items() if kind in NEVER}
    watched = {}
    for fid, (name, _parent, _kind) in folders.items():
        current: str | None = fid
        for _ in range(MAX_DEPTH):  # below Sent Items, Drafts or Outbox: never
            if current is None or current in never:
                break
            current = folders[current][1] if current in folders else None
        else:
            current = None
        if current is None:
            watched[fid] = name
    return watched


class DeltaStore:
    """Delta links and folder knowledge of mailboxes, in Redis."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn

    def get(self, mailbox: str, folder_id: str) -> str | None:
        value = self.conn.hget(keys.graph_delta(mailbox), folder_id)
        return redis_conn.text(value) if value else None

    def put(self, mailbox: str, folder_id: str, link: str) -> None:
        self.conn.hset(keys.graph_delta(mailbox), folder_id, link)

    def drop(self, mailbox: str, folder_id: str) -> None:
        self.conn.hdel(keys.graph_delta(mailbox), folder_id)

    def links(self, mailbox: str) -> dict[str, str]:
        """Folder id -> stored link (``@caught_up`` left out)."""
        return {redis_conn.text(k): redis_conn.text(v)
                for k, v in self.conn.hgetall(keys.graph_delta(mailbox)).items() if redis_conn.text(k) != CAUGHT_UP}

    def mark_caught_up(self, mailbox: str, at: float | None = None) -> None:
        """``at``: when the complete round began (mail after it is surely new to a later round)."""
        self.conn.hset(keys.graph_delta(mailbox), CAUGHT_UP, repr(time.time() if at is None else at))

    def caught_up_at(self, mailbox: str) -> float | None:
        value = self.conn.hget(keys.graph_delta(mailbox), CAUGHT_UP)
        return float(value) if value else None

    def folders(self, mailbox: str) -> dict[str, Folder]:
        out: dict[str, Folder] = {}
        for k, v in self.conn.hgetall(keys.graph_folders(mailbox)).items():
            try:
                name, parent, kind = json.loads(v)
            except (ValueError, TypeError):
                continue  # a value we did not write: ignored, the next refresh replaces it
            out[redis_conn.text(k)] = (str(name or ""), str(parent or ""), str(kind or ""))
        return out

    def save_folders(self, mailbox: str, folders: dict[str, Folder]) -> None:
        """Replace the stored folder tree, and drop the links of folders no longer in it."""
        pipe = self.conn.pipeline()
        pipe.delete(keys.graph_folders(mailbox))
        if folders:
            pipe.hset(keys.graph_folders(mailbox), mapping={k: json.dumps(list(v)) for k, v in folders.items()})
        stale = [f for f in self.links(mailbox) if f not in folders]
        if stale:
            pipe.hdel(keys.graph_delta(mailbox), *stale)
        pipe.execute()

    def forget_folder(self, mailbox: str, folder_id: str) -> None:
        pipe = self.conn.pipeline()
        pipe.hdel(keys.graph_delta(mailbox), folder_id)
        pipe.hdel(keys.graph_folders(mailbox), folder_id)
        pipe.execute()

    def watched(self, mailbox: str) -> dict[str, str]:
        """Folder id -> name of the stored folders that count (no request to Graph)."""
        return watched_of(self.folders(mailbox))

    def forget_mailbox(self, mailbox: str) -> None:
        self.conn.delete(keys.graph_delta(mailbox), keys.graph_folders(mailbox))


# -- folders ------------------------------------------------------------------------------------
def _pages(client: GraphClient, url: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every item of a paged Graph collection (following @odata.nextLink)."""
    next_url: str | None = url
    while next_url:
        data = client.get_json(next_url, params=params)
        params = None  # the nextLink carries them
        yield from (v for v in data.get("value") or () if isinstance(v, dict))
        next_url = data.get("@odata.nextLink")


def read_folders(client: GraphClient, mailbox: str) -> dict[str, Folder]:
    """Every mail folder of ``mailbox`` (id -> name, parent, kind), read from Graph.

    The well-known ones in one ``$batch``; then the tree level by level, each level's child
    listings in ``$batch``es (their further pages followed one by one)."""
    user = user_path(mailbox)
    kinds: dict[str, str] = {}
    folders: dict[str, Folder] = {}
    answers = client.batch([{"url": f"{user}/mailFolders/{name}?$select={FOLDER_SELECT}"} for name in WELL_KNOWN])
    for name, answer in zip(WELL_KNOWN, answers):
        body = answer.get("body")
        if answer["status"] == 200 and isinstance(body, dict) and body.get("id"):
            kinds[str(body["id"])] = name
            folders[str(body["id"])] = (str(body.get("displayName") or name), str(body.get("parentFolderId") or ""),
                                        name)
        elif answer["status"] != 404:  # the mailbox lacks it (404) is fine; anything else is not
            raise client.error_of(answer["status"], answer.get("headers"), body)
    level: list[dict[str, Any]] = list(_pages(client, f"{user}/mailFolders", {
        "$select": FOLDER_SELECT, "$top": FOLDER_PAGE}))
    seen: set[str] = set()
    for _depth in range(MAX_DEPTH):
        parents = []
        for f in level:
            fid = str(f.get("id") or "")
            if not fid or fid in seen:
                continue
            seen.add(fid)
            folders[fid] = (str(f.get("displayName") or ""), str(f.get("parentFolderId") or ""), kinds.get(fid, ""))
            if int(f.get("childFolderCount") or 0) > 0:
                parents.append(fid)
        if not parents:
            break
        level = []
        urls = [f"{user}/mailFolders/{fid}/childFolders?$select={FOLDER_SELECT}&$top={FOLDER_PAGE}"
                for fid in parents]
        for answer in client.batch([{"url": u} for u in urls]):
            body = answer.get("body")
            if answer["status"] == 404:
                continue  # deleted while we read the tree
            if answer["status"] != 200 or not isinstance(body, dict):
                raise client.error_of(answer["status"], answer.get("headers"), body)
            level.extend(v for v in body.get("value") or () if isinstance(v, dict))
            if body.get("@odata.nextLink"):
                level.extend(_pages(client, str(body["@odata.nextLink"])))
    return folders


def watched_folders(client: GraphClient, mailbox: str, store: DeltaStore, refresh: bool = True) -> dict[str, str]:
    """Folder id -> display name of every folder that counts; read from Graph and stored when
    ``refresh`` (or nothing is stored yet), else from the stored tree."""
    if not refresh:
        stored = store.folders(mailbox)
        if stored:
            return watched_of(stored)
    folders = read_folders(client, mailbox)
    store.save_folders(mailbox, folders)
    return watched_of(folders)


# -- items ----------------------------------------------------------------------------------------
def _first_link(client: GraphClient, mailbox: str, folder_id: str) -> str:
    params = {"$select": DELTA_SELECT, "changeType": "created"}
    return client.url(f"{user_path(mailbox)}/mailFolders/{folder_id}/messages/delta", params)


def _folder_exists(client: GraphClient, mailbox: str, folder_id: str) -> bool:
    """Whether ``folder_id`` is there; ``MailboxNotFound`` raised when the mailbox itself is not."""
    try:
        client.get_json(f"{user_path(mailbox)}/mailFolders/{folder_id}", params={"$select": "id"})
        return True
    except NotFound:
        try:
            client.get_json(f"{user_path(mailbox)}/mailFolders/inbox", params={"$select": "id"})
        except NotFound as exc:
            raise MailboxNotFound(exc.status, exc.code, exc.message) from None
        return False


def catch_up_folder(client: GraphClient, mailbox: str, folder_id: str, store: DeltaStore, ledger: Ledger,
                    enqueue: Callable[[Sequence[NewMail]], None], *, since: float, page_size: int = PAGE_SIZE) -> int:
    """Enqueue every mail new in ``folder_id`` since its stored link (or in the whole folder, with
    none), received at or after ``since`` and not processed yet. Returns how many were enqueued."""
    log = logs.get_logger(mailbox=mailbox, folder=folder_id)
    url = store.get(mailbox, folder_id) or _first_link(client, mailbox, folder_id)
    total, resyncs, skipped_bare = 0, 0, 0
    seen: set[str] = set()
    while True:
        try:
            data = client.get_json(url, headers={"Prefer": f"odata.maxpagesize={page_size}"})
        except GraphError as exc:
            # a stored link on another host than graph_url (the setting changed) is as good as lost
            if not isinstance(exc, (SyncStateNotFound, NotFound)) and exc.code != "ForeignLink":
                raise
            if isinstance(exc, NotFound) and not _folder_exists(client, mailbox, folder_id):
                log.info("folder no longer exists; forgetting it")  # deleted: its mail went elsewhere
                store.forget_folder(mailbox, folder_id)
                return total
            resyncs += 1
            if resyncs > MAX_RESYNCS:
                raise
            if isinstance(exc, NotFound) or exc.code == "ForeignLink":
                log.warning("delta link not usable although the folder exists; reading the folder again",
                            error=exc.code)
            else:
                log.warning("delta token no longer known to Graph; reading the folder again "
                            "(processed mail is skipped)")
            store.drop(mailbox, folder_id)
            url = _first_link(client, mailbox, folder_id)
            continue
        now = time.time()
        candidates = []
        for entry in data.get("value") or ():
            if not isinstance(entry, dict) or "@removed" in entry:
                continue
            item_id = str(entry.get("id") or "")
            if not item_id or item_id in seen:
                continue  # the same item can come more than once in a round
            seen.add(item_id)
            received = _epoch(entry.get("receivedDateTime"))
            raw_id = entry.get("internetMessageId")
            if received is None and not raw_id:
                skipped_bare += 1
                continue
            if received is not None and received < since:
                continue  # old mail: listed by a first round, or moved in by the rep; not new
            message_id = normalize(str(raw_id or "")) or ""
            candidates.append((identity(message_id or None, item_id), item_id, message_id, received))
        done = ledger.processed(mailbox, [c[0] for c in candidates])
        mails = [NewMail(mailbox=mailbox, item_id=item_id, folder=folder_id, seen_at=now, via="catchup",
                         message_id=message_id, received_at=received or 0.0)
                 for ident, item_id, message_id, received in candidates if ident not in done]
        for start in range(0, len(mails), MAX_MAILS_PER_JOB):  # many mails per job: RQ's cost is per job
            enqueue(mails[start:start + MAX_MAILS_PER_JOB])
        if mails:
            metrics.CATCHUP_ITEMS.inc(len(mails))
            total += len(mails)
        next_link, delta_link = data.get("@odata.nextLink"), data.get("@odata.deltaLink")
        new_link = str(next_link or delta_link or "")
        if new_link:
            store.put(mailbox, folder_id, new_link)  # only now: everything before it is enqueued
        if not next_link:
            if not delta_link:
                raise GraphUnavailable(200, "NoDeltaLink", "a delta page ended without nextLink or deltaLink")
            break
        url = str(next_link)
    if total or skipped_bare:
        log.info("delta catch-up enqueued mail", items=total, state_changes_skipped=skipped_bare)
    return total


def catch_up_mailbox(client: GraphClient, mailbox: str, store: DeltaStore, ledger: Ledger,
                     enqueue: Callable[[Sequence[NewMail]], None], *, added_at: float | None = None,
                     folders: Iterable[str] | None = None, page_size: int = PAGE_SIZE) -> int:
    """Catch up ``folders`` (ids), or every folder that counts with the folder tree read first
    (then the mailbox is marked caught up, if every folder was). Returns how many mails were
    enqueued.

    A folder Graph refuses (its sync state lost again and again, a 403, a 404 that persists) is
    logged and the others are caught up all the same; then its error is raised, so the run is
    retried. Errors that are not the folder's are raised at once: the mailbox is gone, our
    credentials are refused, Graph is unavailable past the retry budget, Redis is down.

    The cut-off (``since``) is the ledger's horizon, or the last complete catch-up when that is
    older (mail that came during a long gap is still new), but never before ``added_at``; less
    ``SKEW_SECONDS``."""
    began = time.time()
    horizon = ledger.horizon()
    last = store.caught_up_at(mailbox)
    since = max(added_at or 0.0, min(horizon, last) if last is not None else horizon) - SKEW_SECONDS
    if folders is not None:
        order = list(folders)
    else:
        watched = watched_folders(client, mailbox, store, refresh=True)
        kinds = {fid: kind for fid, (_n, _p, kind) in store.folders(mailbox).items()}
        order = sorted(watched, key=lambda fid: (kinds.get(fid) not in FIRST, kinds.get(fid) != "inbox", fid))
    total = 0
    failed: list[GraphError] = []
    for fid in order:
        try:
            total += catch_up_folder(client, mailbox, fid, store, ledger, enqueue, since=since, page_size=page_size)
        except (MailboxNotFound, AuthenticationFailed, GraphUnavailable):
            raise
        except GraphError as exc:
            logs.get_logger(mailbox=mailbox, folder=fid).warning(
                "folder catch-up failed; carrying on with the others", status=exc.status, error=exc.code,
                detail=exc.message[:200])
            failed.append(exc)
    if failed:
        raise failed[0]
    if folders is None:
        store.mark_caught_up(mailbox, began)
    return total
