"""Streaming subscriptions for a group of mailboxes over one GetStreamingEvents connection.

One ``StreamGroup`` = up to ``group_size`` (<= 200) mailboxes, one thread, one exchangelib
Protocol of its own (``ews_account.make_configuration(settings, pool=<group id>)``), so its
sessions, cookie jar and ``X-BackEndOverrideCookie`` never mix with another group's. Following
Microsoft's affinity procedure, every Subscribe, GetStreamingEvents and Unsubscribe of the group
carries ``X-AnchorMailbox: <group anchor>`` and ``X-PreferServerAffinity: true``; the cookie the
server sets on the first Subscribe is sent back on every later request of the group.

What a subscription covers: each mailbox gets one subscription with ``SubscribeToAllFolders``
for CreatedEvent, NewMailEvent and MovedEvent. A created item is kept when its parent folder is
one the catch-up watches too (``sync_state.watched_folders``: inbox, junk, Deleted Items,
Recoverable Items, user mail folders at any depth); a folder the group does not know yet (made
since the tree was last read) asks the listener for a catch-up with the tree refreshed, which
finds the mail there. A MovedEvent (a move, a delete to Deleted Items or to Recoverable Items)
is reported as (old id, new id), so a worker whose item is gone can follow it.

One bad mailbox never disturbs its group: a mailbox that cannot be subscribed (permission
removed, mailbox gone, a move in progress) is retried on its own backoff and reported in
``status()``; an error that names subscriptions resubscribes only those. When the server
refuses another connection, the listener is asked to re-form groups (``on_limit``); when the
group's anchor stays busy, the group picks another anchor mailbox and subscribes again.

Throttling (Exchange Server's default policy; see emulators/ews/throttling.py for Microsoft's
pages): the server allows 3 open GetStreamingEvents connections (``HangingConnectionLimit``)
per budget, and a connection made while impersonating a mailbox is charged to a copy of *that
mailbox's* budget, not the service account's. So each group's GetStreamingEvents impersonates
one of its own members (``stream_as``: the anchor while it is a member); members are disjoint
across groups, hence every connection is charged to a different mailbox and none nears the
limit, whatever the number of groups. Should the server still refuse (another application
holds that mailbox's connections), the group streams as its next member before falling back to
the listener's re-forming of groups. Subscriptions (``EWSMaxSubscriptions``, 5000) are charged
to each target mailbox, which holds one.

Streaming as a member ties the whole connection to that one mailbox: deleted, stripped of the
service account's impersonation right or mid-move, it makes GetStreamingEvents fail as a whole
with a mailbox-level error that names no subscription (``STREAM_AS_ERRORS``). That is that
member's fault, not the group's: it is marked failing (in ``status()``, resubscribed on its own
backoff), the group streams as another live member at once, and the reconnect's catch-up runs
as after any gap. Only when ``STREAM_AS_BROKEN_IN_A_ROW`` members in a row are refused with no
envelope in between does the group also back off and point at the service account's rights.

The stream's read timeout is two heartbeat intervals (plus a second), so a silent connection
is noticed promptly instead of after exchangelib's ``connection_timeout * 60 + 60`` seconds.
Membership changes interrupt the stream by shutting its socket down.
"""
from __future__ import annotations

import contextlib
import enum
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import requests
import urllib3
from exchangelib import Account
from exchangelib import errors as ews_errors
from exchangelib.services import (
    GetStreamingEvents,
    SubscribeToStreaming,
    Unsubscribe,
)
from exchangelib.util import SOAPNS, ParseError, to_xml

from exchange_listener.core import logs, metrics
from exchange_listener.core.backoff import SPREAD, Backoff
from exchange_listener.core.backoff import delay as backoff_delay
from exchange_listener.core.config import Settings, scrub
from exchange_listener.sources.base import NewMail
from exchange_listener.sources.ews import account as ews_account
from exchange_listener.sources.ews.catch_up import (
    SyncStore,
    distinguished_folder_ids,
    watched_folders,
)
from exchange_listener.sources.ews.wire import Service, WholeBody, envelopes

NEW_ITEM_EVENTS = ("CreatedEvent", "NewMailEvent")
EVENT_TYPES = (*NEW_ITEM_EVENTS, "MovedEvent")
BUSY_STREAK_TO_REANCHOR = 3  # consecutive ErrorServerBusy answers before the group moves to another anchor
MAX_STREAM_AS_MOVES = 2  # connection refusals answered by impersonating another member, before backing off
STREAM_AS_BROKEN_IN_A_ROW = 3  # stream_as members refused in a row before suspecting the service account
# Exchange Server 2013-SE defaults (emulators/ews/throttling.py cites Microsoft's pages), for status
HANGING_CONNECTION_LIMIT = 3  # open GetStreamingEvents connections per budget (impersonated mailbox)
EWS_MAX_SUBSCRIPTIONS = 5000  # subscriptions per target mailbox
MAX_FAILING_SHOWN = 50  # failing mailboxes listed per group in status
REQUEST_TIMEOUT = 30.0  # seconds for a non-streaming EWS call
CONNECT_TIMEOUT = 5.0

SUBSCRIPTION_ERRORS = (
    ews_errors.ErrorSubscriptionNotFound,
    ews_errors.ErrorInvalidSubscription,
    ews_errors.ErrorSubscriptionUnsubsribed,
    ews_errors.ErrorSubscriptionAccessDenied,
    ews_errors.ErrorMissedNotificationEvents,
)
CONNECTION_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.Timeout,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    OSError,
    ews_errors.ErrorTimeoutExpired,
)
AUTH_ERRORS = (ews_errors.UnauthorizedError, ews_errors.ErrorImpersonateUserDenied,
               ews_errors.ErrorAccessDenied, ews_errors.ErrorNonExistentMailbox)
# a whole GetStreamingEvents refused for the impersonated mailbox itself (it names no subscription)
STREAM_AS_ERRORS = (ews_errors.ErrorNonExistentMailbox, ews_errors.ErrorImpersonateUserDenied,
                    ews_errors.ErrorAccessDenied, ews_errors.ErrorMailboxMoveInProgress,
                    ews_errors.ErrorMailboxStoreUnavailable, ews_errors.ErrorImpersonationFailed)
_IDS_IN_MESSAGE = re.compile(r"subscription IDs: \[(.*)\]")


def server_back_off(exc: ews_errors.ErrorServerBusy) -> float | None:
    """The server's BackOffMilliseconds (seconds), or None when exchangelib made the error up itself."""
    text = str(exc.args[0] if exc.args else exc)
    if text.startswith(("Reraised from", "Caused by")):
        return None
    return exc.back_off


def failed_subscription_ids(exc: Exception) -> list[str]:
    """Subscription ids exchangelib lists in a GetStreamingEvents error (empty when none are named)."""
    match = _IDS_IN_MESSAGE.search(str(exc))
    if not match:
        return []
    return re.findall(r"'([^']+)'", match.group(1))


class _GroupAffinity(Service):
    """Mixin for the group's services: anchor mailbox, server affinity and the group's cookie."""

    group: StreamGroup

    def _extra_headers(self) -> dict[str, str]:
        headers = super()._extra_headers()
        headers["X-AnchorMailbox"] = self.group.anchor
        headers["X-PreferServerAffinity"] = "True"
        headers.pop("X-BackEndOverrideCookie", None)
        if self.group.cookie:
            headers["X-BackEndOverrideCookie"] = self.group.cookie
        return headers

    def _handle_response_cookies(self, session: requests.Session) -> None:
        super()._handle_response_cookies(session)
        for cookie in session.cookies:
            if cookie.name == "X-BackEndOverrideCookie" and cookie.value:
                self.group.cookie = cookie.value


class GroupSubscribe(WholeBody, _GroupAffinity, SubscribeToStreaming):
    pass


class GroupUnsubscribe(WholeBody, _GroupAffinity, Unsubscribe):
    pass


@dataclass(frozen=True)
class Ref:
    """An ItemId or folder id element of an event: only its Id is read."""

    id: str


@dataclass(frozen=True)
class Event:
    """One event of a notification, with the fields ``_handle`` reads (``kind`` is the element name)."""

    kind: str
    item_id: Ref | None = None
    parent_folder_id: Ref | None = None
    old_item_id: Ref | None = None
    old_parent_folder_id: Ref | None = None


@dataclass(frozen=True)
class Notification:
    subscription_id: str | None
    events: tuple[Event, ...]


_EVENT_REFS = {"ItemId": "item_id", "ParentFolderId": "parent_folder_id", "OldItemId": "old_item_id",
               "OldParentFolderId": "old_parent_folder_id"}


def read_notification(elem: Any) -> Notification:
    """A Notification element, read by local names (Exchange puts it and SubscriptionId in the
    messages namespace, the schema in types): exchangelib's model costs a fifth of the listener's
    CPU per mail for the four ids we use."""
    subscription_id = None
    events = []
    for child in elem:
        name = child.tag.rpartition("}")[2]
        if name == "SubscriptionId":
            subscription_id = child.text
        elif name.endswith("Event"):
            refs = {}
            for part in child:
                field_name = _EVENT_REFS.get(part.tag.rpartition("}")[2])
                if field_name and part.get("Id"):
                    refs[field_name] = Ref(part.get("Id"))
            events.append(Event(name, **refs))
    return Notification(subscription_id, tuple(events))


class GroupStreamingEvents(_GroupAffinity, GetStreamingEvents):
    """GetStreamingEvents with a heartbeat-sized read timeout; notes every envelope as activity."""

    read_timeout: float = 90.0

    def call(self, subscription_ids: list[str], connection_timeout: int) -> Any:
        notifications = super().call(subscription_ids=subscription_ids, connection_timeout=connection_timeout)
        self.timeout = (CONNECT_TIMEOUT, self.read_timeout)  # read lazily when iteration sends the request
        return notifications

    def _get_response(self, payload: Any, api_version: str) -> requests.Response:
        response = super()._get_response(payload=payload, api_version=api_version)
        self.group.connected = True  # HTTP 200: the server holds the stream now
        self.group.last_activity = time.time()
        return response

    def _elem_to_obj(self, elem: Any) -> Notification:
        return read_notification(elem)

    def _get_soap_messages(self, body: Any) -> Any:
        """Each envelope of the chunked stream, split by ``wire.envelopes`` and parsed whole.

        ``body`` is the raw response (exchangelib passes it through). A body that is not chunked
        (a proxy in between that buffers) goes to exchangelib's byte-at-a-time reader, which
        does not wait for the end of the response.
        """
        response = body
        if not getattr(response.raw, "chunked", False):
            yield from super()._get_soap_messages(body=body)
            return
        try:
            for doc in envelopes(response.iter_content(chunk_size=None)):
                try:
                    root = to_xml(doc)
                except ParseError as exc:
                    raise ews_errors.SOAPError(f"Bad SOAP response: {exc}") from None
                soap_body = root.find(f"{{{SOAPNS}}}Body")
                if soap_body is None:
                    raise ews_errors.MalformedResponseError("No Body element in SOAP response")
                # the envelope's messages, read as every other service reads them (errors raised)
                yield from super(GetStreamingEvents, self)._get_soap_messages(body=soap_body)
                if self.connection_status == self.CLOSED:
                    break  # the server ends the stream; do not wait for the socket to close
        except BaseException:
            response.close()
            raise

    def _get_element_container(self, message: Any, name: str | None = None) -> Any:
        self.group.last_activity = time.time()
        self.group.backoff.reset()  # a whole envelope arrived: the connection works again
        self.group.busy_streak = 0
        container = super()._get_element_container(message, name=name)
        self.group._stream_as_moves = 0  # an envelope without error: the server holds this connection
        self.group._stream_as_broken = 0
        return container


class _Unknown(enum.Enum):
    FOLDER = 0  # an enum member rather than object(): mypy narrows ``is UNKNOWN``


UNKNOWN: Final = _Unknown.FOLDER  # a folder the member's folder map does not know


@dataclass
class Member:
    """One mailbox in a group."""

    mailbox: str
    account: Account
    watched: dict[str, str] = field(default_factory=dict)  # folder id -> folder key, for folders that count
    ignored: set[str] = field(default_factory=set)  # other known folder ids (sent items, calendar, ...)
    asked: set[str] = field(default_factory=set)  # unknown folder ids already reported
    subscription_id: str | None = None
    retry_at: float = 0.0
    failures: int = 0
    failing_since: float | None = None
    last_error: str | None = None

    def folder_of(self, parent_id: str) -> str | Literal[_Unknown.FOLDER] | None:
        """Folder key for a new item's parent folder; None when mail there does not count; UNKNOWN."""
        key = self.watched.get(parent_id)
        if key is not None:
            return key
        if parent_id in self.ignored:
            return None
        return UNKNOWN if parent_id else "inbox"


class StreamGroup:
    """A thread that keeps up to ``group_size`` mailboxes subscribed and streamed.

    ``on_mail(mails)`` gets the new mail of one mailbox from one notification; ``on_subscribed(mailboxes,
    reason)`` is called after mailboxes were (re)subscribed or the stream reconnected, when a
    catch-up is due; ``on_unknown_folder(mailbox, folder_id)`` when mail shows up in a folder the
    group does not know; ``on_moves(mailbox, [(old id, new id)])`` for moved items; ``on_limit(group)``
    when the server refuses another connection; ``folder_cache`` is a ``SyncStore``.
    """

    def __init__(self, group_id: str, settings: Settings, *, on_mail: Callable[..., None],
                 on_subscribed: Callable[[list[str], str], None], on_unknown_folder: Callable[..., None],
                 on_moves: Callable[[str, list[tuple[str, str]], set[str]], None], folder_cache: SyncStore,
                 on_limit: Callable[[StreamGroup], None] | None = None, listener_id: str = ""):
        self.id = group_id
        self.settings = settings
        self.on_mail = on_mail
        self.on_subscribed = on_subscribed
        self.on_unknown_folder = on_unknown_folder
        self.on_moves = on_moves
        self.on_limit = on_limit
        self.folder_cache = folder_cache
        self._folder_updates: dict[str, tuple[dict[str, str], set[str]]] = {}
        self.busy_streak = 0
        self.config = ews_account.make_configuration(settings, pool=f"{listener_id}/{group_id}", max_connections=2)
        self.anchor: str | None = None
        self.cookie: str | None = None
        self.stream_as: str | None = None  # the member GetStreamingEvents impersonates (whose budget pays)
        self._stream_as_moves = 0  # refusals answered by streaming as another member since the last stream
        self._stream_as_broken = 0  # stream_as members refused with a mailbox-level error since the last envelope
        self.assigned: set[str] = set()  # what the listener gave us; only its thread touches this
        self.members: dict[str, Member] = {}  # only the group's thread touches this
        self.by_subscription: dict[str, Member] = {}
        self.last_activity = 0.0
        self.connected = False
        self.log = logs.get_logger(group=group_id)
        self._lock = threading.Lock()
        self._adds: set[str] = set()
        self._removes: set[str] = set()
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._svc: GroupStreamingEvents | None = None
        self._reconnect_reason: str | None = "start"
        self.backoff = Backoff(base=0.5, cap=60.0)
        self._thread = threading.Thread(target=self._run, name=f"stream-{group_id}", daemon=True)
        self.protocol: Any = None  # exchangelib's Protocol of the members' accounts, once one subscribed

    # -- called from the listener's thread -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def size(self) -> int:
        return len(self.assigned)

    def add(self, mailboxes: Collection[str]) -> None:
        self.assigned.update(mailboxes)
        with self._lock:
            for m in mailboxes:
                self._removes.discard(m)
                self._adds.add(m)
            if self.anchor is None and self._adds:
                self.anchor = min(self._adds)
        self._dirty.set()

    def remove(self, mailboxes: Collection[str]) -> None:
        self.assigned.difference_update(mailboxes)
        with self._lock:
            for m in mailboxes:
                self._adds.discard(m)
                self._removes.add(m)
        self._dirty.set()

    def poke(self) -> None:
        """Interrupt the current stream if membership changed or a first subscribe is due.

        A mailbox's first retry cuts the stream (a passing error should not leave it unwatched
        for a ``connection_timeout``); one that keeps failing is retried when the stream
        reconnects anyway (the server closes it every ``connection_timeout``), since each cut
        costs every other member a catch-up, and one bad mailbox must not disturb its group."""
        now = time.time()
        due = any(m.subscription_id is None and m.retry_at <= now and m.failures <= 1
                  for m in list(self.members.values()))
        if self._dirty.is_set() or due or self._stopping.is_set():
            if due:
                self._dirty.set()
            self._abort_stream()

    def stop(self) -> None:
        self._stopping.set()
        self._dirty.set()
        self._abort_stream()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def unsubscribe_all(self) -> int:
        """Unsubscribe every member (on shutdown); returns how many succeeded."""
        done = 0
        for member in list(self.members.values()):
            if self._unsubscribe(member):
                done += 1
        return done

    def set_folders(self, mailbox: str, watched: dict[str, str], ignored: set[str]) -> None:
        """A fresher folder map for a member (after the catch-up read the tree); applied by the group's thread."""
        with self._lock:
            self._folder_updates[mailbox] = (dict(watched), set(ignored))

    def status(self) -> dict:
        failing = sorted(((m.failing_since, m) for m in list(self.members.values()) if m.failing_since is not None),
                         key=lambda pair: pair[0])
        return {"group": self.id, "anchor": self.anchor, "mailboxes": len(self.members),
                "subscribed": len(self.by_subscription), "connected": self.connected, "stream_as": self.stream_as,
                "last_activity": round(self.last_activity, 3), "failing_count": len(failing),
                "failing": [{"mailbox": m.mailbox, "since": round(since, 3), "error": m.last_error,
                             "retry_at": round(m.retry_at, 3)} for since, m in failing[:MAX_FAILING_SHOWN]]}

    # -- the group's thread ----------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.backoff
        while not self._stopping.is_set():
            try:
                self._apply_membership()
                live = {sid: m for sid, m in self.by_subscription.items()}
                if not live:
                    self.connected = False
                    self._dirty.wait(1.0)
                    continue
                self._stream(live)
            except StopIteration:
                break
            except ews_errors.ErrorServerBusy as exc:
                asked = server_back_off(exc)
                self.busy_streak += 1
                if self.busy_streak >= BUSY_STREAK_TO_REANCHOR and self._reanchor():
                    delay = 0.2 * random.random()
                else:
                    delay = backoff.next(floor=asked or 0.0)
                self._lost("server_busy", f"server busy; backing off {delay:.1f}s", delay, asked_seconds=asked,
                           anchor=self.anchor, busy_streak=self.busy_streak)
            except SUBSCRIPTION_ERRORS as exc:
                self._resubscribe_failed(exc)
            except (ews_errors.ErrorExceededConnectionCount, ews_errors.ErrorExceededSubscriptionCount) as exc:
                refused = isinstance(exc, ews_errors.ErrorExceededConnectionCount)
                moved_from = self.stream_as
                if refused and self._stream_as_moves < MAX_STREAM_AS_MOVES and self._move_stream_as():
                    self._lost("limit", f"server refused another streaming connection on {moved_from}'s budget "
                               f"({type(exc).__name__}); streaming as {self.stream_as} instead", 0.5 * random.random())
                    continue
                delay = backoff.next(floor=15.0)
                if refused and self.on_limit is not None:
                    self.on_limit(self)  # the listener folds this group into others with room, if any
                self._lost("limit", f"server connection/subscription limit reached ({type(exc).__name__}); "
                           f"backing off {delay:.0f}s before trying again", delay)
            except AUTH_ERRORS + STREAM_AS_ERRORS as exc:
                if failed_subscription_ids(exc):
                    self._resubscribe_failed(exc)  # one mailbox's rights or existence, not the group's
                    continue
                if isinstance(exc, STREAM_AS_ERRORS):
                    self._stream_as_broken_by(exc)
                    continue
                delay = backoff.next(floor=5.0)
                self._lost("auth", f"authentication/authorization failed for the stream ({type(exc).__name__}: "
                           f"check ews_username/ews_password or OAuth2 settings and impersonation rights); retrying in "
                           f"{delay:.0f}s", delay)
            except CONNECTION_ERRORS as exc:
                if self._stopping.is_set():
                    break
                if self._dirty.is_set():
                    self._interrupted()  # we cut it ourselves to change membership
                    continue
                delay = backoff.next() if backoff.attempt else 0.2 * random.random()
                backoff.attempt = max(backoff.attempt, 1)
                self._lost("connection", f"stream connection lost ({type(exc).__name__}); reconnecting in {delay:.1f}s",
                           delay)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                if self._dirty.is_set():
                    self._interrupted()
                    continue
                if failed_subscription_ids(exc):  # an error of some mailboxes only: resubscribe those
                    self._resubscribe_failed(exc)
                    continue
                delay = backoff.next(floor=1.0)
                self.log.exception("stream failed unexpectedly", error=type(exc).__name__, retry_in=round(delay, 1))
                self._lost("error", None, delay)
        self.connected = False

    def _interrupted(self) -> None:
        """We cut our own stream (membership changed, a retry came due): notifications the
        server had already sent, in the rest of an envelope or in the socket's buffer, are gone,
        and the server counts them as delivered, so the next stream catches up its mailboxes."""
        self.connected = False
        self._reconnect_reason = self._reconnect_reason or "interrupted"

    def _lost(self, reason: str, message: str | None, delay: float, **extra: Any) -> None:
        self.connected = False
        self._reconnect_reason = reason
        metrics.RECONNECTS.labels(reason).inc()
        if message:
            self.log.warning(message, reason=reason, **extra)
        self._stopping.wait(delay)

    def _apply_membership(self) -> None:
        self._dirty.clear()
        with self._lock:
            adds, self._adds = self._adds, set()
            removes, self._removes = self._removes, set()
        for mailbox in removes:
            member = self.members.pop(mailbox, None)
            if member is not None and member.subscription_id:
                self.by_subscription.pop(member.subscription_id, None)
                self._unsubscribe(member)
        for mailbox in adds:
            if mailbox not in self.members:
                self.members[mailbox] = Member(mailbox, ews_account.make_account(self.settings, mailbox, self.config))
        self._subscribe_pending()

    def _subscribe_pending(self) -> None:
        now = time.time()
        fresh = []
        try:
            for member in list(self.members.values()):
                if self._stopping.is_set():
                    raise StopIteration
                if member.subscription_id or member.retry_at > now:
                    continue
                if self._subscribe(member):
                    fresh.append(member.mailbox)
        finally:  # those subscribed before a failure still need their catch-up
            if fresh:
                self.on_subscribed(fresh, "subscribed")

    def _subscribe(self, member: Member) -> bool:
        log = self.log.bind(mailbox=member.mailbox)
        if self.protocol is None:
            self.protocol = member.account.protocol
            self.protocol.TIMEOUT = REQUEST_TIMEOUT
        try:
            if not member.watched:
                self._load_folders(member)
            svc = GroupSubscribe(account=member.account)
            svc.group = self
            member.subscription_id = svc.get(folders=None, event_types=list(EVENT_TYPES))
        except ews_errors.ErrorServerBusy:
            raise
        except (ews_errors.ErrorExceededConnectionCount, ews_errors.UnauthorizedError) + CONNECTION_ERRORS:
            raise
        except ews_errors.ErrorExceededSubscriptionCount as exc:
            delay = backoff_delay(member.failures, base=30.0, cap=600.0, jitter=SPREAD, linear=True)
            self._failed(member, exc, delay)
            log.error("too many subscriptions on this mailbox; will try again later", retry_in=round(delay))
            return False
        except Exception as exc:  # noqa: BLE001 - one bad mailbox must not stop the group
            delay = backoff_delay(member.failures, base=4.0, cap=300.0, jitter=SPREAD)
            self._failed(member, exc, delay)
            log.error("cannot subscribe mailbox; retried on its own backoff when the stream next reconnects",
                      error=member.last_error, retry_in=round(delay, 1), failures=member.failures)
            return False
        member.failures = 0
        member.failing_since = None
        member.last_error = None
        self.by_subscription[member.subscription_id] = member
        log.debug("subscribed", subscription_id=member.subscription_id)
        return True

    def _failed(self, member: Member, exc: Exception, delay: float) -> None:
        member.failures += 1
        member.retry_at = time.time() + delay
        member.last_error = scrub(f"{type(exc).__name__}: {exc}", self.settings)[:300]
        if member.failing_since is None:
            member.failing_since = time.time()

    def _load_folders(self, member: Member) -> None:
        """The member's folder map from Redis; the distinguished ids from the server the first time."""
        cache = self.folder_cache
        distinguished = cache.folder_ids(member.mailbox) if cache else {}
        if not distinguished:
            distinguished = distinguished_folder_ids(member.account, member.mailbox)
            if cache:
                cache.save_folder_ids(member.mailbox, distinguished)
        tree = cache.tree(member.mailbox) if cache else {}
        member.watched = watched_folders(distinguished, tree)
        member.ignored = (set(distinguished.values()) | set(tree)) - set(member.watched)

    def _reanchor(self) -> bool:
        """Move the group to another anchor mailbox (its backend keeps refusing); all subscribe again."""
        others = sorted(m for m in self.members if m != self.anchor)
        if not others:
            return False
        old = self.anchor
        with self._lock:
            self.anchor = next((m for m in others if old is None or m > old), others[0])
        self.cookie = None
        self.busy_streak = 0
        for member in list(self.members.values()):
            if member.subscription_id is not None:
                self.by_subscription.pop(member.subscription_id, None)
            member.subscription_id = None  # subscriptions live on the old backend; it will expire them
            member.retry_at = 0.0
        self._reconnect_reason = "reanchored"
        metrics.RESUBSCRIBES.labels("reanchored").inc(len(self.members))
        self.log.warning("anchor mailbox stays busy; re-forming the group on another anchor", old_anchor=old,
                         new_anchor=self.anchor, mailboxes=len(self.members))
        return True

    def _unsubscribe(self, member: Member) -> bool:
        sid = member.subscription_id
        member.subscription_id = None
        if not sid:
            return False
        try:
            svc = GroupUnsubscribe(account=member.account)
            svc.group = self
            svc.get(subscription_id=sid, expect_result=None)
            return True
        except Exception as exc:  # noqa: BLE001 - best effort; the server expires it anyway
            self.log.info("unsubscribe failed", mailbox=member.mailbox, subscription_id=sid, error=type(exc).__name__)
            return False

    def _resubscribe_failed(self, exc: Exception) -> None:
        ids = failed_subscription_ids(exc)
        named = [self.by_subscription[i] for i in ids if i in self.by_subscription]
        targets = named or list(self.by_subscription.values())
        for member in targets:
            if member.subscription_id is not None:
                self.by_subscription.pop(member.subscription_id, None)
            member.subscription_id = None
            member.retry_at = 0.0
        metrics.RESUBSCRIBES.labels(type(exc).__name__).inc(len(targets))
        self.log.warning("subscriptions lost; resubscribing the mailboxes named", error=type(exc).__name__,
                         mailboxes=len(targets), subscription_ids=ids or "all")
        # No group-wide catch-up: the resubscribed mailboxes get theirs when subscribed, and the
        # others lost nothing (a failed GetStreamingEvents leaves their events on the server).

    def _next_stream_as(self) -> str | None:
        """The subscribed member after ``stream_as`` (in address order, wrapping), None if there is none."""
        others = sorted(m.mailbox for m in self.by_subscription.values() if m.mailbox != self.stream_as)
        if not others:
            return None
        current = self.stream_as or ""
        return next((m for m in others if m > current), others[0])

    def _move_stream_as(self) -> bool:
        """Impersonate the next member on GetStreamingEvents (its budget's connections are free)."""
        following = self._next_stream_as()
        if following is None:
            return False
        self.stream_as = following
        self._stream_as_moves += 1
        return True

    def _stream_as_broken_by(self, exc: Exception) -> None:
        """GetStreamingEvents failed as a whole for the mailbox it impersonated (gone, no
        impersonation right, being moved): mark that member failing, to be resubscribed on its
        own backoff like any member that cannot subscribe, and stream the rest as another member.

        Its subscription is dropped here, not unsubscribed (that would impersonate the broken
        mailbox again); the server expires it, and the resubscribe's catch-up covers the gap. The
        other members lose nothing: a refused request leaves their events on the server, and the
        reconnect's catch-up (reason ``stream_as``) runs as after any gap."""
        broken = self.members.get(self.stream_as or "")
        following = self._next_stream_as()
        self._stream_as_broken += 1
        if broken is not None:
            delay = backoff_delay(broken.failures, base=4.0, cap=300.0, jitter=SPREAD)
            self._failed(broken, exc, delay)
            if broken.subscription_id is not None:
                self.by_subscription.pop(broken.subscription_id, None)
            broken.subscription_id = None
        metrics.RESUBSCRIBES.labels(type(exc).__name__).inc()
        old, self.stream_as = self.stream_as, following
        if self._stream_as_broken < STREAM_AS_BROKEN_IN_A_ROW:
            delay = 0.2 * random.random()
            self._lost("stream_as", f"the mailbox this group streams as was refused ({type(exc).__name__}); "
                       "it is retried on its own backoff, the group streams as another member",
                       delay, mailbox=old, stream_as=following, error=broken.last_error if broken else None)
            return
        delay = self.backoff.next(floor=5.0)
        self._lost("stream_as", f"{self._stream_as_broken} mailboxes in a row refused as the one this group streams as "
                   f"({type(exc).__name__}): check the service account's impersonation rights; each is retried on "
                   f"its own backoff; streaming as another member in {delay:.0f}s", delay, mailbox=old,
                   stream_as=following)

    def _stream_member(self, live: dict[str, Member]) -> Member:
        """The member whose budget pays for the connection: ``stream_as`` while it is subscribed
        here, else the anchor, else the first member (a member of this group only, so no two
        groups' connections are charged to the same mailbox)."""
        subscribed = {m.mailbox: m for m in live.values()}
        for candidate in (self.stream_as, self.anchor):
            if candidate in subscribed:
                member = subscribed[candidate]
                break
        else:
            member = subscribed[min(subscribed)]
        self.stream_as = member.mailbox
        return member

    def _stream(self, live: dict[str, Member]) -> None:
        svc = GroupStreamingEvents(account=self._stream_member(live).account)
        svc.group = self
        svc.read_timeout = 2 * self.settings.heartbeat_seconds + 1.0
        self._svc = svc
        notifications = svc.call(subscription_ids=list(live), connection_timeout=int(self.settings.connection_timeout))
        reason = self._reconnect_reason
        self._reconnect_reason = None
        if reason and reason not in ("start", "closed"):
            # After any gap that was not our own doing, catch up everyone still subscribed here.
            # A stream the server closed at ConnectionTimeout is no gap: the subscription lives
            # on and keeps its events for the next GetStreamingEvents, so catching up every
            # mailbox on each routine close would only cost a SyncFolderItems per mailbox.
            self.on_subscribed([m.mailbox for m in live.values()], reason)
        try:
            for notification in notifications:
                self._handle(notification, live)
                if self._dirty.is_set() or self._stopping.is_set():
                    break
        finally:
            self._svc = None
            with contextlib.suppress(Exception):  # the connection may already be gone
                svc.stop_streaming()
        if self._stopping.is_set():
            return
        if self._dirty.is_set():
            self._interrupted()
        else:
            self._reconnect_reason = "closed"  # the server ended the stream (ConnectionTimeout)
            metrics.RECONNECTS.labels("closed").inc()

    def _apply_folder_updates(self) -> None:
        with self._lock:
            updates, self._folder_updates = self._folder_updates, {}
        for mailbox, (watched, ignored) in updates.items():
            member = self.members.get(mailbox)
            if member is not None:
                # folders still unknown after the tree was read (outside the mail folder tree, e.g.
                # Recoverable Items' Purges) are ignored from now on, not asked about again
                member.ignored = ignored | (member.asked - set(watched))
                member.watched = watched
                member.asked.clear()

    def _handle(self, notification: Notification, live: dict[str, Member]) -> None:
        member = live.get(notification.subscription_id or "")
        if member is None:
            return
        if self._folder_updates:
            self._apply_folder_updates()
        now = time.time()
        mails: dict[str, NewMail] = {}
        moves: list[tuple[str, str]] = []
        moved_into: set[str] = set()
        for event in notification.events:
            kind = event.kind
            metrics.EVENTS_RECEIVED.labels(kind).inc()
            if event.item_id is None:
                continue  # a folder event
            if kind == "MovedEvent":
                old_parent = event.old_parent_folder_id
                # a mail we may have a job for: from a folder that counts, or one not known yet
                may_have_job = old_parent is None or member.folder_of(old_parent.id) is not None
                if event.old_item_id is not None and may_have_job:
                    moves.append((event.old_item_id.id, event.item_id.id))
                parent = event.parent_folder_id.id if event.parent_folder_id is not None else ""
                target = member.folder_of(parent)
                if target is UNKNOWN:
                    self.on_unknown_folder(member.mailbox, parent, first=parent not in member.asked)
                    member.asked.add(parent)
                elif target is not None:
                    moved_into.add(target)  # the checkpoint reads it: nothing moved in is missed
                continue
            if kind not in NEW_ITEM_EVENTS:
                continue
            parent = event.parent_folder_id.id if event.parent_folder_id is not None else ""
            folder = member.folder_of(parent)
            if folder is UNKNOWN:  # a folder made since the tree was read: a catch-up (merged) finds it
                self.on_unknown_folder(member.mailbox, parent, first=parent not in member.asked)
                member.asked.add(parent)
                continue
            if folder is None:
                continue
            mails.setdefault(event.item_id.id, NewMail(mailbox=member.mailbox, item_id=event.item_id.id,
                                                       folder=folder, seen_at=now, via="stream"))
        if moves or moved_into:
            self.on_moves(member.mailbox, moves, moved_into)
        if mails:
            self.on_mail(list(mails.values()), subscription_id=notification.subscription_id, group=self.id)

    def _abort_stream(self) -> None:
        svc = self._svc
        response = getattr(svc, "_streaming_response", None) if svc else None
        if response is None:
            return
        for sock in _sockets_of(response):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _sockets_of(response: object) -> list[socket.socket]:
    """The TCP socket(s) under a streaming ``requests`` response (urllib3 2.x internals, guarded)."""
    found = []
    raw = getattr(response, "raw", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is not None:
        found.append(sock)
    fp = getattr(raw, "_fp", None)
    inner = getattr(getattr(getattr(fp, "fp", None), "raw", None), "_sock", None)
    if inner is not None:
        found.append(inner)
    return found
