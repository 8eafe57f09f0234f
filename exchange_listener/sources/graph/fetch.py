"""Fetch new mail from Microsoft Graph for workers: one ``$batch`` per job, MIME only when needed.

Ids are immutable (``Prefer: IdType="ImmutableId"``, see ``client``): a mail a rule or the rep
moved keeps its id, so a job finds it wherever it is now and no relocation is needed; an item
Graph no longer has (hard-deleted, moved to another mailbox) is ``ItemGone``.

Headers come from ``internetMessageHeaders`` (Graph returns them only when ``$select``-ed). When
they are missing, empty, or lack both In-Reply-To and References (Graph's copy is sometimes
incomplete), the MIME source (``/$value``) of every such item of the job is read in a second
``$batch`` and its header block parsed instead; the MIME is kept for the job's ``fetch_mime``
(a small per-process cache), so a mail whose body is read anyway costs no third request.

``outgoing`` is set for mail in Sent Items, Drafts or Outbox: their folder ids are asked once
per mailbox (in the job's first ``$batch``) and cached in-process.

``fetch_texts`` reads ``uniqueBody`` as text (``Prefer: outlook.body-content-type="text"``), the
part of a reply its sender wrote, in one ``$batch``: far smaller than the MIME.

Nothing is built at construction (``warm_up`` builds every fetcher in every worker, also where
Graph is not configured): a Graph job without Graph settings fails with ``GraphNotConfigured``.
"""
from __future__ import annotations

import collections
import datetime as dt
import email.policy
import re
from collections.abc import Callable, Sequence
from email.parser import BytesHeaderParser
from typing import Any, TypeVar
from urllib.parse import quote

from exchange_listener.core import logs
from exchange_listener.core.config import ConfigError, Settings
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
OWN_FOLDERS = ("sentitems", "drafts", "outbox")  # well-known names of the folders our own mail sits in
MAX_MAILBOXES = 2048  # mailboxes whose own-folder ids are cached per process
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


def header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


def needs_mime_headers(headers: Sequence[tuple[str, str]]) -> bool:
    """Graph's header copy cannot tell whether this is a reply: read them from the MIME."""
    return not headers or (header(headers, "in-reply-to") is None and header(headers, "references") is None)


_FOLD = re.compile(r"\r?\n[ \t]+")


def _clean(text: str) -> str:
    """Unfolded, stripped, and valid UTF-8 (undecodable bytes become U+FFFD, never surrogates)."""
    text = _FOLD.sub(" ", text).replace("\r", "").replace("\n", " ").strip()
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def mime_headers(raw: bytes) -> list[tuple[str, str]]:
    """The header block of a MIME source as (name, value) pairs, in order. Never raises: a header
    ``email`` cannot parse keeps its raw (unfolded) text; an unparseable source gives []."""
    try:
        msg = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
        items = msg.raw_items()
    except Exception:  # noqa: BLE001 - broken MIME must not crash the job; the JSON headers stay
        return []
    out = []
    for name, value in items:
        try:
            text = str(email.policy.default.header_fetch_parse(name, value))
        except Exception:  # noqa: BLE001 - e.g. an address header email's parser chokes on
            text = str(value)
        out.append((_clean(str(name)), _clean(text)))
    return out


def _fetched(mailbox: str, item_id: str, body: dict[str, Any], own: frozenset[str]) -> FetchedMessage:
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
        outgoing=bool(body.get("parentFolderId")) and body.get("parentFolderId") in own,
    )


def _error_code(answer: dict[str, Any]) -> str:
    body = answer.get("body")
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code") or "") if isinstance(error, dict) else ""


class GraphFetcher:
    """``MailFetcher`` for Microsoft Graph. Cheap to create; the client is built on first use."""

    def __init__(self, settings: Settings, *, client: GraphClient | None = None):
        self.settings = settings
        self._client = client
        self._own: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()
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
    def _remember_own(self, mailbox: str, answers: Sequence[dict[str, Any]]) -> frozenset[str]:
        ids = set()
        complete = True
        for answer in answers:
            body = answer.get("body")
            if answer["status"] == 200 and isinstance(body, dict) and body.get("id"):
                ids.add(str(body["id"]))
            elif answer["status"] != 404:  # a 404: this mailbox has no such folder; anything else: ask again
                complete = False
        own = frozenset(ids)
        if complete:
            key = mailbox.lower()
            self._own[key] = own
            self._own.move_to_end(key)
            while len(self._own) > MAX_MAILBOXES:
                self._own.popitem(last=False)
        else:
            log.info("own-mail folder ids not all read; asking again with the next job", mailbox=mailbox)
        return own

    # -- MailFetcher --------------------------------------------------------------------------------
    def fetch(self, mailbox: str, item_ids: Sequence[str]) -> list[FetchedMessage | ItemGone]:
        if not item_ids:
            return []
        client = self.client
        user = user_path(mailbox)
        own = self._own.get(mailbox.lower())
        requests_ = [{"url": f"{user}/messages/{_quote_id(i)}?$select={SELECT}"} for i in item_ids]
        if own is None:
            requests_ += [{"url": f"{user}/mailFolders/{name}?$select=id"} for name in OWN_FOLDERS]
        answers = self._call("$batch of messages", mailbox, lambda: client.batch(requests_))
        if own is None:
            own = self._remember_own(mailbox, answers[len(item_ids):])
        results: list[FetchedMessage | ItemGone] = []
        for item_id, answer in zip(item_ids, answers):
            body = answer.get("body")
            if answer["status"] == 200 and isinstance(body, dict):
                results.append(_fetched(mailbox, item_id, body, own))
            else:
                results.append(self._gone(mailbox, item_id, answer, "GET message"))
        incomplete = [r for r in results if isinstance(r, FetchedMessage) and needs_mime_headers(r.headers)]
        if incomplete:
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
