"""Fetch new mail from Microsoft Graph for workers: one ``$batch`` per job, MIME only when needed.

Ids are immutable (``Prefer: IdType="ImmutableId"``, see ``client``): a mail a rule or the rep
moved keeps its id, so a job finds it wherever it is now and no relocation is needed; an item
Graph no longer has (hard-deleted, moved to another mailbox) is ``ItemGone``.

Headers come from ``internetMessageHeaders`` (Graph returns them only when ``$select``-ed). When
they are missing, empty, or lack both In-Reply-To and References (Graph's copy is sometimes
incomplete), the MIME source (``/$value``) of every such item of the job is read in a second
``$batch`` and its header block parsed instead; the MIME is kept for the job's ``fetch_mime``
(a small per-process cache), so a mail whose body is read anyway costs no third request.

``outgoing`` is set for mail in Sent Items, Drafts or Outbox or any folder below them (the rep
files a manual "Re:" in Sent Items\\Customers too; delta leaves the same subtrees out). The ids of
those three folders, and of a few folders known not to be below them (msgfolderroot, Inbox, Junk
Email, Deleted Items, Recoverable Items\\Deletions), are asked once per mailbox in the job's first
``$batch`` and cached in-process; they must all be answered (200, or 404 for a folder the mailbox
lacks), else the job fails with ``FetchError`` and is retried: a job never decides with part of
them. Any other folder's place is found by walking its ``parentFolderId`` chain up (one ``$batch``
per level for every folder of the job) to one of those; each folder's verdict is then cached for
``FOLDER_TTL`` seconds (a rep may move a folder). Outgoing mail is skipped by the job, so its MIME
is never read (Graph gives Sent Items and Drafts no ``internetMessageHeaders``).

The listener's stored folder tree (``el:graph:folders:<mailbox>``) is not used: a worker's fetcher
has no Redis, and that tree is only as fresh as the last full catch-up.

``fetch_texts`` reads ``uniqueBody`` as text (``Prefer: outlook.body-content-type="text"``), the
part of a reply its sender wrote, in one ``$batch``: far smaller than the MIME.

Nothing is built at construction (``warm_up`` builds every fetcher in every worker, also where
Graph is not configured): a Graph job without Graph settings fails with ``GraphNotConfigured``.
"""
from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from exchange_listener.core import logs
from exchange_listener.core.config import ConfigError, Settings
from exchange_listener.mail.headers import header, mime_headers
from exchange_listener.mail.text import html_to_text
from exchange_listener.sources.base import FetchedMessage, ItemGone, ItemUnreadable
from exchange_listener.sources.graph.client import (
    GraphClient,
    GraphError,
    NotFound,
    body_bytes,
    user_path,
)

SELECT = ("internetMessageId,internetMessageHeaders,from,sender,toRecipients,ccRecipients,subject,"
          "receivedDateTime,parentFolderId,conversationId")
OWN_FOLDERS = ("sentitems", "drafts", "outbox")  # well-known names of the folders our own mail sits in (and below)
# well-known folders that are not below those: a walk up a folder's parents ends there (not our own)
NOT_OWN_FOLDERS = ("msgfolderroot", "inbox", "junkemail", "deleteditems", "recoverableitemsdeletions")
MAX_MAILBOXES = 2048  # mailboxes whose folder verdicts are cached per process
MAX_FOLDERS = 1024  # folder verdicts cached per mailbox (the well-known ones above come on top)
FOLDER_TTL = 600.0  # seconds a folder's learned place is trusted (a rep can move a folder)
MAX_DEPTH = 64  # parent levels walked at most; deeper is taken as not our own
MIME_CACHE_ITEMS = 32  # MIME sources kept from the fallback for the job's fetch_mime
MIME_CACHE_BYTES = 32 * 1024 * 1024
TEXT_LIMIT = 8192  # characters of uniqueBody the classifier gets: only the start of a reply matters
# Graph error codes (Exchange's, passed through) of an item that exists but cannot be returned
UNREADABLE = frozenset({"ErrorItemCorrupt", "ErrorCorruptData", "ErrorMimeContentConversionFailed",
                        "ErrorCannotOpenFileAttachment", "ErrorMessageSizeExceeded"})
# ... and of an id that names no item (a 400 rather than a 404)
GONE = frozenset({"ErrorInvalidIdMalformed", "ErrorInvalidId", "ErrorItemNotFound"})
# Graph's derived message types for meeting mail -> an EWS-style item class the classifier knows
MEETING_CLASSES = {
    "#microsoft.graph.eventMessageRequest": "IPM.Schedule.Meeting.Request",
    "#microsoft.graph.eventMessageResponse": "IPM.Schedule.Meeting.Resp",
    "#microsoft.graph.eventMessage": "IPM.Schedule.Meeting.Notification",
}

log = logs.get_logger(component="graph.fetch")
T = TypeVar("T")


class FetchError(Exception):
    """Graph could not be asked (network, auth, throttling, server error); the job should retry."""


class GraphNotConfigured(FetchError):
    """A Graph job ran in a worker whose settings do not configure Graph."""


def _quote_id(item_id: str) -> str:
    return quote(item_id, safe="=-_")


def _address(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    address = (value.get("emailAddress") or {}).get("address")
    return str(address) if address else None


def _addresses(values: Any) -> list[str]:
    return [a for a in (_address(v) for v in values or ()) if a]


def _received_at(value: Any) -> dt.datetime | None:
    if not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None  # the job then uses when the listener saw the mail
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def needs_mime_headers(headers: Sequence[tuple[str, str]]) -> bool:
    """Graph's header copy cannot tell whether this is a reply: read them from the MIME."""
    return not headers or (header(headers, "in-reply-to") is None and header(headers, "references") is None)


def _fetched(mailbox: str, item_id: str, body: dict[str, Any]) -> FetchedMessage:
    headers = [(str(h.get("name") or ""), str(h.get("value") or ""))
               for h in body.get("internetMessageHeaders") or () if isinstance(h, dict)]
    return FetchedMessage(
        mailbox=mailbox,
        item_id=item_id,
        internet_message_id=body.get("internetMessageId") or None,
        subject=body.get("subject") or "",
        sender=_address(body.get("sender")),
        from_address=_address(body.get("from")),
        to=_addresses(body.get("toRecipients")),
        cc=_addresses(body.get("ccRecipients")),
        received_at=_received_at(body.get("receivedDateTime")),
        conversation_id=body.get("conversationId") or None,
        in_reply_to=header(headers, "in-reply-to"),
        references=header(headers, "references"),
        headers=headers,
        item_class=MEETING_CLASSES.get(str(body.get("@odata.type") or "")),
    )


def _error_code(answer: dict[str, Any]) -> str:
    body = answer.get("body")
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code") or "") if isinstance(error, dict) else ""


class _Folders:
    """What one mailbox's folders are known to be: own (below Sent Items, Drafts, Outbox) or not.
    The well-known ones for good; the others learned by walking up, each until ``FOLDER_TTL``."""

    def __init__(self, fixed: dict[str, bool]):
        self.fixed = fixed
        self.learned: dict[str, tuple[bool, float]] = {}  # folder id -> (own, monotonic expiry)

    def verdict(self, folder_id: str, now: float) -> bool | None:
        if folder_id in self.fixed:
            return self.fixed[folder_id]
        known = self.learned.get(folder_id)
        if known is None:
            return None
        if known[1] <= now:
            del self.learned[folder_id]
            return None
        return known[0]

    def learn(self, folder_ids: Sequence[str], own: bool, now: float) -> None:
        for folder_id in folder_ids:
            if folder_id not in self.fixed:
                self.learned.pop(folder_id, None)
                self.learned[folder_id] = (own, now + FOLDER_TTL)
        while len(self.learned) > MAX_FOLDERS:
            del self.learned[next(iter(self.learned))]  # the oldest learned


class GraphFetcher:
    """``MailFetcher`` for Microsoft Graph. Cheap to create; the client is built on first use."""

    def __init__(self, settings: Settings, *, client: GraphClient | None = None):
        self.settings = settings
        self._client = client
        self._folders: collections.OrderedDict[str, _Folders] = collections.OrderedDict()
        self._mime: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()

    @property
    def client(self) -> GraphClient:
        if self._client is None:
            s = self.settings
            missing = [k for k, ok in (("client_id", s.client_id),
                                       ("client_secret or client_certificate_file",
                                        s.client_secret or s.client_certificate_file),
                                       ("tenant_id or token_url", s.tenant_id or s.token_url)) if not ok]
            if missing:
                raise GraphNotConfigured(f"a Graph job needs Graph settings in the worker: {', '.join(missing)} not set")
            self._client = GraphClient(s)
        return self._client

    def _call(self, what: str, mailbox: str, fn: Callable[[], T]) -> T:
        """``fn()``, with Graph and settings errors turned into ``FetchError`` (the job retries)."""
        try:
            return fn()
        except (GraphError, ConfigError) as exc:
            raise FetchError(f"{what} for {mailbox} failed: {exc}") from None

    def _gone(self, mailbox: str, item_id: str, answer: dict[str, Any], what: str) -> ItemGone:
        """``ItemGone``/``ItemUnreadable`` for a failed sub-response; ``FetchError`` for anything else."""
        status, code, short = answer["status"], _error_code(answer), item_id[-16:]
        if status == 404 or (status == 400 and code in GONE):
            return ItemGone(f"{mailbox}: item …{short} not found ({code or status})")
        if code in UNREADABLE:
            return ItemUnreadable(f"{mailbox}: item …{short} cannot be read ({code})")
        error = self.client.error_of(status, answer.get("headers"), answer.get("body"))
        raise FetchError(f"{what} for {mailbox} item …{short} failed: {error}")

    # -- own folders -------------------------------------------------------------------------------
    def _known_folders(self, mailbox: str, answers: Sequence[dict[str, Any]]) -> _Folders:
        """The well-known folders' ids from the job's first ``$batch`` (``OWN_FOLDERS`` then
        ``NOT_OWN_FOLDERS``). Cached only when all three own folders were found. ``FetchError``
        (the job is retried rather than deciding with part of them, nothing is cached) when an
        own folder's lookup failed otherwise than 404, or any lookup was throttled past the
        budget or met a server error; a not-own folder refused for good (a 4xx) only makes walks
        longer."""
        fixed: dict[str, bool] = {}
        found_own = 0
        for name, answer in zip(OWN_FOLDERS + NOT_OWN_FOLDERS, answers):
            body = answer.get("body")
            if answer["status"] == 200 and isinstance(body, dict) and body.get("id"):
                own = name in OWN_FOLDERS
                fixed.setdefault(str(body["id"]), own)
                found_own += own
            elif answer["status"] != 404:  # a 404: this mailbox has no such folder
                status = answer["status"]
                error = self.client.error_of(status, answer.get("headers"), body)
                if name in OWN_FOLDERS or status in (0, 429) or status >= 500:
                    raise FetchError(f"own-mail folder ids of {mailbox} not all read ({name}: {error}); "
                                     "the job is retried")
                log.warning("well-known folder refused; walks go past it", mailbox=mailbox, folder=name,
                            error=str(error))
        folders = _Folders(fixed)
        if found_own == len(OWN_FOLDERS):  # else the mailbox itself is missing (or new): ask again next time
            key = mailbox.lower()
            self._folders[key] = folders
            self._folders.move_to_end(key)
            while len(self._folders) > MAX_MAILBOXES:
                self._folders.popitem(last=False)
        return folders

    def _own_of(self, mailbox: str, folders: _Folders, folder_ids: set[str]) -> dict[str, bool]:
        """Folder id -> whether it is one of the own-mail folders or below one: each unknown
        folder's parent chain walked up to a folder whose place is known, one ``$batch`` per
        level for all of them. A folder Graph no longer has (404) ends its chain as not our own
        (not cached: the mail has moved since; where it is now is what counts)."""
        client = self.client
        user = user_path(mailbox)
        now = time.monotonic()
        out: dict[str, bool] = {}
        chains = {fid: [fid] for fid in folder_ids}
        for _level in range(MAX_DEPTH + 1):
            for start, chain in list(chains.items()):
                known = folders.verdict(chain[-1], now)
                if known is not None:
                    out[start] = known
                    folders.learn(chain[:-1], known, now)
                    del chains[start]
            if not chains:
                return out
            ask = sorted({chain[-1] for chain in chains.values()})
            lookups = [{"url": f"{user}/mailFolders/{_quote_id(fid)}?$select=parentFolderId"} for fid in ask]
            answers = self._call("$batch of folders", mailbox, lambda: client.batch(lookups))  # noqa: B023 - called at once
            parents: dict[str, str | None] = {}
            for fid, answer in zip(ask, answers):
                body = answer.get("body")
                if answer["status"] == 200 and isinstance(body, dict):
                    parents[fid] = str(body.get("parentFolderId") or "")
                elif answer["status"] == 404 or (answer["status"] == 400 and _error_code(answer) in GONE):
                    parents[fid] = None
                elif answer["status"] == 403:
                    # refused for good: retrying would fail the whole job every time, the other mails
                    # with it; taken as not our own, as a gone folder is (other 4xx are retried)
                    log.warning("folder lookup refused; taken as not our own", mailbox=mailbox, folder=fid,
                                status=answer["status"], error=_error_code(answer))
                    parents[fid] = None
                else:
                    error = client.error_of(answer["status"], answer.get("headers"), body)
                    raise FetchError(f"GET mailFolder for {mailbox} failed: {error}")
            for start, chain in list(chains.items()):
                parent = parents[chain[-1]]
                if parent is None:  # gone: not cached
                    out[start] = False
                    del chains[start]
                elif not parent or parent in chain:  # the top of the store (or a loop): not below our folders
                    out[start] = False
                    folders.learn(chain, False, now)
                    del chains[start]
                else:
                    chain.append(parent)
        log.warning("folder deeper than the walk allows; taken as not our own", mailbox=mailbox, folders=len(chains))
        out.update({start: False for start in chains})
        return out

    # -- MailFetcher --------------------------------------------------------------------------------
    def fetch(self, mailbox: str, item_ids: Sequence[str]) -> list[FetchedMessage | ItemGone]:
        if not item_ids:
            return []
        client = self.client
        user = user_path(mailbox)
        folders = self._folders.get(mailbox.lower())
        requests_ = [{"url": f"{user}/messages/{_quote_id(i)}?$select={SELECT}"} for i in item_ids]
        if folders is None:
            requests_ += [{"url": f"{user}/mailFolders/{name}?$select=id"} for name in OWN_FOLDERS + NOT_OWN_FOLDERS]
        answers = self._call("$batch of messages", mailbox, lambda: client.batch(requests_))
        if folders is None:
            folders = self._known_folders(mailbox, answers[len(item_ids):])
        results: list[FetchedMessage | ItemGone] = []
        parent_of: dict[str, str] = {}
        for item_id, answer in zip(item_ids, answers):
            body = answer.get("body")
            if answer["status"] == 200 and isinstance(body, dict):
                results.append(_fetched(mailbox, item_id, body))
                parent_of[item_id] = str(body.get("parentFolderId") or "")
            else:
                results.append(self._gone(mailbox, item_id, answer, "GET message"))
        fetched = [r for r in results if isinstance(r, FetchedMessage)]
        own = self._own_of(mailbox, folders, {p for p in parent_of.values() if p})
        for item in fetched:
            item.outgoing = own.get(parent_of[item.item_id], False)
        incomplete = [m for m in fetched if not m.outgoing and needs_mime_headers(m.headers)]
        if incomplete:  # our own mail is skipped by the job: its headers are never needed
            self._headers_from_mime(mailbox, incomplete, results)
        return results

    def _headers_from_mime(self, mailbox: str, items: list[FetchedMessage],
                           results: list[FetchedMessage | ItemGone]) -> None:
        """Replace the headers of ``items`` with those of their MIME source (one ``$batch``)."""
        client = self.client
        user = user_path(mailbox)
        requests_ = [{"url": f"{user}/messages/{_quote_id(m.item_id)}/$value"} for m in items]
        answers = self._call("$batch of MIME sources", mailbox, lambda: client.batch(requests_))
        for item, answer in zip(items, answers):
            if answer["status"] != 200:
                gone = self._gone(mailbox, item.item_id, answer, "GET $value")
                if not isinstance(gone, ItemUnreadable):  # gone since the first batch
                    results[next(n for n, r in enumerate(results) if r is item)] = gone
                continue  # unreadable MIME: Graph's headers decide
            raw = body_bytes(answer.get("body"))
            headers = mime_headers(raw)
            if headers:
                item.headers = headers
                item.in_reply_to = header(headers, "in-reply-to")
                item.references = header(headers, "references")
            else:
                log.info("MIME source without a readable header block; Graph's headers kept", mailbox=mailbox,
                         item_id=item.item_id[-16:])
            item.mime = raw
            self._keep_mime(mailbox, item.item_id, raw)

    def _keep_mime(self, mailbox: str, item_id: str, raw: bytes) -> None:
        if len(raw) > MIME_CACHE_BYTES // 4:
            return
        self._mime[(mailbox.lower(), item_id)] = raw
        while len(self._mime) > MIME_CACHE_ITEMS or sum(len(v) for v in self._mime.values()) > MIME_CACHE_BYTES:
            self._mime.popitem(last=False)

    def fetch_mime(self, mailbox: str, item_id: str) -> bytes:
        cached = self._mime.pop((mailbox.lower(), item_id), None)
        if cached is not None:
            return cached
        client = self.client
        url = f"{user_path(mailbox)}/messages/{_quote_id(item_id)}/$value"
        try:
            return client.request("GET", url).content
        except NotFound:
            raise ItemGone(f"{mailbox}: item …{item_id[-16:]} not found") from None
        except GraphError as exc:
            if exc.code in UNREADABLE:
                raise ItemUnreadable(f"{mailbox}: item …{item_id[-16:]} cannot be read ({exc.code})") from None
            if exc.status == 400 and exc.code in GONE:
                raise ItemGone(f"{mailbox}: item …{item_id[-16:]} not found ({exc.code})") from None
            raise FetchError(f"GET $value for {mailbox} failed: {exc}") from None
        except ConfigError as exc:
            raise FetchError(f"GET $value for {mailbox} failed: {exc}") from None

    def fetch_text(self, mailbox: str, item_id: str) -> str:
        """The text this message added (Graph's uniqueBody, as text), bounded; empty when none."""
        (text,) = GraphFetcher.fetch_texts(self, mailbox, [item_id])
        if isinstance(text, ItemGone):
            raise text
        return text or ""

    def fetch_texts(self, mailbox: str, item_ids: Sequence[str]) -> list[str | None | ItemGone]:
        """``uniqueBody`` of each item as plain text (one ``$batch``); None when Graph gives none
        (the caller then reads the MIME), ``ItemGone`` for a missing or unreadable item."""
        if not item_ids:
            return []
        client = self.client
        user = user_path(mailbox)
        requests_ = [{"url": f"{user}/messages/{_quote_id(i)}?$select=uniqueBody",
                      "headers": {"Prefer": 'outlook.body-content-type="text"'}} for i in item_ids]
        answers = self._call("$batch of texts", mailbox, lambda: client.batch(requests_))
        out: list[str | None | ItemGone] = []
        for item_id, answer in zip(item_ids, answers):
            body = answer.get("body")
            if answer["status"] != 200 or not isinstance(body, dict):
                out.append(self._gone(mailbox, item_id, answer, "GET uniqueBody"))
                continue
            unique = body.get("uniqueBody")
            if not isinstance(unique, dict) or unique.get("content") is None:
                out.append(None)
                continue
            content = str(unique.get("content") or "")
            text = html_to_text(content) if str(unique.get("contentType") or "").lower() == "html" else content
            out.append(text[:TEXT_LIMIT])
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._mime.clear()
