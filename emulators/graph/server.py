"""The Microsoft Graph emulator as a real HTTP server: Graph v1.0 mail on one port, an Entra-like
token host over HTTPS on another, and test hooks under ``/emulator``.

What it serves (``/v1.0`` on the Graph port; every request needs ``Authorization: Bearer`` with a
token of the token host, else 401 InvalidAuthenticationToken):

- ``users/{address or object id}``; ``mailFolders`` (+ ``/{id or well-known name}``,
  ``/childFolders``, ``$top``/``$skip`` paging with ``@odata.nextLink``, ``includeHiddenFolders``);
  ``messages`` and ``mailFolders/{f}/messages`` (list, get with ``$select``, ``/$value`` as
  text/plain MIME, ``DELETE`` to Deleted Items, ``move``). ``internetMessageHeaders`` only when
  ``$select`` names it and never for Sent Items or Drafts. ``Prefer: IdType="ImmutableId"``
  gives immutable ids (and ``Preference-Applied``); without it ids are regular ones that change on
  every move. Both kinds are accepted as input.
- ``mailFolders/{f}/messages/delta`` (``$select``, ``changeType``, ``Prefer: odata.maxpagesize``),
  see ``emulators.graph.delta``; a lost sync state is 410 ``SyncStateNotFound``.
- ``subscriptions`` (create with the validation handshake on both URLs, list, get, renew by PATCH,
  delete, ``reauthorize``), change and lifecycle notifications, see ``emulators.graph.notify``.
- ``$batch`` (at most 20; up to four sub-requests run at once; each is throttled and faulted on
  its own; a non-JSON body comes back base64-encoded).
- Throttling: four concurrent requests per mailbox (the fifth gets 429 ApplicationThrottled,
  MailboxConcurrency, with Retry-After).

The token host (HTTPS, throwaway CA): ``GET /{tenant}/v2.0/.well-known/openid-configuration`` and
``POST /{tenant}/oauth2/v2.0/token`` (client credentials with a secret or an RS256/PS256 client
assertion signed by the key of a configured certificate), errors as Entra's JSON.

Test hooks on the Graph port: ``POST /emulator/mailboxes/{addr}/messages?folder=NAME`` (body: RFC
5322; ``&received=ISO`` backdates receivedDateTime) -> 201 ``{"item_id", "folder", ...}``;
``POST /emulator/items/{id}/move?folder=NAME``; ``DELETE /emulator/items/{id}`` (hard delete: to
Recoverable Items\\Deletions as Exchange does, ``?purge=true``: gone);
``POST /emulator/folders?mailbox=&path=``; ``POST /emulator/faults`` (kinds in ``Emulator.fault``);
``POST /emulator/reset``; ``GET /emulator/stats``.

Where it knowingly differs from Graph:
- One tenant, one application, no permissions model: the app may read every mailbox (Graph needs
  Mail.Read and, usually, RBAC for Applications). Access tokens are HS256 JWTs signed with a key
  made at start, so they do not survive a restart of the process (they do survive ``restart``,
  the fault, and ``reset``). Token errors carry Entra's AADSTS codes, but the texts of assertion
  refusals other than a bad signature or an unknown certificate are the emulator's own.
- notificationUrl may be http:// (Graph requires https); https receivers' certificates are not
  checked. No Event Hubs, no rich notifications (includeResourceData), no encryption.
- Only Outlook messages: no calendar, contacts, attachments, $filter, $search, $orderby or
  $expand (refused with 400 rather than ignored). Bodies are the MIME's own text or HTML (text is
  wrapped in minimal HTML); bodyPreview is the first 255 characters of the text; uniqueBody is the
  text above the first quote attribution or separator, without ``>`` lines (Exchange compares the
  conversation's messages); isRead is always false; conversationId groups by the first References
  id (Exchange uses its thread index). Messages reached through a folder they are not in are
  still returned.
- Changes are arrivals, moves and hard deletes only (no updates). A move out of a folder is
  ``@removed`` reason ``changed`` in delta, a hard delete ``deleted``; change notifications are
  ``created`` for arrivals and ``deleted`` for departures. A subscription past its expiry is
  removed without a lifecycle notification, and ``reauthorizationRequired`` is only sent by the
  fault, whose held notifications are delivered on reauthorize or renew (Graph may lose them).
- Error texts follow Graph's where known (ValidationError, "Subscription expiration can only be
  4230 minutes in the future.", "Maximum number of subscriptions has been reached",
  ErrorItemNotFound, SyncStateNotFound, MailboxConcurrency); others (an expiry in the past, an
  unsupported resource, bad batch payloads, the throttle and 503 faults' bodies) are the
  emulator's own wording with Graph's codes.
- The ``throttle`` and ``http_503`` faults hit each request or batch sub-request, never a
  ``$batch`` envelope; ``restart`` makes every Graph and token request 503 for a while (the test
  hooks keep answering). Requests take no time unless ``latency`` (option or fault) says so, so
  the four-concurrent limit bites only then or with truly parallel clients; the 10,000 requests
  per 10 minutes limit is not enforced (requests are counted per mailbox in the stats).
- Delta never repeats an item within a round; like Exchange's sync states, only the newest few
  links of a chain stay valid (``delta_generations``), older ones answer 410.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import os
import socket
import tempfile
import time
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from cryptography import x509

from emulators.graph.api import GraphApi, Request, Response
from emulators.graph.auth import Authority, TokenError, tls_context
from emulators.graph.delta import DeltaTokens
from emulators.graph.errors import GraphError
from emulators.graph.notify import Notifier, Timing
from emulators.graph.store import Store
from emulators.graph.subscriptions import Subscriptions
from exchange_listener.core import logs

FAULT_KINDS = ("drop_notifications", "duplicate_notifications", "delay_notifications", "remove_subscriptions",
               "reauthorization_required", "throttle", "http_503", "expire_delta_tokens", "restart",
               "strip_reply_headers", "latency", "clear")


@dataclasses.dataclass
class Options:
    tenant: str = "contoso-tenant"
    client_id: str = "graph-app"
    client_secret: str | None = "graph-secret"
    certificates: list[x509.Certificate] = dataclasses.field(default_factory=list)
    mailboxes: list[str] = dataclasses.field(default_factory=list)
    token_lifetime: int = 3599
    timing: Timing = dataclasses.field(default_factory=Timing)
    max_subscriptions_per_mailbox: int = 1000
    max_concurrent_per_mailbox: int = 4
    latency: float = 0.0  # every Graph request takes this long (while it holds its mailbox slot)
    restart_seconds: float = 1.0
    delta_generations: int = 4
    sweep_seconds: float = 0.5


class Emulator:
    def __init__(self, options: Options):
        self.options = options
        self.log = logs.get_logger(component="graph-emulator")
        self.store = Store()
        self.notifier = Notifier(options.timing)
        self.authority = Authority(options.tenant, options.client_id, options.client_secret, options.certificates,
                                   options.token_lifetime)
        self.deltas = DeltaTokens(self.store, options.delta_generations)
        self.subscriptions = Subscriptions(self.store, self.notifier, options.tenant, options.client_id,
                                           options.max_subscriptions_per_mailbox)
        self.api = GraphApi(self.store, self.deltas, self.subscriptions, self.authority,
                            options.max_concurrent_per_mailbox, options.latency)
        self.strip_reply_headers = 0
        self.restarts = 0
        self._add_mailboxes()

    def _add_mailboxes(self) -> None:
        for address in self.options.mailboxes:
            self.store.add_mailbox(address)

    def reset(self) -> None:
        """A fresh process's state with the same options (mailboxes made again, empty)."""
        self.notifier.reset()
        self.subscriptions.clear()
        self.deltas.clear()
        self.store.clear()
        self.api.reset()
        self.authority.counts.update(token_grants=0, token_refusals=0)
        self.strip_reply_headers = 0
        self.restarts = 0
        self._add_mailboxes()

    # -- apps ------------------------------------------------------------------------------
    def graph_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/v1.0/{tail:.*}", self.graph)
        app.router.add_post("/emulator/mailboxes/{mailbox}/messages", self.deliver)
        app.router.add_post("/emulator/items/{item_id}/move", self.move)
        app.router.add_delete("/emulator/items/{item_id}", self.delete)
        app.router.add_post("/emulator/folders", self.create_folder)
        app.router.add_post("/emulator/faults", self.fault)
        app.router.add_post("/emulator/reset", self.reset_all)
        app.router.add_get("/emulator/stats", self.stats)
        return app

    def token_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/{tenant}/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self.keys)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self.token)
        return app

    # -- Graph -----------------------------------------------------------------------------
    async def graph(self, request: web.Request) -> web.Response:
        path = request.raw_path.split("?", 1)[0][len("/v1.0"):]
        headers = {k.lower(): v for k, v in request.headers.items()}
        req = Request(request.method, path, dict(parse_qsl(request.query_string, keep_blank_values=True)), headers,
                      await request.read(), f"{request.scheme}://{request.host}/v1.0")
        return _write(await self.api.handle(req))

    # -- the token host --------------------------------------------------------------------
    def _token_unavailable(self) -> web.Response | None:
        if time.monotonic() < self.api.faults.unavailable_until:
            return web.json_response({"error": "temporarily_unavailable", "error_description":
                                      "AADSTS90033: A transient error has occurred. Please try again."},
                                     status=503, headers={"Retry-After": "1"})
        return None

    async def discovery(self, request: web.Request) -> web.Response:
        unavailable = self._token_unavailable()
        if unavailable is not None:
            return unavailable
        try:
            self.authority.check_tenant(request.match_info["tenant"])
        except TokenError as exc:
            return web.json_response(exc.body(), status=exc.status)
        return web.json_response(self.authority.discovery(f"https://{request.host}"))

    async def keys(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": []})

    async def token(self, request: web.Request) -> web.Response:
        unavailable = self._token_unavailable()
        if unavailable is not None:
            return unavailable
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        basic = None
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
                basic = (user, password)
            except (ValueError, UnicodeDecodeError):
                basic = None
        try:
            body = self.authority.grant(request.match_info["tenant"], form, basic)
        except TokenError as exc:
            self.log.info("token refused", error=exc.error, code=exc.code)
            return web.json_response(exc.body(), status=exc.status)
        return web.json_response(body, headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"})

    # -- test hooks ------------------------------------------------------------------------
    def _message_answer(self, message) -> dict[str, Any]:
        return {"item_id": message.immutable_id, "regular_id": message.regular_id, "folder": message.folder.path,
                "folder_id": message.folder.id, "mailbox": message.mailbox.address,
                "internet_message_id": message.parsed.internet_message_id}

    async def deliver(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not raw.strip():
            return web.json_response({"error": "the body must be an RFC 5322 message"}, status=400)
        mailbox = self.store.add_mailbox(request.match_info["mailbox"])
        try:
            folder = self.store.folder_path(mailbox, request.query.get("folder", "inbox"))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        received = None
        if request.query.get("received"):
            try:
                received = dt.datetime.fromisoformat(request.query["received"])
            except ValueError:
                return web.json_response({"error": "received must be an ISO 8601 time"}, status=400)
            received = received.replace(tzinfo=dt.UTC) if received.tzinfo is None else received
        strip = self.strip_reply_headers > 0
        if strip:
            self.strip_reply_headers -= 1
        message = self.store.deliver(mailbox, raw, folder, strip_reply_headers=strip, received=received)
        self.log.info("message delivered", mailbox=mailbox.address, folder=folder.path)
        return web.json_response(self._message_answer(message), status=201)

    def _item(self, request: web.Request):
        try:
            return self.store.message(request.match_info["item_id"])
        except GraphError:
            return None

    async def move(self, request: web.Request) -> web.Response:
        message = self._item(request)
        if message is None:
            return web.json_response({"error": "ErrorItemNotFound"}, status=404)
        try:
            folder = self.store.folder_path(message.mailbox, request.query.get("folder", ""))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.store.move(message, folder)
        return web.json_response(self._message_answer(message))

    async def delete(self, request: web.Request) -> web.Response:
        message = self._item(request)
        if message is None:
            return web.json_response({"error": "ErrorItemNotFound"}, status=404)
        purge = request.query.get("purge", "").lower() in ("1", "true", "yes")
        self.store.delete(message, purge=purge)
        answer = self._message_answer(message)
        if purge:
            answer.update(folder=None, folder_id=None, regular_id=None)
        return web.json_response({"deleted": True, "purged": purge, **answer})

    async def create_folder(self, request: web.Request) -> web.Response:
        address, path = request.query.get("mailbox", ""), request.query.get("path", "")
        if not address or not path.strip("/ "):
            return web.json_response({"error": "mailbox and path are required"}, status=400)
        mailbox = self.store.add_mailbox(address)
        try:
            folder = self.store.folder_path(mailbox, path, create=False)
            created = False
        except KeyError:
            folder, created = self.store.folder_path(mailbox, path), True
        return web.json_response({"id": folder.id, "path": folder.path, "created": created},
                                 status=201 if created else 200)

    async def fault(self, request: web.Request) -> web.Response:
        """Kinds: drop_notifications {count}; duplicate_notifications {count}; delay_notifications
        {seconds, count?} (no count: every notification until seconds 0); remove_subscriptions;
        reauthorization_required; throttle {count, retry_after}; http_503 {count, retry_after};
        expire_delta_tokens; restart; strip_reply_headers {count}; latency {seconds, count};
        clear (every fault off)."""
        try:
            body = await request.json()
            kind = body["kind"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'JSON body with "kind" required'}, status=400)
        if kind not in FAULT_KINDS:
            return web.json_response({"error": f"unknown fault kind {kind!r}", "kinds": list(FAULT_KINDS)},
                                     status=400)
        faults, notifier = self.api.faults, self.notifier
        try:
            count = int(body.get("count", 1))
            if kind == "drop_notifications":
                notifier.drop = affected = count
            elif kind == "duplicate_notifications":
                notifier.duplicate = affected = count
            elif kind == "delay_notifications":
                notifier.delay_seconds = float(body["seconds"])
                notifier.delay_count = int(body["count"]) if body.get("count") is not None else None
                affected = notifier.delay_count if notifier.delay_count is not None else -1
            elif kind == "remove_subscriptions":
                affected = self.subscriptions.remove_all(tell=True)
            elif kind == "reauthorization_required":
                affected = self.subscriptions.require_reauthorization()
            elif kind == "throttle":
                faults.throttle = affected = count
                faults.throttle_retry_after = float(body.get("retry_after", 1))
            elif kind == "http_503":
                faults.http_503 = affected = count
                faults.http_503_retry_after = float(body.get("retry_after", 1))
            elif kind == "expire_delta_tokens":
                affected = self.deltas.expire_all()
            elif kind == "restart":
                affected = self.subscriptions.remove_all(tell=False)
                notifier.counts["dropped_restart"] += notifier.clear()
                self.deltas.expire_all()
                faults.unavailable_until = time.monotonic() + float(body.get("seconds", self.options.restart_seconds))
                self.restarts += 1
            elif kind == "strip_reply_headers":
                self.strip_reply_headers = affected = count
            elif kind == "latency":
                faults.latency, faults.latency_seconds = count, float(body.get("seconds", 0.1))
                affected = count
            else:  # clear
                self.api.faults = type(faults)()
                notifier.drop = notifier.duplicate = 0
                notifier.delay_seconds, notifier.delay_count = 0.0, 0
                self.strip_reply_headers = 0
                affected = 0
        except (KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": f"bad fault parameters: {exc}"}, status=400)
        self.log.info("fault injected", kind=kind, affected=affected)
        return web.json_response({"kind": kind, "affected": affected})

    async def reset_all(self, request: web.Request) -> web.Response:
        self.reset()
        self.log.info("emulator reset")
        return web.json_response({"reset": True})

    async def stats(self, request: web.Request) -> web.Response:
        self.subscriptions.sweep()
        per_mailbox = self.subscriptions.per_mailbox()
        notifications = self.notifier.stats()
        counts = self.api.counts
        return web.json_response({
            "pid": os.getpid(),
            "mailboxes": {m.address: {"object_id": m.object_id,
                                      "messages": sum(len(f.messages) for f in m.folders.values()),
                                      "requests": self.api.per_mailbox.get(m.address, 0),
                                      "subscriptions": per_mailbox.get(m.address, 0)}
                          for m in self.store.mailboxes.values()},
            "subscriptions": per_mailbox, "subscriptions_total": len(self.subscriptions.subs),
            "subscriptions_expired": self.subscriptions.expired,
            "subscriptions_created": counts.get("subscriptions_created", 0),
            "notifications": {k: v for k, v in notifications.items() if k not in ("lifecycle", "endpoints")},
            "lifecycle": notifications["lifecycle"], "endpoints": notifications["endpoints"],
            "validations": notifications["validations"], "validations_failed": notifications["validations_failed"],
            "requests": counts.get("requests", 0), "requests_per_mailbox": dict(self.api.per_mailbox),
            "batches": counts.get("batches", 0), "batch_requests": counts.get("batch_requests", 0),
            "throttled": counts.get("throttled", 0), "concurrency_throttled": counts.get("concurrency_throttled", 0),
            "http_503": counts.get("http_503", 0), "restarts": self.restarts,
            "delta_tokens_issued": self.deltas.issued, "delta_tokens_live": len(self.deltas.states),
            **self.authority.counts})

    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.options.sweep_seconds)
            self.subscriptions.sweep()


def _write(response: Response) -> web.Response:
    headers = dict(response.headers)
    if response.body is None:
        return web.Response(status=response.status, headers=headers)
    if isinstance(response.body, (bytes, bytearray)):
        return web.Response(status=response.status, body=bytes(response.body), headers=headers,
                            content_type=response.content_type)
    headers["Content-Type"] = response.content_type
    headers.setdefault("OData-Version", "4.0")
    return web.Response(status=response.status, body=json.dumps(response.body).encode(), headers=headers)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(options: Options, host: str, port: int, token_port: int = 0, ca_file: str | None = None,
                ready=None) -> None:
    """Serve until cancelled; ``ready(graph_url, token_url, ca_file)`` once both ports accept."""
    emulator = Emulator(options)
    await emulator.notifier.start()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ca_file is None:
        ca_file = os.path.join(tempfile.mkdtemp(prefix="graph-emulator-"), "ca.pem")
    context = tls_context([shown], ca_file)
    graph_runner = web.AppRunner(emulator.graph_app(), access_log=None, shutdown_timeout=1.0, handle_signals=False)
    token_runner = web.AppRunner(emulator.token_app(), access_log=None, shutdown_timeout=1.0, handle_signals=False)
    await graph_runner.setup()
    await token_runner.setup()
    graph_sock, token_sock = _listen(host, port), _listen(host, token_port)
    await web.SockSite(graph_runner, graph_sock).start()
    await web.SockSite(token_runner, token_sock, ssl_context=context).start()
    sweeper = asyncio.get_running_loop().create_task(emulator.sweeper())
    graph_port, bound_token_port = graph_sock.getsockname()[1], token_sock.getsockname()[1]
    if ready:
        ready(f"http://{shown}:{graph_port}/v1.0", f"https://{shown}:{bound_token_port}/{options.tenant}/oauth2/v2.0/token",
              ca_file)
    try:
        await asyncio.Event().wait()
    finally:
        sweeper.cancel()
        await emulator.notifier.stop()
        await graph_runner.cleanup()
        await token_runner.cleanup()


def run(options: Options, host: str, port: int, token_port: int = 0, ca_file: str | None = None, ready=None) -> None:
    """Run ``serve`` until SIGTERM/SIGINT, then shut down cleanly."""
    import signal

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(options, host, port, token_port, ca_file, ready)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())

