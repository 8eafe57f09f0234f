"""The Graph v1.0 surface: routing, Prefer headers, faults and throttling per request, and $batch.

Everything below ``/v1.0`` goes through ``GraphApi.handle`` as a ``Request``, so a sub-request of
a ``$batch`` is handled exactly as the same request on its own (its own faults, its own 429).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from emulators.graph import messages
from emulators.graph.auth import Authority
from emulators.graph.delta import CHANGE_TYPES, DEFAULT_PAGE, MAX_PAGE, DeltaTokens
from emulators.graph.errors import GraphError, bad_request, not_found_item
from emulators.graph.store import Folder, Mailbox, Message, Store
from emulators.graph.subscriptions import Subscriptions

JSON_TYPE = "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8"
MAX_BATCH = 20
BATCH_PARALLEL = 4  # Graph runs up to four Outlook requests of a batch at once
DEFAULT_TOP = 10
_KEY = re.compile(r"^([^()]+)\('([^']*)'\)$")


@dataclasses.dataclass
class Request:
    method: str
    path: str  # below /v1.0, percent-encoded, without the query
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    base: str  # http://host:port/v1.0, for links


@dataclasses.dataclass
class Response:
    status: int
    body: Any = None  # a dict (JSON), bytes, or None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    content_type: str = JSON_TYPE


@dataclasses.dataclass
class Faults:
    throttle: int = 0
    throttle_retry_after: float = 1.0
    http_503: int = 0
    http_503_retry_after: float = 1.0
    latency: int = 0
    latency_seconds: float = 0.0
    unavailable_until: float = 0.0  # restart: every request 503 until then


def retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def preferences(headers: dict[str, str]) -> dict[str, str]:
    """``Prefer`` as lower-case name -> value (quotes stripped)."""
    found: dict[str, str] = {}
    for part in headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            found[name.strip().lower()] = value.strip().strip('"')
    return found


def segments(path: str) -> list[str]:
    """Path segments, percent-decoded, with OData keys ``name('key')`` split into name and key."""
    out: list[str] = []
    for raw in path.strip("/").split("/"):
        segment = unquote(raw)
        match = _KEY.match(segment)
        out.extend([match.group(1), match.group(2)] if match else [segment])
    return [s for s in out if s != ""]


class GraphApi:
    def __init__(self, store: Store, deltas: DeltaTokens, subscriptions: Subscriptions, authority: Authority,
                 max_concurrent: int = 4, latency: float = 0.0):
        self.store, self.deltas, self.subscriptions, self.authority = store, deltas, subscriptions, authority
        self.max_concurrent = max_concurrent
        self.latency = latency
        self.faults = Faults()
        self.in_flight: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.per_mailbox: Counter[str] = Counter()

    def reset(self) -> None:
        self.faults = Faults()
        self.counts.clear()
        self.per_mailbox.clear()

    # -- entry -----------------------------------------------------------------------------
    async def handle(self, req: Request, *, in_batch: bool = False) -> Response:
        request_id = str(uuid.uuid4())
        client_request_id = req.headers.get("client-request-id") or request_id
        try:
            response = await self._handle(req, in_batch)
        except GraphError as exc:
            if exc.status == 429:
                self.counts["throttled"] += 1
            elif exc.status == 503:
                self.counts["http_503"] += 1
            response = Response(exc.status, exc.body(request_id, client_request_id), dict(exc.headers))
        response.headers.setdefault("request-id", request_id)
        response.headers.setdefault("client-request-id", client_request_id)
        return response

    async def _handle(self, req: Request, in_batch: bool) -> Response:
        self.counts["requests"] += 1
        if not in_batch:
            if time.monotonic() < self.faults.unavailable_until:
                raise _unavailable(1.0)
            self.authority.check(req.headers.get("authorization"))
        route = segments(req.path)
        if route == ["$batch"] and not in_batch:
            if req.method != "POST":
                raise GraphError(405, "BadRequest", "Only POST is allowed on $batch.")
            return await self.batch(req)
        if in_batch:
            self.counts["batch_requests"] += 1
        mailbox = None
        if len(route) >= 2 and route[0].lower() == "users":
            mailbox = self.store.user(route[1])
            if mailbox is None:
                if len(route) == 2:
                    raise GraphError(404, "Request_ResourceNotFound", f"Resource '{route[1]}' does not exist or one "
                                     "of its queried reference-property objects are not present.")
                raise GraphError(404, "ErrorInvalidUser", f"The requested user '{route[1]}' is invalid.")
            self.per_mailbox[mailbox.address] += 1
        if self.faults.http_503 > 0:
            self.faults.http_503 -= 1
            raise _unavailable(self.faults.http_503_retry_after)
        if self.faults.throttle > 0:
            self.faults.throttle -= 1
            raise GraphError(429, "TooManyRequests", "Please retry again later.",
                             {"Retry-After": retry_after(self.faults.throttle_retry_after)})
        if mailbox is None:
            return await self._route(req, route, None)
        if self.in_flight[mailbox.address] >= self.max_concurrent:
            self.counts["concurrency_throttled"] += 1
            raise GraphError(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.",
                             {"Retry-After": "1"})
        self.in_flight[mailbox.address] += 1
        try:
            delay = self.latency
            if self.faults.latency > 0:
                self.faults.latency -= 1
                delay += self.faults.latency_seconds
            await asyncio.sleep(delay)
            return await self._route(req, route, mailbox)
        finally:
            self.in_flight[mailbox.address] -= 1

    # -- routing ---------------------------------------------------------------------------
    async def _route(self, req: Request, route: list[str], mailbox: Mailbox | None) -> Response:
        names = [s.lower() for s in route]
        method = req.method
        if names and names[0] == "subscriptions":
            return await self._subscriptions(req, route)
        if names[:1] == ["me"]:
            raise bad_request("/me request is only valid with delegated authentication flow.")
        if mailbox is None or not names or names[0] != "users":
            raise bad_request(f"Resource not found for the segment '{route[0] if route else ''}'.")
        rest, rest_names = route[2:], names[2:]
        if not rest:
            _only(method, "GET")
            return Response(200, {"@odata.context": f"{req.base}/$metadata#users/$entity", **mailbox.to_json()})
        if rest_names[0] == "mailfolders":
            if len(rest) == 1:
                _only(method, "GET")
                return self._folder_list(req, mailbox, mailbox.root, "mailFolders")
            folder = self.store.folder(mailbox, rest[1])
            tail, tail_names = rest[2:], rest_names[2:]
            while tail_names[:1] == ["childfolders"] and len(tail) >= 2:
                child = self.store.folder(mailbox, tail[1])
                if child.parent is not folder:
                    raise not_found_item()
                folder, tail, tail_names = child, tail[2:], tail_names[2:]
            if not tail:
                _only(method, "GET")
                return Response(200, {"@odata.context": f"{req.base}/$metadata#users('{mailbox.object_id}')/"
                                      "mailFolders/$entity", **_folder_json(folder, req.query.get("$select"))})
            if tail_names == ["childfolders"]:
                _only(method, "GET")
                return self._folder_list(req, mailbox, folder, f"mailFolders('{folder.id}')/childFolders")
            if tail_names[0] == "messages":
                return await self._messages(req, mailbox, folder, tail[1:])
            raise bad_request(f"Resource not found for the segment '{tail[0]}'.")
        if rest_names[0] == "messages":
            return await self._messages(req, mailbox, None, rest[1:])
        raise bad_request(f"Resource not found for the segment '{rest[0]}'.")

    def _folder_list(self, req: Request, mailbox: Mailbox, parent: Folder, what: str) -> Response:
        hidden = req.query.get("includeHiddenFolders", "").lower() == "true"
        folders = [f for f in parent.children if hidden or not f.hidden]
        top, skip = _int(req.query, "$top", DEFAULT_TOP, 1, 1000), _int(req.query, "$skip", 0, 0, 10**9)
        body: dict[str, Any] = {"@odata.context": f"{req.base}/$metadata#users('{mailbox.object_id}')/{what}",
                                "value": [_folder_json(f, req.query.get("$select")) for f in folders[skip:skip + top]]}
        if skip + top < len(folders):
            extra = "&includeHiddenFolders=true" if hidden else ""
            if "$select" in req.query:
                extra += f"&%24select={quote(req.query['$select'])}"
            body["@odata.nextLink"] = (f"{req.base}/users/{mailbox.object_id}/{what}?%24top={top}&%24skip={skip + top}"
                                       f"{extra}")
        return Response(200, body)

    async def _messages(self, req: Request, mailbox: Mailbox, folder: Folder | None, tail: list[str]) -> Response:
        prefs = preferences(req.headers)
        immutable = prefs.get("idtype", "").lower() == "immutableid"
        applied = ['IdType="ImmutableId"'] if immutable else []
        as_text = prefs.get("outlook.body-content-type", "").lower() == "text"
        if as_text:
            applied.append('outlook.body-content-type="text"')
        if not tail:
            _only(req.method, "GET")
            response = self._message_list(req, mailbox, folder, immutable, as_text)
        elif tail[0].lower() == "delta" and len(tail) == 1:
            if folder is None:
                raise bad_request("Delta on users/{id}/messages is not supported: use a mail folder's messages.",
                                  "ErrorInvalidRequest")
            _only(req.method, "GET")
            size = _int(req.query, "$top", DEFAULT_PAGE, 1, MAX_PAGE)
            if "odata.maxpagesize" in prefs:
                try:
                    size = max(1, min(MAX_PAGE, int(prefs["odata.maxpagesize"])))
                except ValueError:
                    raise bad_request("Invalid odata.maxpagesize preference.") from None
                applied.append(f"odata.maxpagesize={size}")
            response = self._delta(req, mailbox, folder, immutable, size)
        else:
            message = self.store.message(tail[0], mailbox)
            rest = [t.lower() for t in tail[1:]]
            if rest == ["$value"]:
                _only(req.method, "GET")
                response = Response(200, message.raw, content_type="text/plain")
            elif rest == ["move"]:
                _only(req.method, "POST")
                body = _json(req.body)
                destination = body.get("destinationId") if isinstance(body, dict) else None
                if not isinstance(destination, str):
                    raise bad_request("destinationId is required.", "ErrorInvalidRequest")
                self.store.move(message, self.store.folder(mailbox, destination))
                response = self._message(req, mailbox, message, None, immutable, as_text, status=201)
            elif not rest and req.method == "DELETE":
                deleted = mailbox.well_known("deleteditems")
                if message.folder is deleted or deleted is None:
                    self.store.delete(message)
                else:
                    self.store.move(message, deleted)
                response = Response(204)
            elif not rest:
                _only(req.method, "GET")
                select = messages.select_list(req.query.get("$select"))
                response = self._message(req, mailbox, message, select, immutable, as_text)
            else:
                raise bad_request(f"Resource not found for the segment '{tail[1]}'.")
        if applied and response.status < 400:
            response.headers["Preference-Applied"] = ", ".join(applied)
        return response

    def _message(self, req: Request, mailbox: Mailbox, message: Message, select, immutable: bool, as_text: bool,
                 status: int = 200) -> Response:
        shape = f"messages({','.join(select)})" if select else "messages"
        return Response(status, {"@odata.context": f"{req.base}/$metadata#users('{mailbox.object_id}')/{shape}/$entity",
                                 **message.to_json(select, immutable, as_text)})

    def _message_list(self, req: Request, mailbox: Mailbox, folder: Folder | None, immutable: bool,
                      as_text: bool) -> Response:
        for unsupported in ("$filter", "$search", "$expand"):
            if unsupported in req.query:
                raise bad_request(f"{unsupported} is not supported by this emulator.", "ErrorInvalidRequest")
        select = messages.select_list(req.query.get("$select"))
        pool = list(folder.messages.values()) if folder else [m for f in mailbox.folders.values() if f.ipm
                                                               for m in f.messages.values()]
        pool.sort(key=lambda m: (m.received, m.key), reverse=True)
        top, skip = _int(req.query, "$top", DEFAULT_TOP, 1, 1000), _int(req.query, "$skip", 0, 0, 10**9)
        where = f"mailFolders('{folder.id}')/messages" if folder else "messages"
        body: dict[str, Any] = {"@odata.context": f"{req.base}/$metadata#users('{mailbox.object_id}')/{where}",
                                "value": [m.to_json(select, immutable, as_text) for m in pool[skip:skip + top]]}
        if skip + top < len(pool):
            keep = f"&%24select={quote(req.query['$select'])}" if "$select" in req.query else ""
            body["@odata.nextLink"] = f"{req.base}/users/{mailbox.object_id}/{where}?%24top={top}&%24skip={skip + top}{keep}"
        return Response(200, body)

    def _delta(self, req: Request, mailbox: Mailbox, folder: Folder, immutable: bool, size: int) -> Response:
        token = req.query.get("$deltatoken") or req.query.get("$skiptoken")
        if token:
            state = self.deltas.lookup(token)
        else:
            if "$filter" in req.query:
                raise bad_request("$filter is not supported on delta by this emulator.", "ErrorInvalidRequest")
            change_type = req.query.get("changeType")
            types = CHANGE_TYPES
            if change_type:
                types = frozenset(t.strip().lower() for t in change_type.split(","))
                if not types <= CHANGE_TYPES:
                    raise bad_request(f"Invalid changeType '{change_type}'.", "ErrorInvalidRequest")
            state = self.deltas.start(mailbox, folder, messages.select_list(req.query.get("$select")), types)
        return Response(200, self.deltas.page(state, immutable, size, req.base))

    async def _subscriptions(self, req: Request, route: list[str]) -> Response:
        base = req.base
        if len(route) == 1:
            if req.method == "POST":
                immutable = preferences(req.headers).get("idtype", "").lower() == "immutableid"
                sub = await self.subscriptions.create(_json(req.body), immutable)
                self.counts["subscriptions_created"] += 1
                return Response(201, {"@odata.context": f"{base}/$metadata#subscriptions/$entity", **sub.to_json()})
            _only(req.method, "GET")
            offset = _int(req.query, "$skiptoken", 0, 0, 10**9)
            page, rest = self.subscriptions.page(offset)
            body: dict[str, Any] = {"@odata.context": f"{base}/$metadata#subscriptions",
                                    "value": [s.to_json() for s in page]}
            if rest is not None:
                body["@odata.nextLink"] = f"{base}/subscriptions?$skiptoken={rest}"
            return Response(200, body)
        subscription_id = route[1]
        if len(route) == 3 and route[2].lower() == "reauthorize":
            _only(req.method, "POST")
            self.subscriptions.reauthorize(subscription_id)
            return Response(204)
        if len(route) != 2:
            raise bad_request(f"Resource not found for the segment '{route[2]}'.")
        if req.method == "GET":
            sub = self.subscriptions.get(subscription_id)
        elif req.method == "PATCH":
            sub = await self.subscriptions.update(subscription_id, _json(req.body))
        elif req.method == "DELETE":
            self.subscriptions.delete(subscription_id)
            return Response(204)
        else:
            raise GraphError(405, "BadRequest", f"{req.method} is not allowed on a subscription.")
        return Response(200, {"@odata.context": f"{base}/$metadata#subscriptions/$entity", **sub.to_json()})

    # -- $batch ----------------------------------------------------------------------------
    async def batch(self, req: Request) -> Response:
        self.counts["batches"] += 1
        body = _json(req.body)
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise bad_request("Invalid batch payload format.")
        if len(requests) > MAX_BATCH:
            raise bad_request(f"Number of requests in the batch exceeds the limit of {MAX_BATCH}.")
        seen: list[str] = []
        for item in requests:
            if not isinstance(item, dict) or not isinstance(item.get("url"), str) or not item.get("method"):
                raise bad_request("Invalid batch payload format.")
            item_id = str(item.get("id", ""))
            if not item_id or item_id in seen:
                raise bad_request("Batch request ids must be unique and not empty.")
            depends = item.get("dependsOn") or []
            if not isinstance(depends, list) or any(str(d) not in seen for d in depends):
                raise bad_request("dependsOn must name requests earlier in the batch.")
            if urlsplit(item["url"]).scheme:
                raise bad_request("Batch request URLs must be relative to the version, e.g. /users/{id}.")
            seen.append(item_id)
        gate = asyncio.Semaphore(BATCH_PARALLEL)
        done = {str(item["id"]): asyncio.Event() for item in requests}
        results: dict[str, Response] = {}
        order: list[str] = []

        async def run(item: dict) -> None:
            item_id = str(item["id"])
            try:
                for dependency in item.get("dependsOn") or []:
                    await done[str(dependency)].wait()
                    if results[str(dependency)].status >= 400:
                        results[item_id] = Response(424, GraphError(424, "FailedDependency", "Failed dependency.")
                                                    .body())
                        return
                async with gate:
                    results[item_id] = await self.handle(self._sub_request(req, item), in_batch=True)
            finally:
                order.append(item_id)
                done[item_id].set()

        await asyncio.gather(*(run(item) for item in requests))
        return Response(200, {"responses": [_batch_item(i, results[i]) for i in order]})

    def _sub_request(self, outer: Request, item: dict) -> Request:
        parts = urlsplit(item["url"])
        path = parts.path
        if path.lstrip("/").lower().startswith("v1.0/"):
            path = path.lstrip("/")[len("v1.0"):]
        headers = {k.lower(): v for k, v in outer.headers.items() if k.lower() in ("authorization", "prefer",
                                                                                  "client-request-id")}
        own = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
        if "prefer" in own and "prefer" in headers:
            own["prefer"] = f"{headers['prefer']}, {own['prefer']}"
        headers.update(own)
        body = item.get("body")
        if body is None:
            raw = b""
        elif isinstance(body, str) and "json" not in headers.get("content-type", "application/json"):
            raw = base64.b64decode(body)
        else:
            raw = json.dumps(body).encode()
        return Request(str(item["method"]).upper(), path, dict(parse_qsl(parts.query, keep_blank_values=True)),
                       headers, raw, outer.base)


def _batch_item(item_id: str, response: Response) -> dict[str, Any]:
    headers = {k: v for k, v in response.headers.items() if k not in ("request-id", "client-request-id")}
    out: dict[str, Any] = {"id": item_id, "status": response.status}
    if response.body is not None:
        headers["Content-Type"] = response.content_type
        out["body"] = (response.body if isinstance(response.body, dict)
                       else base64.b64encode(response.body).decode())  # a non-JSON body is base64, as Graph sends it
    out["headers"] = headers
    return out


def _folder_json(folder: Folder, select: str | None) -> dict[str, Any]:
    """A mailFolder, only the id and the properties ``$select`` names if it names any (an
    unknown name, wellKnownName included, which v1.0 does not have, is Graph's 400)."""
    full = folder.to_json()
    if not select or not select.strip():
        return full
    canonical = {name.lower(): name for name in full}
    out = {"id": full["id"]}
    for part in select.split(","):
        name = canonical.get(part.strip().lower())
        if name is None:
            raise GraphError(400, "RequestBroker--ParseUri",
                             f"Could not find a property named '{part.strip()}' on type 'microsoft.graph.mailFolder'.")
        out[name] = full[name]
    return out


def _unavailable(seconds: float) -> GraphError:
    return GraphError(503, "serviceNotAvailable", "The service is temporarily unavailable. Please retry later.",
                      {"Retry-After": retry_after(seconds)})


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise GraphError(405, "BadRequest", f"The HTTP method '{method}' is not allowed here.")


def _int(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in query:
        return default
    try:
        value = int(query[name])
    except ValueError:
        raise bad_request(f"Invalid value '{query[name]}' for {name}.") from None
    return max(low, min(high, value))


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise bad_request("Unable to read JSON request payload. Please ensure Content-Type header is set and "
                          "payload is of valid JSON format.") from None
