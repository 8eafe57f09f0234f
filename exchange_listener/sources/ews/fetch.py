"""Fetch new mail from Exchange for workers: one GetItem per job, MIME only on request.

A mail that is gone by the time its job runs (the rep moved it, deleted it to Deleted Items or
hard-deleted it to Recoverable Items: each gives it a new id) is found again by ``relocate``:
first through the moves the listener recorded from MovedEvents, then, when the job knows the
mail's Internet Message-ID (catch-up reads it), by FindItem over every folder that counts.

exchangelib objects are built lazily, in the process that uses them, and tagged with that
process's pid: a Protocol (its HTTP sessions and cookie jar) created before a fork is never
reused after it. Items are fetched through exchangelib's GetItem service with an explicit
field list, so no GetFolder round trip is spent finding a folder to validate fields against.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import datetime as dt
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import redis
import requests.exceptions
from exchangelib import Account, Configuration, Message
from exchangelib.errors import (
    ErrorCorruptData,
    ErrorInvalidIdMalformed,
    ErrorItemCorrupt,
    ErrorItemNotFound,
    ErrorMimeContentConversionFailed,
    EWSError,
)
from exchangelib.fields import FieldPath
from exchangelib.items import ID_ONLY
from exchangelib.properties import ItemId
from exchangelib.protocol import Protocol
from exchangelib.services import FindItem, GetItem
from exchangelib.services.common import item_ids_element, shape_element
from exchangelib.util import TNS, create_element

from exchange_listener.core import redis_conn
from exchange_listener.core.config import SECRET_KEYS, Settings
from exchange_listener.mail.text import html_to_text
from exchange_listener.sources.base import (
    FetchedMessage,
    ItemGone,
    ItemUnreadable,
    NewMail,
)
from exchange_listener.sources.ews.account import make_account, make_configuration
from exchange_listener.sources.ews.catch_up import SyncStore, folder_ref
from exchange_listener.sources.ews.wire import WholeBody
from exchange_listener.sources.ledger import Ledger

# exchangelib field name -> what it is in FetchedMessage; names checked against exchangelib 5.6.
HEADER_FIELDS = (
    "message_id",  # InternetMessageId
    "in_reply_to",  # InReplyTo
    "references",  # References
    "headers",  # InternetMessageHeaders
    "subject",
    "sender",
    "author",  # From
    "to_recipients",
    "cc_recipients",
    "datetime_received",
    "conversation_id",
    "item_class",  # IPM.Schedule.Meeting.* (meeting responses) are calendar machinery, not replies
)
MAX_ACCOUNTS = 2048  # Account objects cached per process (cheap, but not unbounded)


class FetchError(Exception):
    """EWS could not be asked (network, auth, throttling, server error); the job should retry."""




class _GetItem(WholeBody, GetItem):
    """exchangelib's GetItem, parsing the response body in one piece (see ``wire``).

    With ``raw=True`` each item is handed back as its XML element: building exchangelib's
    Message model looks up every one of its ~60 fields, most of the CPU a batched fetch costs,
    for the dozen ``fetch`` reads (``_fetched`` reads those). Requests, auth, throttling and
    error responses stay exchangelib's.
    """

    raw = False
    _shapes: ClassVar[dict[tuple, Any]] = {}  # (shape, field paths, version) -> the ItemShape element, built once

    def _elem_to_obj(self, elem: Any) -> Any:
        return elem if self.raw else super()._elem_to_obj(elem)

    def get_payload(self, items: Any, additional_fields: Any, shape: Any) -> Any:
        """exchangelib's request, with the ItemShape built once per field set (building it from the
        field models was a tenth of a worker's CPU per reply) and plain ItemIds (ours carry no
        ChangeKey); tests/test_fetch.py checks it is byte for byte what exchangelib builds."""
        version = self.account.version
        key = (shape, tuple(sorted((getattr(f.field, "field_uri", ""), f.path) for f in additional_fields or ())),
               str(version))
        cached = _GetItem._shapes.get(key)
        if cached is None:
            cached = _GetItem._shapes[key] = shape_element(tag="m:ItemShape", shape=shape,
                                                           additional_fields=additional_fields, version=version)
        payload = create_element(f"m:{self.SERVICE_NAME}")
        payload.append(copy.deepcopy(cached))
        ids = create_element("m:ItemIds")
        for item in items:
            if type(item) is not ItemId or item.changekey:  # a subclass has another element name
                payload.append(item_ids_element(items=items, version=version))  # exchangelib's own, as it was
                return payload
            ids.append(create_element("t:ItemId", attrs={"Id": item.id}))
        payload.append(ids)
        return payload


class _FindItem(WholeBody, FindItem):
    pass


class _MessageIdIs:
    """A FindItem restriction ``message:InternetMessageId == value`` (exchangelib's own Q needs
    Folder objects, i.e. GetFolder round trips, only to validate one field name)."""

    def __init__(self, message_id: str):
        self.message_id = message_id

    def to_xml(self, version: Any) -> Any:
        restriction = create_element("m:Restriction")
        equal = create_element("t:IsEqualTo")
        equal.append(create_element("t:FieldURI", attrs={"FieldURI": "message:InternetMessageId"}))
        constant = create_element("t:FieldURIOrConstant")
        constant.append(create_element("t:Constant", attrs={"Value": self.message_id}))
        equal.append(constant)
        restriction.append(equal)
        return restriction


def _field_paths(names: Sequence[str]) -> set[FieldPath]:
    return {FieldPath(field=Message.get_field_by_fieldname(name)) for name in names}


_HEADER_PATHS = _field_paths(HEADER_FIELDS)
_MIME_PATHS = _field_paths(("mime_content",))
_TEXT_PATHS = _field_paths(("unique_body",))
TEXT_LIMIT = 8192  # characters of UniqueBody the classifier gets: only the start of a reply matters


def _t(name: str) -> str:
    return f"{{{TNS}}}{name}"


_MAILBOX, _EMAIL = _t("Mailbox"), _t("EmailAddress")


def _text(elem: Any, name: str) -> str | None:
    """A child's text as exchangelib reads a text field (``get_xml_attr``): None when absent or empty."""
    child = elem.find(name)
    return None if child is None else child.text or None


def _mailbox_of(elem: Any, name: str) -> str | None:
    wrapper = elem.find(name)
    mailbox = None if wrapper is None else wrapper.find(_MAILBOX)
    return None if mailbox is None else _text(mailbox, _EMAIL)


def _mailboxes_of(elem: Any, name: str) -> list[str]:
    wrapper = elem.find(name)
    if wrapper is None:
        return []
    return [a for a in (_text(m, _EMAIL) for m in wrapper.findall(_MAILBOX)) if a]


def _received_at(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return None  # exchangelib logs and drops an unreadable value too; the job then uses when it saw the mail
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _fetched(mailbox: str, item_id: str, elem: Any) -> FetchedMessage:
    """A FetchedMessage from one GetItem item element (HEADER_FIELDS, read as exchangelib would)."""
    headers_elem = elem.find(_t("InternetMessageHeaders"))
    headers = [] if headers_elem is None else [
        (h.get("HeaderName") or "", h.text if h.text is not None else "")
        for h in headers_elem.findall(_t("InternetMessageHeader"))]
    conversation = elem.find(_t("ConversationId"))
    return FetchedMessage(
        mailbox=mailbox,
        item_id=item_id,
        internet_message_id=_text(elem, _t("InternetMessageId")),
        subject=_text(elem, _t("Subject")) or "",
        sender=_mailbox_of(elem, _t("Sender")),
        from_address=_mailbox_of(elem, _t("From")),
        to=_mailboxes_of(elem, _t("ToRecipients")),
        cc=_mailboxes_of(elem, _t("CcRecipients")),
        received_at=_received_at(_text(elem, _t("DateTimeReceived"))),
        conversation_id=None if conversation is None else conversation.get("Id") or None,
        in_reply_to=_text(elem, _t("InReplyTo")),
        references=_text(elem, _t("References")),
        headers=headers,
        item_class=_text(elem, _t("ItemClass")),
    )


def _address(mailbox: object) -> str | None:
    return getattr(mailbox, "email_address", None) or None


def _addresses(mailboxes: Iterable[object] | None) -> list[str]:
    return [a for a in (_address(m) for m in mailboxes or ()) if a]


class EwsFetcher:
    """``MailFetcher`` for EWS. Safe to create before a fork: nothing is built until first use."""

    def __init__(self, settings: Settings, *, max_connections: int = 2):
        self.settings = settings
        self.max_connections = max_connections
        self._pid: int | None = None
        self._generation = 0  # bumped when sessions are discarded, so exchangelib's cache yields a new Protocol
        self._configuration: Configuration | None = None
        self._accounts: collections.OrderedDict[str, Account] = collections.OrderedDict()
        self._redis: redis.Redis | None = None

    # -- exchangelib objects, per process ---------------------------------------------------
    def _account(self, mailbox: str) -> Account:
        pid = os.getpid()
        if self._pid != pid:  # first use, first use after a fork, or after a failure: start cold
            pool = f"worker-{pid}" + (f".{self._generation}" if self._generation else "")
            self._configuration = make_configuration(self.settings, pool=pool, max_connections=self.max_connections)
            self._accounts.clear()
            self._pid = pid
        key = mailbox.lower()
        account = self._accounts.get(key)
        if account is None:
            account = make_account(self.settings, mailbox, self._configuration)
            self._accounts[key] = account
            if len(self._accounts) > MAX_ACCOUNTS:
                self._accounts.popitem(last=False)
        else:
            self._accounts.move_to_end(key)
        return account

    def _get_items(self, mailbox: str, item_ids: Sequence[str], paths: set[FieldPath], raw: bool = False) -> list:
        account = self._account(mailbox)
        service = _GetItem(account=account, chunk_size=max(1, len(item_ids)))
        service.raw = raw
        try:
            return list(service.call(items=[ItemId(id=i) for i in item_ids], additional_fields=paths, shape=ID_ONLY))
        except BaseException as exc:
            # exchangelib returns its HTTP session to the pool only on the paths it expects; an
            # interrupted request (RQ's job timeout, a signal) keeps it forever, and once the pool
            # is empty every later call waits forever. After any failure, start afresh.
            self._discard_sessions()
            if isinstance(exc, (EWSError, requests.exceptions.RequestException, OSError)):
                raise FetchError(f"GetItem for {mailbox} ({len(item_ids)} item(s)) failed: {self._describe(exc)}") from None
            raise

    def _describe(self, exc: BaseException) -> str:
        """Exception class and a short message, with any configured secret blanked out."""
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        for key in SECRET_KEYS:
            secret = self.settings.values.get(key)
            if secret:
                text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def _gone(self, mailbox: str, item_id: str, result: Exception) -> ItemGone:
        short = item_id[-16:]
        if isinstance(result, (ErrorItemNotFound, ErrorInvalidIdMalformed)):
            return ItemGone(f"{mailbox}: item …{short} not found ({type(result).__name__})")
        if isinstance(result, (ErrorItemCorrupt, ErrorCorruptData, ErrorMimeContentConversionFailed)):
            return ItemUnreadable(f"{mailbox}: item …{short} cannot be read ({type(result).__name__})")
        raise FetchError(f"GetItem for {mailbox} item …{short} failed: {self._describe(result)}")

    # -- MailFetcher ------------------------------------------------------------------------
    def fetch(self, mailbox: str, item_ids: Sequence[str]) -> list[FetchedMessage | ItemGone]:
        if not item_ids:
            return []
        results = self._get_items(mailbox, item_ids, _HEADER_PATHS, raw=True)
        if len(results) != len(item_ids):
            raise FetchError(f"GetItem for {mailbox}: asked for {len(item_ids)} item(s), got {len(results)}")
        return [self._gone(mailbox, item_id, item) if isinstance(item, Exception) else _fetched(mailbox, item_id, item)
                for item_id, item in zip(item_ids, results)]

    def fetch_mime(self, mailbox: str, item_id: str) -> bytes:
        (item,) = self._get_items(mailbox, [item_id], _MIME_PATHS)
        if isinstance(item, Exception):
            raise self._gone(mailbox, item_id, item)
        return item.mime_content or b""

    def fetch_text(self, mailbox: str, item_id: str) -> str:
        """The text this message added (EWS UniqueBody, without the quoted conversation), as
        plain text and bounded; far smaller than its MIME. Empty when Exchange has none."""
        (text,) = EwsFetcher.fetch_texts(self, mailbox, [item_id])  # not a subclass's override
        if isinstance(text, ItemGone):
            raise text
        return text or ""

    def fetch_texts(self, mailbox: str, item_ids: Sequence[str]) -> list[str | None | ItemGone]:
        """``fetch_text`` for many items of one mailbox in one GetItem (a job's matched replies
        need theirs together); ``ItemGone`` in place of a missing or unreadable item."""
        if not item_ids:
            return []
        results = self._get_items(mailbox, item_ids, _TEXT_PATHS, raw=True)
        if len(results) != len(item_ids):
            raise FetchError(f"GetItem for {mailbox}: asked for {len(item_ids)} text(s), got {len(results)}")
        out: list[str | None | ItemGone] = []
        for item_id, item in zip(item_ids, results):
            if isinstance(item, Exception):
                out.append(self._gone(mailbox, item_id, item))
                continue
            body = item.find(_t("UniqueBody"))  # as exchangelib's BodyField reads it
            text = "" if body is None or not body.text else \
                html_to_text(body.text) if body.get("BodyType") == "HTML" else body.text
            out.append(text[:TEXT_LIMIT])
        return out

    def relocate(self, mailbox: str, mail: NewMail) -> FetchedMessage | ItemGone:
        """The gone ``mail`` where it is now, or ``ItemGone`` saying it exists nowhere we can see."""
        ledger = Ledger(self._redis_conn(), processed_days=self.settings.processed_days)
        tried = []
        new_id = ledger.where_now(mailbox, mail.item_id)
        if new_id:
            tried.append("recorded moves")
            (found,) = self.fetch(mailbox, [new_id])
            if isinstance(found, FetchedMessage):
                return found
        if mail.message_id:
            tried.append("search by Message-ID")
            for item_id in self._find_by_message_id(mailbox, mail.message_id):
                (found,) = self.fetch(mailbox, [item_id])
                if isinstance(found, FetchedMessage):
                    return found
        how = ", ".join(tried) if tried else "no move recorded and no Message-ID known"
        return ItemGone(f"{mailbox}: item …{mail.item_id[-16:]} exists nowhere ({how})")

    def _redis_conn(self) -> redis.Redis:
        """Redis for the ledger and the folder knowledge, connected on first use."""
        if self._redis is None:
            self._redis = redis_conn.connect(self.settings.redis_url)
        return self._redis

    def _find_by_message_id(self, mailbox: str, message_id: str) -> list[str]:
        """Ids of items with this Internet Message-ID in every folder that counts (one FindItem)."""
        keys = sorted(set(SyncStore(self._redis_conn()).watched(mailbox).values())) or ["inbox"]
        refs = [folder_ref(mailbox, k) for k in keys]
        account = self._account(mailbox)
        try:
            found = _FindItem(account=account).call(
                folders=refs, additional_fields=None, restriction=_MessageIdIs(message_id), order_fields=None,
                shape=ID_ONLY, query_string=None, depth="Shallow", calendar_view=None, max_items=10, offset=0)
            ids = [i[0] if isinstance(i, tuple) else getattr(i, "id", None) for i in found
                   if not isinstance(i, Exception)]
            return [i for i in ids if i]
        except BaseException as exc:
            self._discard_sessions()
            if isinstance(exc, (EWSError, requests.exceptions.RequestException, OSError)):
                raise FetchError(f"FindItem for {mailbox} failed: {self._describe(exc)}") from None
            raise

    def _discard_sessions(self) -> None:
        self.close()
        self._generation += 1

    def close(self) -> None:
        """Drop this process's sessions (call before exit; a forked child simply starts cold)."""
        if self._accounts and self._pid == os.getpid():
            account = next(iter(self._accounts.values()))  # all share this process's one Protocol
            with contextlib.suppress(Exception):  # closing is best effort; nothing depends on it
                account.protocol.close()
        if self._configuration is not None and self._pid == os.getpid():
            with contextlib.suppress(KeyError):
                del Protocol[self._configuration]  # exchangelib's cache would keep it forever
        self._configuration = None
        self._accounts.clear()
        self._pid = None
