"""Workers read IMAP mail: the headers of a job's mails in one ``UID FETCH`` per folder.

A worker keeps one logged-in connection per mailbox it recently served (at most
``CACHED_MAILBOXES``; the least recently used is logged out, and one unused for half a slot's
life), so a job costs an EXAMINE and a FETCH, not a login. Each counts in the mailbox's
connection budget shared with the listeners (``session.Budget``). Everything is read with EXAMINE and ``BODY.PEEK``: a worker never marks a
rep's mail as read.

An item whose UID is gone (moved, deleted, the folder's UIDVALIDITY changed) is looked for by
its Message-ID in every selectable folder (``relocate``), so a reply the rep filed or deleted
before a worker got to it still counts; only mail that exists nowhere is ``ItemGone``.
"""
from __future__ import annotations

import collections
import contextlib
import datetime as dt
import threading
import time
from collections.abc import Sequence
from typing import Any

import imapclient
from imapclient.exceptions import IMAPClientError

from exchange_listener.core import redis_conn
from exchange_listener.core.config import Settings
from exchange_listener.mail.headers import addresses, header, mime_headers
from exchange_listener.mail.message_ids import normalize
from exchange_listener.sources.base import FetchedMessage, ItemGone, NewMail
from exchange_listener.sources.imap import session
from exchange_listener.sources.imap.scan import (
    MESSAGE_ID_ITEM,
    examine,
    item_id,
    parse_item_id,
    received_at,
)
from exchange_listener.sources.imap.session import (
    REDIS_ERRORS,
    SLOT_TTL,
    Budget,
    GoogleTokens,
    ImapError,
)

CACHED_MAILBOXES = 16  # logged-in connections a worker keeps (one per mailbox)
HEADER_ITEMS = ["UID", "INTERNALDATE", "BODY.PEEK[HEADER]"]
OWN_FLAGS = (b"\\Sent", b"\\Drafts")  # special-use folders our own mail sits in: never a reply
MESSAGE_ID_FIELD = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
REAP_EVERY = 5.0  # seconds between looks for connections unused for half a slot's life


class FetchError(Exception):
    """The IMAP server could not be asked (unreachable, refused, limit reached); the job retries."""


class ImapNotConfigured(FetchError):
    """An IMAP job ran in a worker whose settings do not configure IMAP."""


class _Connection:
    def __init__(self, client: imapclient.IMAPClient, slot: str):
        self.client = client
        self.slot = slot  # its place in the mailbox's connection budget
        self.renewed = self.used = time.monotonic()
        self.own_folders: set[str] | None = None
        self.lock = threading.Lock()
        self.closed = False


def _fetched(mailbox: str, the_id: str, folder: str, entry: dict[bytes, Any], outgoing: bool) -> FetchedMessage:
    raw = entry.get(b"BODY[HEADER]") or b""
    headers = mime_headers(bytes(raw))
    received = received_at(entry.get(b"INTERNALDATE"))
    senders = addresses(headers, "sender")
    froms = addresses(headers, "from")
    return FetchedMessage(
        mailbox=mailbox, item_id=the_id, internet_message_id=header(headers, "message-id"),
        subject=header(headers, "subject") or "", sender=next(iter(senders or froms), None),
        from_address=next(iter(froms), None), to=addresses(headers, "to"), cc=addresses(headers, "cc"),
        received_at=dt.datetime.fromtimestamp(received, dt.UTC) if received else None,
        conversation_id=None, in_reply_to=header(headers, "in-reply-to"), references=header(headers, "references"),
        headers=headers, outgoing=outgoing)


class ImapFetcher:
    """``MailFetcher`` for IMAP jobs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._connections: collections.OrderedDict[str, _Connection] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._budget: Budget | None = None  # made with its Redis connection on first use
        self._tokens = GoogleTokens(settings) if settings.imap_auth == "xoauth2-google" else None
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()

    def _reap(self) -> None:
        """Log out of connections unused for half a slot's life, jobs or no jobs: an idle worker
        must not sit on connections its lapsed slots no longer count (Gmail's 15 are shared with
        the rep's own clients)."""
        while not self._closed.wait(REAP_EVERY):
            now = time.monotonic()
            with self._lock:
                stale = [(m, c) for m, c in self._connections.items() if now - c.used > SLOT_TTL / 2]
            for mailbox, conn in stale:
                if conn.lock.acquire(blocking=False):  # not in use by a job right now
                    try:
                        self._discard(mailbox, conn)
                    except REDIS_ERRORS:
                        pass  # the connection is closed; its slot lapses on its own
                    finally:
                        conn.lock.release()

    def _slots(self) -> Budget:
        if self._budget is None:
            self._budget = Budget(self.settings.imap_max_connections_per_account,
                                  redis_conn.connect(self.settings.redis_url))
        return self._budget

    # -- connections ----------------------------------------------------------------------------
    def _connection(self, mailbox: str) -> _Connection:
        if not self.settings.imap_host:
            raise ImapNotConfigured("an IMAP job reached a worker without imap_host (and its credentials) set")
        now = time.monotonic()
        with self._lock:
            # idle ones would soon hold a lapsed slot: another process may have the room by then
            stale = [(m, c) for m, c in self._connections.items() if now - c.used > SLOT_TTL / 2]
            conn = self._connections.get(mailbox)
        for old_mailbox, old in stale:
            self._discard(old_mailbox, old)
        if conn is not None and now - conn.used <= SLOT_TTL / 2:
            if now - conn.renewed < SLOT_TTL / 3 or self._slots().renew(mailbox, conn.slot):
                conn.renewed = conn.used = now
                with self._lock:
                    self._connections.move_to_end(mailbox)
                return conn
            self._discard(mailbox, conn)  # its slot lapsed and was taken: queue up like anyone
        slot = self._slots().take(mailbox)
        try:
            client = session.connect(self.settings, mailbox, self._tokens)
        except BaseException:
            self._slots().give_back(mailbox, slot)
            raise
        client.normalise_times = False
        conn = _Connection(client, slot)
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="imap-reaper", daemon=True)
            self._reaper.start()
        evicted = []
        with self._lock:
            self._connections[mailbox] = conn
            while len(self._connections) > CACHED_MAILBOXES:
                evicted.append(self._connections.popitem(last=False))
        for old_mailbox, old in evicted:
            self._discard(old_mailbox, old)
        return conn

    def _discard(self, mailbox: str, conn: _Connection) -> None:
        with self._lock:
            if self._connections.get(mailbox) is conn:
                del self._connections[mailbox]
            if conn.closed:  # the reaper and a failing job may both get here: give the slot back once
                return
            conn.closed = True
        session.close(conn.client)
        self._slots().give_back(mailbox, conn.slot)

    def _call(self, mailbox: str, work: Any) -> Any:
        """``work(conn)`` on the mailbox's connection; a broken connection is made anew once."""
        for attempt in (1, 2):
            try:
                conn = self._connection(mailbox)
            except ImapError as exc:
                raise FetchError(str(exc)) from None
            except REDIS_ERRORS as exc:  # the connection budget lives in Redis
                raise FetchError(f"Redis unreachable for the IMAP connection budget: {exc}") from None
            try:
                with conn.lock:
                    if conn.closed:  # the reaper logged it out between our look-up and the lock
                        continue
                    return work(conn)
            except ItemGone:
                raise  # an answer about one item: the connection is fine
            except (IMAPClientError, OSError) as exc:
                self._discard(mailbox, conn)
                if attempt == 2 or isinstance(exc, IMAPClientError) and not _connection_lost(exc):
                    raise FetchError(f"IMAP for {mailbox} failed: {session.describe(exc, self.settings)}") from None
            except BaseException:
                # anything else mid-command (the job's timeout, an interrupt) leaves the server's
                # answer half read: that connection must never serve another job
                with contextlib.suppress(*REDIS_ERRORS):  # (its slot lapses on its own)
                    self._discard(mailbox, conn)
                raise
        raise FetchError(f"IMAP for {mailbox}: no usable connection")

    @staticmethod
    def _select(conn: _Connection, folder: str) -> int:
        """EXAMINE ``folder`` (again, when it is the one selected: only that tells this session
        of mail another session expunged or moved away since); its UIDVALIDITY."""
        return examine(conn.client, folder).uidvalidity

    def _own(self, conn: _Connection) -> set[str]:
        if conn.own_folders is None:
            conn.own_folders = {str(name) for flags, _d, name in conn.client.list_folders()
                                if any(f in flags for f in OWN_FLAGS)}
        return conn.own_folders

    # -- MailFetcher ----------------------------------------------------------------------------
    def fetch(self, mailbox: str, item_ids: Sequence[str]) -> list[FetchedMessage | ItemGone]:
        by_folder: dict[str, list[tuple[int, int, int]]] = collections.defaultdict(list)  # folder -> (index, validity, uid)
        out: list[FetchedMessage | ItemGone | None] = [None] * len(item_ids)
        for index, the_id in enumerate(item_ids):
            try:
                folder, validity, uid = parse_item_id(the_id)
            except ValueError as exc:
                out[index] = ItemGone(str(exc))
                continue
            by_folder[folder].append((index, validity, uid))

        def work(conn: _Connection) -> None:
            own = self._own(conn)
            for folder, wanted in by_folder.items():
                try:
                    validity = self._select(conn, folder)
                except IMAPClientError as exc:
                    if _connection_lost(exc):
                        raise
                    for index, _v, _u in wanted:  # the folder is gone (deleted, renamed)
                        out[index] = ItemGone(f"{mailbox}: folder {folder!r} cannot be opened: {str(exc)[:120]}")
                    continue
                current = [(i, u) for i, v, u in wanted if v == validity]
                for index, v, _u in wanted:
                    if v != validity:
                        out[index] = ItemGone(f"{mailbox}: folder {folder!r} was recreated (UIDVALIDITY {v} -> {validity})")
                data = conn.client.fetch([u for _i, u in current], HEADER_ITEMS) if current else {}
                for index, uid in current:
                    entry = data.get(uid)
                    if entry is None or not entry.get(b"BODY[HEADER]"):
                        out[index] = ItemGone(f"{mailbox}: UID {uid} no longer in {folder!r} (moved or deleted)")
                    else:
                        out[index] = _fetched(mailbox, item_ids[index], folder, entry, folder in own)

        if by_folder:
            self._call(mailbox, work)
        return [o if o is not None else ItemGone("not fetched") for o in out]

    def fetch_mime(self, mailbox: str, the_id: str) -> bytes:
        try:
            folder, validity, uid = parse_item_id(the_id)
        except ValueError as exc:
            raise ItemGone(str(exc)) from None

        def work(conn: _Connection) -> bytes:
            try:
                current = self._select(conn, folder)
            except IMAPClientError as exc:
                if _connection_lost(exc):
                    raise
                raise ItemGone(f"{mailbox}: folder {folder!r} cannot be opened") from None
            if current != validity:
                raise ItemGone(f"{mailbox}: folder {folder!r} was recreated")
            entry = conn.client.fetch([uid], ["BODY.PEEK[]"]).get(uid)
            if entry is None or entry.get(b"BODY[]") is None:
                raise ItemGone(f"{mailbox}: UID {uid} no longer in {folder!r}")
            return bytes(entry[b"BODY[]"])

        result: bytes = self._call(mailbox, work)
        return result

    def fetch_texts(self, mailbox: str, item_ids: Sequence[str]) -> list[str | None | ItemGone]:
        return [None for _ in item_ids]  # IMAP has no "text this message added": the caller reads MIME

    def relocate(self, mailbox: str, mail: NewMail) -> FetchedMessage | ItemGone:
        """The gone ``mail`` wherever it is now (found by Message-ID in every selectable folder)."""
        if not mail.message_id:
            return ItemGone(f"{mailbox}: item {mail.item_id[:80]} is gone and has no Message-ID to look for")

        def work(conn: _Connection) -> str | None:
            folders = [str(name) for flags, _d, name in conn.client.list_folders() if b"\\Noselect" not in flags]
            try:
                start = folders.index(mail.folder)  # where it was first (a recreated folder), then the rest
                folders.insert(0, folders.pop(start))
            except ValueError:
                pass
            wanted = normalize(mail.message_id)
            for folder in folders:
                try:
                    validity = self._select(conn, folder)
                except IMAPClientError as exc:
                    if _connection_lost(exc):
                        raise
                    continue
                # SEARCH HEADER matches a substring: confirm the whole Message-ID before taking it
                uids = sorted((int(u) for u in conn.client.search(["HEADER", "Message-ID", mail.message_id])),
                              reverse=True)
                if not uids:
                    continue
                for uid, entry in conn.client.fetch(uids[:20], [MESSAGE_ID_FIELD]).items():
                    raw = entry.get(MESSAGE_ID_ITEM)
                    if isinstance(raw, bytes) and normalize(header(mime_headers(raw), "message-id")) == wanted:
                        return item_id(folder, validity, int(uid))
            return None

        found = self._call(mailbox, work)
        if found is None:
            return ItemGone(f"{mailbox}: {mail.message_id} exists in no folder")
        (fetched,) = self.fetch(mailbox, [found])
        return fetched

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            connections = list(self._connections.items())
        for mailbox, conn in connections:
            with contextlib.suppress(*REDIS_ERRORS):  # the slots lapse on their own
                self._discard(mailbox, conn)


def _connection_lost(exc: BaseException) -> bool:
    """imaplib's abort (EOF, BYE, a socket error) rather than a NO/BAD about one command."""
    return isinstance(exc, imapclient.IMAPClient.AbortError)
