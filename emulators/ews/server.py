"""The emulator's HTTP side: aiohttp routes, auth, EWS operations, streaming, faults, test hooks.

One asyncio loop holds everything, so an open stream costs one coroutine and one socket.

``POST /emulator/reset`` puts a running emulator back to the state of a fresh process with the
same options (open streams reset, mailboxes, items, subscriptions, tokens, faults and operation
counts gone; ``--mailbox`` ones made again), so a test suite can share one process between tests.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import functools
import hashlib
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from emulators.ews import soap, throttling
from emulators.ews.ntlm import NtlmAcceptor
from emulators.ews.soap import NS, BadRequest
from emulators.ews.store import (
    DELETIONS,
    EVENTS_PER_NOTIFICATION,
    Store,
    StoreError,
    Subscription,
)
from emulators.ews.validation import ViolationLog
from exchange_listener.core import logs

XML = "text/xml; charset=utf-8"
MAX_SUBSCRIPTIONS_PER_STREAM = 200
MISSED = "The subscription missed events (its queue overflowed); create a new subscription."
MAILBOX_ERROR_CODES = {
    "ErrorImpersonateUserDenied": "The account does not have permission to impersonate the requested user.",
    "ErrorNonExistentMailbox": "The SMTP address has no mailbox associated with it.",
    "ErrorMailboxMoveInProgress": "Mailbox move in progress. Try again later.",
    "ErrorAccessDenied": "Access is denied. Check credentials and try again.",
}
# what a response message of these operations must carry even on error (exchangelib reads it)
ERROR_INNER = {
    "GetFolder": "<m:Folders/>",  # as in Microsoft's GetFolder error example
    "GetItem": "<m:Items/>",
    "SyncFolderItems": "<m:SyncState/><m:IncludesLastItemInRange>true</m:IncludesLastItemInRange>",
    "SyncFolderHierarchy": "<m:SyncState/><m:IncludesLastFolderInRange>true</m:IncludesLastFolderInRange>",
}
# how many response messages an operation answers with: one per element under these
PER_ELEMENT = {"GetFolder": "m:FolderIds/*", "GetItem": "m:ItemIds/*", "FindItem": "m:ParentFolderIds/*"}
EVENT_TYPES = {"CopiedEvent", "CreatedEvent", "DeletedEvent", "ModifiedEvent", "MovedEvent", "NewMailEvent",
               "FreeBusyChangedEvent"}


@dataclass
class Options:
    accounts: dict[str, str] = field(default_factory=dict)  # user -> password; may impersonate anyone
    plain_accounts: dict[str, str] = field(default_factory=dict)  # user -> password; own mailbox only
    oauth_clients: dict[str, str] = field(default_factory=dict)  # client id -> secret; may impersonate anyone
    mailboxes: list[str] = field(default_factory=list)
    heartbeat_seconds: float = 45.0
    idle_timeout: float = 300.0
    max_streams_per_account: int = 0  # 0 = unlimited
    max_subscriptions_per_mailbox: int = 0
    minute_seconds: float = 60.0  # length of one ConnectionTimeout minute (shorter only for tests)
    token_lifetime: int = 3599
    max_queued_events: int = 10_000  # per subscription; beyond it: ErrorMissedNotificationEvents
    # on-premises Exchange as it runs (issue 15)
    auth: tuple[str, ...] = ("basic", "ntlm", "oauth2")  # schemes offered (WWW-Authenticate) and accepted
    tls_cert: str = ""  # PEM certificate (chain): serve HTTPS
    tls_key: str = ""
    throttling: str = "off"  # off | default (Exchange's default throttling policy per account)
    server_version: str = "2016"  # 2016 | 2019 | SE
    autodiscover_redirect: str = ""  # POX autodiscover answers with a redirect to this URL


@dataclass
class Principal:
    name: str  # "basic:user" or "oauth:client-id"
    user: str
    may_impersonate: bool


class Stream:
    """One open GetStreamingEvents connection and the subscriptions it delivers."""

    def __init__(self, principal: Principal, subs: list[Subscription], transport):
        self.principal = principal
        self.subs = subs
        self.transport = transport
        self.wake = asyncio.Event()
        self.dead = False
        self.expired: list[str] = []

    def kick(self) -> None:
        self.wake.set()

    def reset(self) -> None:
        """Abrupt TCP reset: SO_LINGER 0, then close (the client sees a connection reset)."""
        self.dead = True
        if self.transport is not None and not self.transport.is_closing():
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.transport.abort()
        self.wake.set()


class Faults:
    def __init__(self):
        self.busy = 0
        self.back_off_ms = 30_000
        self.http_503 = 0
        self.truncated = 0
        self.latency_ms = 0
        self.stall_until = 0.0
        self.busy_anchors: dict[str, list[int]] = {}  # X-AnchorMailbox -> [count left (-1: until cleared), back off]
        self.mailbox_errors: dict[str, tuple[str, frozenset]] = {}  # mailbox -> (ResponseCode, operations)

    def anchor_busy(self, anchor: str) -> int | None:
        """The back off to answer a request anchored on ``anchor`` with, or None if it is not busy."""
        entry = self.busy_anchors.get(anchor)
        if entry is None:
            return None
        if entry[0] > 0:
            entry[0] -= 1
            if entry[0] == 0:
                del self.busy_anchors[anchor]
        return entry[1]


class Emulator:
    def __init__(self, options: Options):
        self.options = options
        soap.set_server_version(options.server_version)  # the ServerVersionInfo header of every answer
        self.store = self._new_store()
        self.streams: set[Stream] = set()
        self.inflight: set[asyncio.Task] = set()  # EWS requests being answered (reset cancels them)
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (client id, expires at)
        self.faults = Faults()
        self.operations: collections.Counter = collections.Counter()  # EWS operations answered, for benchmarks
        self.validator = ViolationLog()
        self.log = logs.get_logger(component="emulator")
        self._sweeper: asyncio.Task | None = None

    def _new_store(self) -> Store:
        options = self.options
        store = Store(idle_timeout=options.idle_timeout, max_subscriptions_per_mailbox=options.max_subscriptions_per_mailbox,
                      max_queued_events=options.max_queued_events)
        store.on_event = self._on_event
        for address in options.mailboxes:
            store.mailbox(address)
        return store

    def reset(self) -> None:
        """Back to what a fresh process with the same options holds (see the module docstring).
        EWS requests still being answered (asleep in a latency fault, streaming) are cancelled, so
        none of them finishes against the new state; their clients see the connection drop."""
        for task in list(self.inflight):
            task.cancel()
        self.inflight.clear()
        for stream in list(self.streams):
            stream.reset()
        self.streams.clear()
        self.store = self._new_store()
        self.tokens.clear()
        self.faults = Faults()
        self.operations.clear()

    # -- app --------------------------------------------------------------------------------
    def app(self) -> web.Application:
        from emulators.ews import autodiscover  # POX autodiscover (issue 15)

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/EWS/Exchange.asmx", self.ews)
        app.router.add_post("/EWS/exchange.asmx", self.ews)
        app.router.add_post(autodiscover.PATH, lambda request: autodiscover.handle(self, request))
        app.router.add_post("/Autodiscover/Autodiscover.xml", lambda request: autodiscover.handle(self, request))
        app.router.add_post("/oauth2/v2.0/token", self.token)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self.token)
        app.router.add_post("/emulator/mailboxes/{address}/messages", self.deliver)
        app.router.add_post("/emulator/mailboxes/{address}/folders", self.create_folder)
        app.router.add_delete("/emulator/mailboxes/{address}/folders", self.delete_folder)
        app.router.add_post(r"/emulator/items/{item_id:.+}/move", self.move)
        app.router.add_post(r"/emulator/items/{item_id:.+}/read", self.mark_read)
        app.router.add_post(r"/emulator/items/{item_id:.+}/touch", self.touch)
        app.router.add_delete(r"/emulator/items/{item_id:.+}", self.delete_item)
        app.router.add_post("/emulator/faults", self.fault)
        app.router.add_get("/emulator/stats", self.stats)
        app.router.add_post("/emulator/reset", self.reset_all)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    async def _stop(self, _app) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for stream in list(self.streams):
            stream.reset()

    async def _sweep(self) -> None:
        period = max(0.5, min(self.options.idle_timeout / 4, 30.0))
        while True:
            await asyncio.sleep(period)
            self.store.expire_idle()

    def _on_event(self, sub: Subscription) -> None:
        if sub.stream is not None:
            sub.stream.kick()

    # -- auth -------------------------------------------------------------------------------
    @functools.cached_property
    def ntlm(self) -> NtlmAcceptor:
        """The NTLM/Negotiate acceptor (emulators/ews/ntlm.py), made on first use."""
        return NtlmAcceptor(self.options.accounts, self.options.plain_accounts)

    def _principal(self, request: web.Request) -> Principal | web.Response:
        """Who sent ``request``, or the 401 to answer with (an offer, an NTLM challenge, a refusal).
        Only the schemes in ``--auth`` are accepted; an NTLM-authenticated connection stays so
        for its later requests, as on IIS."""
        offered = self.options.auth
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and "basic" in offered:
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:  # bad base64 or not UTF-8
                return self._unauthorized()
            for table, may in ((self.options.accounts, True), (self.options.plain_accounts, False)):
                expected = table.get(user)
                if expected is not None and secrets.compare_digest(expected, password):
                    return Principal(f"basic:{user}", user, may)
            return self._unauthorized()
        if scheme == "bearer" and "oauth2" in offered:
            found = self.tokens.get(value.strip())
            if found and found[1] > time.monotonic():
                return Principal(f"oauth:{found[0]}", found[0], True)
            return self._unauthorized()
        if "ntlm" not in offered:
            return self._unauthorized()
        if scheme in ("ntlm", "negotiate"):
            return self._ntlm_step(request, scheme, value)
        account = self.ntlm.connection_account(request.transport) if not header else None
        if account is not None:
            return Principal(f"ntlm:{account.name}", account.name, account.may_impersonate)
        return self._unauthorized()

    def _ntlm_step(self, request: web.Request, scheme: str, value: str) -> Principal | web.Response:
        if self.faults is not self._ntlm_reset_faults:  # /emulator/reset or a restart fault cleared the faults
            self._ntlm_reset_faults, self._ntlm_resets = self.faults, 0
        outcome = self.ntlm.step(request.transport, scheme, value)
        if outcome.type_1 and self._ntlm_resets > 0:
            self._ntlm_resets -= 1  # fault ntlm_reset: the connection dies between type-1 and the challenge
            self.ntlm.reset(request.transport)
            return web.Response(status=401)  # never sent: the connection is gone
        if outcome.challenge:
            return web.Response(status=401, text="401 Unauthorized", headers={"WWW-Authenticate": outcome.challenge})
        if outcome.account is None:
            self.log.warning("NTLM authentication refused", user=outcome.user or None, reason=outcome.refused)
            return self._unauthorized()
        return Principal(f"ntlm:{outcome.account.name}", outcome.account.name, outcome.account.may_impersonate)

    _ntlm_reset_faults: Faults | None = None
    _ntlm_resets = 0  # connections left to reset mid-handshake (fault ntlm_reset)

    def _unauthorized(self) -> web.Response:
        """401 offering the schemes of ``--auth``, one WWW-Authenticate header each, as IIS does
        (IIS lists Negotiate and NTLM first; clients pick by name, so Basic keeps its old place)."""
        headers = []
        if "basic" in self.options.auth:
            headers.append(("WWW-Authenticate", 'Basic realm="emulator"'))
        if "ntlm" in self.options.auth:
            headers += [("WWW-Authenticate", "Negotiate"), ("WWW-Authenticate", "NTLM")]
        if "oauth2" in self.options.auth:
            headers.append(("WWW-Authenticate", 'Bearer realm="emulator"'))
        return web.Response(status=401, text="401 Unauthorized", headers=CIMultiDict(headers))

    async def token(self, request: web.Request) -> web.Response:
        """OAuth2 client-credentials token endpoint (the Microsoft identity platform's shape)."""
        form = await request.post()
        client_id, secret = form.get("client_id"), form.get("client_secret")
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(value).decode().partition(":")
            except ValueError:
                client_id = secret = None
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type",
                                      "error_description": "only client_credentials is supported"}, status=400)
        expected = self.options.oauth_clients.get(client_id or "")
        if expected is None or not secrets.compare_digest(expected, secret or ""):
            return web.json_response({"error": "invalid_client",
                                      "error_description": "unknown client or wrong secret"}, status=401)
        token = secrets.token_urlsafe(32)
        lifetime = self.options.token_lifetime
        self.tokens[token] = (client_id, time.monotonic() + lifetime)
        return web.json_response({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                                  "access_token": token})

    # -- EWS entry point --------------------------------------------------------------------
    def _xml(self, body: str, status: int = 200, headers=None) -> web.Response:
        data = soap.envelope(body)
        self.validator.check(data)
        return web.Response(status=status, body=data, content_type="text/xml", charset="utf-8", headers=headers)

    def _fault(self, code: str, text: str, back_off_ms: int | None = None) -> web.Response:
        return web.Response(status=500, body=soap.fault(code, text, back_off_ms), content_type="text/xml",
                            charset="utf-8")

    async def ews(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self.inflight.add(task)
        try:
            return await self._ews(request)
        finally:
            self.inflight.discard(task)

    async def _ews(self, request: web.Request) -> web.StreamResponse:
        data = await request.read()  # read first: an unread body would make aiohttp answer "Connection: close"
        principal = self._principal(request)
        if not isinstance(principal, Principal):
            return principal  # 401: an offer, the NTLM challenge, or a refusal
        throttle = throttling.of(self)  # --throttling default: EWSMaxConcurrency and the time budget
        operation, impersonated = throttling.peek(data) if throttle is not None else ("", None)
        if throttle is not None and operation != "GetStreamingEvents":  # streams: HangingConnectionLimit
            try:
                with throttle.request(throttling.charged_to(principal.name, impersonated)):
                    return await self._answer(request, principal, data)
            except throttling.Refused as exc:
                return self._fault(exc.code, exc.text, exc.back_off_ms)
        return await self._answer(request, principal, data)

    async def _answer(self, request: web.Request, principal: Principal, data: bytes) -> web.StreamResponse:
        """Faults, then the operation (``_ews`` has authenticated the caller)."""
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        if self.faults.http_503 > 0:
            self.faults.http_503 -= 1
            return web.Response(status=503, text="Service Unavailable")
        busy_back_off = self.faults.anchor_busy(request.headers.get("X-AnchorMailbox", "").strip().lower())
        if busy_back_off is None and self.faults.busy > 0:
            self.faults.busy -= 1
            busy_back_off = self.faults.back_off_ms
        if busy_back_off is not None:
            return self._fault("ErrorServerBusy", "The server cannot service this request right now. Try again later.",
                               busy_back_off)
        try:
            req = soap.parse_request(data)
            soap.check_requested_version(req)  # exchangelib's version probe walks down on ErrorInvalidServerVersion
            self.operations[req.operation] += 1
            mailbox = self._mailbox(principal, req, request)
            handler = getattr(self, f"op_{req.operation}", None)
            if handler is None:
                raise BadRequest("ErrorInvalidOperation", f"The emulator does not implement {req.operation}.")
            failing = self.faults.mailbox_errors.get(mailbox)
            if failing and req.operation in failing[1]:
                return self._mailbox_error(req, failing[0])
            if req.operation == "GetStreamingEvents":
                return await self.op_GetStreamingEvents(request, principal, req)
            response = handler(request, principal, mailbox, req)
            if self.faults.truncated > 0 and isinstance(response.body, bytes):
                self.faults.truncated -= 1  # a backend or proxy dying mid-answer: HTTP 200, half a document
                response.body = response.body[:len(response.body) // 2]
            return response
        except BadRequest as exc:
            return self._fault(exc.code, exc.text)

    def _mailbox(self, principal: Principal, req: soap.Request, request: web.Request) -> str:
        """The mailbox a request acts on, after the impersonation check."""
        if req.impersonated:
            if not principal.may_impersonate and req.impersonated.lower() != principal.user.lower():
                raise BadRequest("ErrorImpersonateUserDenied",
                                 "The account does not have permission to impersonate the requested user.")
            return req.impersonated.lower()
        hint = soap.mailbox_hint(req.body) or request.headers.get("X-AnchorMailbox")
        mailbox = (hint or principal.user).lower()
        if not principal.may_impersonate and mailbox != principal.user.lower():
            raise BadRequest("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return mailbox

    def _mailbox_error(self, req: soap.Request, code: str) -> web.Response:
        """A per-mailbox error as Exchange sends it: HTTP 200, an error in every response message."""
        text = MAILBOX_ERROR_CODES[code]
        if req.operation == "GetStreamingEvents":
            return self._stream_error(code, text)
        path = PER_ELEMENT.get(req.operation)
        count = max(1, len(req.body.findall(path, NS))) if path else 1
        inner = ERROR_INNER.get(req.operation, "")
        return self._xml(soap.response(req.operation, [soap.error(req.operation, code, text, inner)] * count))

    def _folder(self, mailbox: str, ref: tuple[str, str]):
        kind, value = ref
        if kind == "distinguished":
            return self.store.folder(mailbox, value)
        folder = self.store.folder_by_id(value)
        if folder.mailbox != mailbox:
            raise StoreError("ErrorAccessDenied", "Access is denied. The folder belongs to another mailbox.")
        return folder

    # -- operations ------------------------------------------------------------------------
    def op_GetFolder(self, request, principal, mailbox, req) -> web.Response:
        messages = []
        for ref in soap.folder_refs(req.body.find("m:FolderIds", NS)):
            try:
                folder = self._folder(mailbox, ref)
                messages.append(soap.ok("GetFolder", f"<m:Folders>{soap.folder_xml(self.store, folder)}</m:Folders>"))
            except StoreError as exc:
                messages.append(soap.error("GetFolder", exc.code, exc.text, ERROR_INNER["GetFolder"]))
        return self._xml(soap.response("GetFolder", messages))

    def op_GetItem(self, request, principal, mailbox, req) -> web.Response:
        base, fields = soap.shape(req.body, "ItemShape")
        messages = []
        for elem in req.body.findall("m:ItemIds/t:ItemId", NS):
            try:
                item = self.store.item(elem.get("Id", ""))
                if item.mailbox != mailbox and not principal.may_impersonate:
                    raise StoreError("ErrorAccessDenied", "Access is denied.")
                xml = soap.item_xml(self.store, item, base, fields)
                messages.append(soap.ok("GetItem", f"<m:Items>{xml}</m:Items>"))
            except StoreError as exc:
                messages.append(soap.error("GetItem", exc.code, exc.text, "<m:Items/>"))
        return self._xml(soap.response("GetItem", messages))

    def op_FindItem(self, request, principal, mailbox, req) -> web.Response:
        base, fields = soap.shape(req.body, "ItemShape")
        message_id = None
        restriction = req.body.find("m:Restriction", NS)
        if restriction is not None:
            equal = restriction.find("t:IsEqualTo", NS)
            field_uri = equal.find("t:FieldURI", NS) if equal is not None else None
            constant = equal.find("t:FieldURIOrConstant/t:Constant", NS) if equal is not None else None
            if field_uri is None or field_uri.get("FieldURI") != "message:InternetMessageId" or constant is None:
                return self._xml(soap.response("FindItem", [soap.error(
                    "FindItem", "ErrorUnsupportedPathForQuery",
                    "The emulator supports only IsEqualTo on message:InternetMessageId.")]))
            message_id = constant.get("Value", "")
        view = req.body.find("m:IndexedPageItemView", NS)
        limit = int(view.get("MaxEntriesReturned", "1000")) if view is not None else 1000
        offset = int(view.get("Offset", "0")) if view is not None else 0
        from_end = view is not None and view.get("BasePoint") == "End"
        messages = []
        for ref in soap.folder_refs(req.body.find("m:ParentFolderIds", NS)):
            try:
                folder = self._folder(mailbox, ref)
            except StoreError as exc:
                messages.append(soap.error("FindItem", exc.code, exc.text))
                continue
            found = self.store.find(folder, message_id)
            if from_end:
                found = list(reversed(found))
            page = found[offset:offset + limit]
            last = offset + len(page) >= len(found)
            items = "".join(soap.item_xml(self.store, i, base, fields) for i in page)
            next_offset = offset + len(page)
            paging = f'IndexedPagingOffset="{next_offset}" ' if view is not None else ""  # only for indexed paging
            messages.append(soap.ok("FindItem", (
                f'<m:RootFolder {paging}TotalItemsInView="{len(found)}" '
                f'IncludesLastItemInRange="{str(last).lower()}"><t:Items>{items}</t:Items></m:RootFolder>')))
        return self._xml(soap.response("FindItem", messages))

    def op_SyncFolderItems(self, request, principal, mailbox, req) -> web.Response:
        base, fields = soap.shape(req.body, "ItemShape")
        refs = soap.folder_refs(req.body.find("m:SyncFolderId", NS))
        try:
            max_changes = int(soap.text_of(req.body, "m:MaxChangesReturned") or "0")
        except ValueError:
            max_changes = 0
        try:
            if not refs:
                raise StoreError("ErrorInvalidArgument", "SyncFolderId is required.")
            if not 1 <= max_changes <= 512:
                raise StoreError("ErrorInvalidArgument", "MaxChangesReturned must be between 1 and 512.")
            folder = self._folder(mailbox, refs[0])
            ignore = {e.get("Id") for e in req.body.findall("m:Ignore/t:ItemId", NS)}
            changes, state, last = self.store.sync(folder, soap.text_of(req.body, "m:SyncState"), max_changes, ignore)
        except StoreError as exc:  # exchangelib reads SyncState and IncludesLastItemInRange even on errors
            inner = "<m:SyncState/><m:IncludesLastItemInRange>true</m:IncludesLastItemInRange>"
            return self._xml(soap.response("SyncFolderItems", [soap.error("SyncFolderItems", exc.code, exc.text, inner)]))
        parts = []
        for change in changes:
            if change[0] in ("Create", "Update"):
                kind = change[0]
                parts.append(f"<t:{kind}>{soap.item_xml(self.store, change[1], base, fields)}</t:{kind}>")
            elif change[0] == "Delete":
                parts.append(f'<t:Delete><t:ItemId Id="{soap.esc(change[1])}"/></t:Delete>')
            else:
                parts.append(f'<t:ReadFlagChange><t:ItemId Id="{soap.esc(change[1])}"/>'
                             f"<t:IsRead>{str(change[2]).lower()}</t:IsRead></t:ReadFlagChange>")
        inner = (f"<m:SyncState>{soap.esc(state)}</m:SyncState>"
                 f"<m:IncludesLastItemInRange>{str(last).lower()}</m:IncludesLastItemInRange>"
                 f"<m:Changes>{''.join(parts)}</m:Changes>")
        return self._xml(soap.response("SyncFolderItems", [soap.ok("SyncFolderItems", inner)]))

    def op_SyncFolderHierarchy(self, request, principal, mailbox, req) -> web.Response:
        """Folder tree changes below SyncFolderId, or below msgfolderroot (the IPM subtree) when absent."""
        refs = soap.folder_refs(req.body.find("m:SyncFolderId", NS))
        try:
            root = self._folder(mailbox, refs[0]) if refs else self.store.folder(mailbox, "msgfolderroot")
            changes, state = self.store.sync_hierarchy(root, soap.text_of(req.body, "m:SyncState"))
        except StoreError as exc:
            return self._xml(soap.response("SyncFolderHierarchy", [soap.error(
                "SyncFolderHierarchy", exc.code, exc.text, ERROR_INNER["SyncFolderHierarchy"])]))
        parts = []
        for kind, folder in changes:
            if kind == "Delete":
                parts.append(f"<t:Delete>{soap.folder_id(folder)}</t:Delete>")
            else:
                parts.append(f"<t:{kind}>{soap.folder_xml(self.store, folder)}</t:{kind}>")
        inner = (f"<m:SyncState>{soap.esc(state)}</m:SyncState>"
                 "<m:IncludesLastFolderInRange>true</m:IncludesLastFolderInRange>"
                 f"<m:Changes>{''.join(parts)}</m:Changes>")
        return self._xml(soap.response("SyncFolderHierarchy", [soap.ok("SyncFolderHierarchy", inner)]))

    def op_ConvertId(self, request, principal, mailbox, req) -> web.Response:
        """What exchangelib sends to learn the server's version when none is configured."""
        return self._xml(soap.response("ConvertId", soap.convert_id_messages(req.body)))

    def op_Subscribe(self, request, principal, mailbox, req) -> web.Response:
        streaming = req.body.find("m:StreamingSubscriptionRequest", NS)
        if streaming is None:
            return self._xml(soap.response("Subscribe", [soap.error(
                "Subscribe", "ErrorInvalidSubscriptionRequest", "The emulator supports streaming subscriptions only.")]))
        event_types = [e.text.strip() for e in streaming.findall("t:EventTypes/t:EventType", NS) if e.text]
        try:
            if not event_types or set(event_types) - EVENT_TYPES:
                raise StoreError("ErrorInvalidSubscriptionRequest", "EventTypes is empty or names an unknown event.")
            if streaming.get("SubscribeToAllFolders") in ("true", "1"):
                folder_ids = None
            else:
                refs = soap.folder_refs(streaming.find("t:FolderIds", NS))
                if not refs:
                    raise StoreError("ErrorInvalidSubscriptionRequest", "No folders to subscribe to.")
                folder_ids = [self._folder(mailbox, ref).id for ref in refs]
            throttle = throttling.of(self)
            if throttle is not None:  # EWSMaxSubscriptions, charged to the target mailbox when impersonating
                throttle.check_subscriptions(throttling.subscriptions_charged(
                    self.store, principal.name, mailbox, req.impersonated))
            sub = self.store.subscribe(principal.name, mailbox, folder_ids, event_types)
        except (StoreError, throttling.Refused) as exc:
            return self._xml(soap.response("Subscribe", [soap.error("Subscribe", exc.code, exc.text)]))
        headers = {}
        if request.headers.get("X-PreferServerAffinity", "").lower() == "true":
            anchor = request.headers.get("X-AnchorMailbox", mailbox).lower()
            backend = hashlib.sha1(anchor.encode()).hexdigest()[:12].upper()
            headers["Set-Cookie"] = f"X-BackEndOverrideCookie=EMU{backend}.emulator.local~1941996295; path=/; secure"
        self.log.debug("subscribed", mailbox=mailbox, subscription_id=sub.id)
        return self._xml(soap.response("Subscribe", [soap.ok(
            "Subscribe", f"<m:SubscriptionId>{soap.esc(sub.id)}</m:SubscriptionId>")]), headers=headers)

    def op_Unsubscribe(self, request, principal, mailbox, req) -> web.Response:
        sub_id = soap.text_of(req.body, "m:SubscriptionId") or ""
        try:
            sub = self.store.subscription(sub_id, principal.name)
        except StoreError as exc:
            return self._xml(soap.response("Unsubscribe", [soap.error("Unsubscribe", exc.code, exc.text)]))
        self._forget(sub)
        return self._xml(soap.response("Unsubscribe", [soap.ok("Unsubscribe")]))

    def _forget(self, sub: Subscription) -> None:
        self.store.drop_subscription(sub)
        stream = sub.stream
        if stream is not None and sub in stream.subs:
            stream.subs.remove(sub)
            stream.kick()
        sub.stream = None

    # -- streaming ---------------------------------------------------------------------------
    def _stream_error(self, code: str, text: str, bad_ids=()) -> web.Response:
        data = soap.streaming_error(code, text, list(bad_ids), streamed=False)
        self.validator.check(data)
        return web.Response(body=data, content_type="text/xml", charset="utf-8")

    async def op_GetStreamingEvents(self, request, principal, req) -> web.StreamResponse:
        ids = [e.text.strip() for e in req.body.findall("m:SubscriptionIds/t:SubscriptionId", NS) if e.text]
        try:
            minutes = int(soap.text_of(req.body, "m:ConnectionTimeout") or "")
        except ValueError:
            minutes = 0
        if not 1 <= minutes <= 30:
            return self._stream_error("ErrorInvalidArgument", "ConnectionTimeout must be between 1 and 30 minutes.")
        if not 1 <= len(ids) <= MAX_SUBSCRIPTIONS_PER_STREAM:
            return self._stream_error("ErrorInvalidArgument",
                                      f"Between 1 and {MAX_SUBSCRIPTIONS_PER_STREAM} subscription ids are allowed.")
        subs, bad, code, text = [], [], None, None
        for sub_id in ids:
            try:
                subs.append(self.store.subscription(sub_id, principal.name))
            except StoreError as exc:
                bad.append(sub_id)
                code, text = code or exc.code, text or exc.text
        missed = [s for s in subs if s.missed]
        if missed:
            for sub in missed:
                self._forget(sub)
            bad, code, text = [s.id for s in missed], "ErrorMissedNotificationEvents", MISSED
        if bad:
            return self._stream_error(code, text, bad)
        limit = self.options.max_streams_per_account
        if limit and sum(1 for s in self.streams if s.principal.name == principal.name) >= limit:
            return self._stream_error("ErrorExceededConnectionCount",
                                      "You have exceeded the available concurrent connections for your account.")
        throttle = throttling.of(self)  # HangingConnectionLimit, charged to the impersonated mailbox's copy
        charged = throttling.charged_to(principal.name, req.impersonated.lower() if req.impersonated else None)
        if throttle is not None:
            try:
                throttle.open_stream(charged)
            except throttling.Refused as exc:
                return self._stream_error(exc.code, exc.text)
        stream = Stream(principal, subs, request.transport)
        for sub in subs:
            if sub.stream is not None and sub.stream is not stream:
                old = sub.stream
                if sub in old.subs:
                    old.subs.remove(sub)
                old.kick()
            sub.stream = stream
            sub.idle_since = None
        self.streams.add(stream)
        response = web.StreamResponse(headers={"Content-Type": XML})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            await self._pump(stream, response, time.monotonic() + minutes * self.options.minute_seconds)
        except (ConnectionError, RuntimeError):  # client went away mid-write
            stream.dead = True
        finally:  # also on cancellation: aiohttp cancels the handler when the client disconnects
            if throttle is not None:
                throttle.close_stream(charged)
            self.streams.discard(stream)
            now = time.monotonic()
            for sub in stream.subs:
                if sub.stream is stream:
                    sub.stream = None
                    sub.idle_since = now
        return response

    async def _send(self, response: web.StreamResponse, data: bytes) -> None:
        self.validator.check(data)
        await response.write(data)

    async def _pump(self, stream: Stream, response: web.StreamResponse, deadline: float) -> None:
        """Deliver queued events, heartbeat when idle, ``Closed`` at the deadline."""
        heartbeat = self.options.heartbeat_seconds
        next_beat = time.monotonic() + heartbeat
        while not stream.dead:
            now = time.monotonic()
            if now < self.faults.stall_until:
                await self._wait(stream, min(self.faults.stall_until, deadline) - now)
                next_beat = time.monotonic() + heartbeat
                if time.monotonic() < deadline:
                    continue
            if stream.dead:
                return
            gone = [s.id for s in stream.subs if s.id not in self.store.subscriptions]
            missed = [s for s in stream.subs if s.missed]
            if gone or missed:
                if gone:
                    error = soap.streaming_error("ErrorSubscriptionNotFound",
                                                 "The specified subscription was not found.", gone)
                else:
                    error = soap.streaming_error("ErrorMissedNotificationEvents", MISSED, [s.id for s in missed])
                    for sub in missed:
                        self._forget(sub)
                await self._send(response, error)
                await response.write_eof()
                return
            if not stream.subs:
                break  # every subscription moved to another connection or was unsubscribed
            notifications = []
            for sub in stream.subs:
                if sub.queue:
                    batch = [sub.queue.popleft() for _ in range(min(EVENTS_PER_NOTIFICATION, len(sub.queue)))]
                    notifications.append(soap.notification_xml(sub.id, batch, bool(sub.queue), self.store))
            now = time.monotonic()
            if notifications:
                await self._send(response, soap.streaming_message(notifications))
                next_beat = now + heartbeat
                continue
            if now >= deadline:
                break
            if now >= next_beat:
                await self._send(response, soap.streaming_message(status="OK"))
                next_beat = now + heartbeat
            await self._wait(stream, min(next_beat, deadline) - time.monotonic())
        if not stream.dead:
            await self._send(response, soap.streaming_message(status="Closed"))
            await response.write_eof()

    @staticmethod
    async def _wait(stream: Stream, seconds: float) -> None:
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await stream.wake.wait()
        except TimeoutError:
            pass
        stream.wake.clear()

    # -- test hooks (not EWS) ----------------------------------------------------------------
    @staticmethod
    def _where(folder) -> dict:
        return {"folder_id": folder.id, "path": folder.path or folder.name}

    async def deliver(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not raw.strip():
            return web.json_response({"error": "empty message body"}, status=400)
        folder = request.query.get("folder", "inbox")
        try:
            item = self.store.deliver(request.match_info["address"], raw, folder)
        except StoreError as exc:
            return web.json_response({"error": exc.code, "message": exc.text}, status=400)
        self.log.debug("delivered", mailbox=item.mailbox, folder=folder)
        return web.json_response({"item_id": item.id, "folder": folder, "folder_id": item.folder_id}, status=201)

    async def create_folder(self, request: web.Request) -> web.Response:
        """``{"path": "A/B", "folder_class": "IPF.Note"}`` -> ``{"folder_id", "path", "folder_class", "created"}``."""
        try:
            body = await request.json()
            path = body["path"]
            folder_class = body.get("folder_class") or "IPF.Note"
            if not isinstance(path, str) or not path.strip() or not isinstance(folder_class, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'JSON body with a "path" string required'}, status=400)
        try:
            folder, created = self.store.create_folder(request.match_info["address"], path, folder_class)
        except StoreError as exc:
            return web.json_response({"error": exc.code, "message": exc.text}, status=400)
        return web.json_response({**self._where(folder), "folder_class": folder.folder_class, "created": created},
                                 status=201 if created else 200)

    async def delete_folder(self, request: web.Request) -> web.Response:
        path = request.query.get("path", "")
        try:
            folder = self.store.delete_folder(request.match_info["address"], path)
        except StoreError as exc:
            return web.json_response({"error": exc.code, "message": exc.text}, status=404)
        return web.json_response({"deleted": True, **self._where(folder)})

    async def move(self, request: web.Request) -> web.Response:
        folder = request.query.get("folder")
        if not folder:
            return web.json_response({"error": "folder query parameter is required"}, status=400)
        try:
            item = self.store.move(request.match_info["item_id"], folder)
        except StoreError as exc:
            return web.json_response({"error": exc.code}, status=404)
        return web.json_response({"item_id": item.id, "folder": folder, "folder_id": item.folder_id})

    async def mark_read(self, request: web.Request) -> web.Response:
        is_read = request.query.get("is_read", "true").lower() in ("1", "true", "yes")
        try:
            item = self.store.set_read(request.match_info["item_id"], is_read)
        except StoreError as exc:
            return web.json_response({"error": exc.code}, status=404)
        return web.json_response({"item_id": item.id, "is_read": item.is_read})

    async def touch(self, request: web.Request) -> web.Response:
        try:
            item = self.store.touch(request.match_info["item_id"])
        except StoreError as exc:
            return web.json_response({"error": exc.code}, status=404)
        return web.json_response({"item_id": item.id})

    async def delete_item(self, request: web.Request) -> web.Response:
        """Hard delete (to Recoverable Items\\Deletions, new id); ``?purge=true``: gone from the mailbox."""
        purge = request.query.get("purge", "").lower() in ("1", "true", "yes")
        try:
            if purge:
                self.store.purge(request.match_info["item_id"])
                item = None
            else:
                item = self.store.hard_delete(request.match_info["item_id"])
        except StoreError as exc:
            return web.json_response({"error": exc.code}, status=404)
        if item is None:
            return web.json_response({"deleted": True, "purged": True, "item_id": None, "folder": None,
                                      "folder_id": None})
        return web.json_response({"deleted": True, "purged": False, "item_id": item.id, "folder": DELETIONS,
                                  "folder_id": item.folder_id})

    async def stats(self, request: web.Request) -> web.Response:
        throttle = throttling.of(self)
        return web.json_response({"streams": len(self.streams), "subscriptions": len(self.store.subscriptions),
                                  "mailboxes": len(self.store.mailboxes), "items": len(self.store.items),
                                  "operations": dict(self.operations), "pid": os.getpid(),
                                  **({"throttling": throttle.stats()} if throttle is not None else {})})

    async def reset_all(self, request: web.Request) -> web.Response:
        count = len(self.streams)
        self.reset()
        self.log.info("emulator reset", streams_reset=count)
        return web.json_response({"reset": True, "streams_reset": count})

    async def fault(self, request: web.Request) -> web.Response:
        """Inject a fault. Kinds: reset_streams; stall_streams {seconds}; expire_subscriptions;
        server_busy {count, back_off_ms} (the next N requests), or with {anchor}: only requests
        whose X-AnchorMailbox is that address, N times (count < 0: until count 0 clears it);
        http_503 {count}; truncated_xml {count} (the next N answers other than streams stop halfway,
        still HTTP 200); latency {ms}; restart; mailbox_error {mailbox, code, operations};
        clear_mailbox_error {mailbox}; ntlm_reset {count} (the next N NTLM handshakes: the
        connection is reset right after the client's type-1 message)."""
        try:
            body = await request.json()
            kind = body["kind"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'JSON body with "kind" required'}, status=400)
        try:
            if kind == "reset_streams":
                count = len(self.streams)
                for stream in list(self.streams):
                    stream.reset()
            elif kind == "stall_streams":
                self.faults.stall_until = time.monotonic() + float(body["seconds"])
                count = len(self.streams)
            elif kind == "expire_subscriptions":
                count = len(self.store.subscriptions)
                for sub in list(self.store.subscriptions.values()):
                    self.store.drop_subscription(sub)
                for stream in self.streams:
                    stream.kick()
            elif kind == "server_busy" and body.get("anchor"):
                anchor, count = str(body["anchor"]).strip().lower(), int(body.get("count", 1))
                if count == 0:
                    self.faults.busy_anchors.pop(anchor, None)
                else:  # a negative count: busy until cleared
                    self.faults.busy_anchors[anchor] = [max(count, -1), int(body.get("back_off_ms", 30_000))]
            elif kind == "server_busy":
                self.faults.busy = int(body.get("count", 1))
                self.faults.back_off_ms = int(body.get("back_off_ms", 30_000))
                count = self.faults.busy
            elif kind == "mailbox_error":
                code = body["code"]
                if code not in MAILBOX_ERROR_CODES:
                    raise ValueError(f"code must be one of {sorted(MAILBOX_ERROR_CODES)}")
                operations = body.get("operations", ["Subscribe", "GetFolder"])
                if not isinstance(operations, list) or not all(isinstance(o, str) for o in operations):
                    raise TypeError("operations must be a list of operation names")
                self.faults.mailbox_errors[str(body["mailbox"]).strip().lower()] = (code, frozenset(operations))
                count = 1
            elif kind == "clear_mailbox_error":
                count = int(self.faults.mailbox_errors.pop(str(body["mailbox"]).strip().lower(), None) is not None)
            elif kind == "http_503":
                self.faults.http_503 = count = int(body.get("count", 1))
            elif kind == "truncated_xml":
                self.faults.truncated = count = int(body.get("count", 1))
            elif kind == "latency":
                self.faults.latency_ms = count = max(0, int(body.get("ms", 0)))
            elif kind == "ntlm_reset":  # the next N NTLM/Negotiate handshakes: TCP reset right after the type-1
                self._ntlm_reset_faults, self._ntlm_resets = self.faults, int(body.get("count", 1))
                count = self._ntlm_resets
            elif kind == "restart":
                count = len(self.streams)
                for stream in list(self.streams):
                    stream.reset()
                for sub in list(self.store.subscriptions.values()):
                    self.store.drop_subscription(sub)
                self.faults = Faults()
            else:
                return web.json_response({"error": f"unknown fault kind {kind!r}"}, status=400)
        except (KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": f"bad fault parameters: {exc}"}, status=400)
        self.log.info("fault injected", kind=kind, affected=count)
        return web.json_response({"kind": kind, "affected": count})


async def serve(options: Options, host: str, port: int, ready=None) -> None:
    """Serve until cancelled; ``ready(url)`` is called once connections are accepted."""
    emulator = Emulator(options)
    # handler_cancellation: a client that hangs up frees its stream at once, not at the next heartbeat
    runner = web.AppRunner(emulator.app(), access_log=None, shutdown_timeout=2.0, handle_signals=False,
                           handler_cancellation=True)
    await runner.setup()
    import ssl

    tls = None
    if options.tls_cert:  # HTTPS as on-premises Exchange serves it (a certificate from the site's CA)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(options.tls_cert, options.tls_key or None)
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True, ssl_context=tls)
    await site.start()
    if ready:
        ready(f"{'https' if tls else 'http'}://{host}:{port}/EWS/Exchange.asmx")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(options: Options, host: str, port: int, ready=None) -> None:
    """Run ``serve`` until SIGTERM/SIGINT, then shut down cleanly."""
    import signal

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(options, host, port, ready)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
