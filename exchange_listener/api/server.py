"""The HTTP API's application: routes, the guard every request passes, and serving it.

Routes and what they answer are described by ``openapi.json`` (served at /v1/openapi.json) and
docs/api.md. The product's rules live where the CLI uses them: sends are checked by
``SendRegistry.draft``/``validate`` and stored by ``record_many`` (all or nothing for a request),
enrollments are read and resumed by ``EnrollmentStore``, transitions are the stream's entries.
Redis calls are blocking redis-py calls, run on a thread pool so the event loop keeps serving;
every Redis failure is a 503 problem, every other failure a 500 problem, never a traceback.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib.resources
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import redis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from exchange_listener.api import presence, transitions
from exchange_listener.api.access import RateLimiter, Tokens
from exchange_listener.api.problems import Problem, from_http_error
from exchange_listener.core import config, logs, redis_conn
from exchange_listener.mail.message_ids import normalize
from workers.state.enrollments import STREAM_MAXLEN, EnrollmentStore
from workers.state.sends import BATCH_LIMIT, BadSend, SendDraft, SendRegistry

log = logs.get_logger(component="api")
T = TypeVar("T")

PUBLIC = frozenset({"/healthz"})  # answered without a token: load balancers probe it
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
MAX_WAIT = 30.0  # seconds a long-poll may wait
KEEPALIVE = 15.0  # seconds between comments on an idle event stream
RESUME_FIELDS = ("by", "force")

REQUESTS = Counter("el_api_requests_total", "HTTP API requests answered", ["route", "method", "status"])
LATENCY = Histogram("el_api_request_seconds", "HTTP API request time (an event stream: until it ends)", ["route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

SETTINGS = web.AppKey("settings", config.Settings)


class State:
    """What the handlers share: Redis clients, stores, the token check, the follower."""

    def __init__(self, settings: config.Settings):
        self.conn = redis_conn.connect(settings.redis_url)
        self.sends = SendRegistry(self.conn, retention_days=settings.retention_days)
        self.enrollments = EnrollmentStore(self.conn, retention_days=settings.retention_days,
                                           pause_days=settings.pause_days)
        self.tokens = Tokens(settings.api_tokens)
        self.limiter = RateLimiter(settings.api_rate_per_second)
        # a thread per Redis call in flight (requests wait for a free one beyond that)
        self.executor = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="api-redis")
        self.follower = transitions.Follower(
            redis_conn.connect(settings.redis_url, socket_timeout=transitions.BLOCK_MS / 1000 + 10))
        self.openapi = importlib.resources.files("exchange_listener.api").joinpath("openapi.json").read_bytes()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))


STATE = web.AppKey("state", State)


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def guard(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Authentication, the rate limit, problems for every error, a log line and metrics."""
    started = time.monotonic()
    state = request.app[STATE]
    route = _route(request)
    try:
        if request.path not in PUBLIC:
            who = state.tokens.check(request.headers.get("Authorization"))
            if who is None:
                raise Problem(401, "unauthorized", "send Authorization: Bearer TOKEN with a token whose SHA-256 "
                              "hash is in api_tokens", headers={"WWW-Authenticate": 'Bearer realm="exchange-listener"'})
            wait = state.limiter.take(who)
            if wait:
                raise Problem(429, "rate-limited", f"more than {state.limiter.rate:g} requests a second for this "
                              "token; retry after the time in Retry-After",
                              headers={"Retry-After": RateLimiter.retry_after(wait)})
        response = await handler(request)
    except Problem as problem:
        response = problem.response()
    except web.HTTPException as exc:
        response = from_http_error(exc).response()
    except redis.exceptions.RedisError as exc:
        log.warning("Redis failed a request", route=route, error=type(exc).__name__)
        response = Problem(503, "redis-unavailable", "Redis, where the state lives, cannot be reached or refused "
                           "the request; retry later", headers={"Retry-After": "5"}).response()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request failed", route=route, method=request.method)
        response = Problem(500, "internal", "the server failed on this request (logged)").response()
    REQUESTS.labels(route, request.method, str(response.status)).inc()
    LATENCY.labels(route).observe(time.monotonic() - started)
    log.info("request", method=request.method, route=route, status=response.status,
             ms=round((time.monotonic() - started) * 1000, 1))
    return response


async def _json(request: web.Request, *, optional: bool = False) -> Any:
    """The request body as JSON: 413 beyond api_max_body_bytes, 400 when it is not JSON."""
    limit = request.app[SETTINGS].api_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "body-too-large", f"the request body is {request.content_length} bytes; "
                      f"api_max_body_bytes allows {limit}")
    raw = await request.read()  # aiohttp stops at client_max_size (= the limit) with a 413
    if optional and not raw.strip():
        return None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise Problem(400, "invalid-json", f"the body is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise Problem(400, "invalid-json", f"the body is not valid JSON: {exc}") from None


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


# -- sends -----------------------------------------------------------------------------------------
async def record_sends(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _json(request)
    many = isinstance(body, list)
    items = body if many else [body]
    if many and not items:
        raise Problem(400, "invalid-field", "an empty list records nothing: send one send or a list of them")
    if len(items) > BATCH_LIMIT:
        raise Problem(400, "too-many-sends", f"the body is a list of {len(items)} sends; at most {BATCH_LIMIT} a "
                      "request: split it (nothing was recorded)")
    drafts = []
    for index, item in enumerate(items):  # every item checked before any is stored
        try:
            drafts.append(state.sends.draft(item))
        except BadSend as exc:
            raise Problem(400, "invalid-field", str(exc), field=exc.field or None,
                          index=index if many else None) from None
    results = await state.run(state.sends.record_many, drafts, all_or_nothing=True)
    for index, result in enumerate(results):
        if isinstance(result, ValueError):
            field, detail = await state.run(_conflict, state.sends, items[index], drafts, index, result)
            raise Problem(400, "send-conflict", f"{detail}; nothing was recorded", field=field,
                          index=index if many else None)
    return _ok({"recorded": len(results)}, 201)


def _conflict(sends: SendRegistry, item: dict[str, Any], drafts: list[SendDraft], index: int,
              error: ValueError) -> tuple[str, str]:
    """Which field of a refused send (``message_id`` or ``message_ids``) holds an id another
    enrollment owns, and a detail naming the id and that enrollment. The owner is an earlier
    send of the same request, or else the stored send (nothing of the request was stored)."""
    draft = drafts[index]
    given = item.get("message_id")
    for mid in draft.message_ids:
        field = "message_id" if isinstance(given, str) and normalize(given) == mid else "message_ids"
        owner = next((d.enrollment_id for d in drafts[:index] if mid in d.message_ids), None)
        where = " (an earlier send of this request)"
        if owner is None:
            stored = sends.get(mid)
            owner, where = (stored.enrollment_id if stored is not None else None), ""
        if owner is not None and owner != draft.enrollment_id:
            return field, f"{field}: {mid} already belongs to enrollment {owner!r}{where}"
    field = "message_id" if "message_id" in item else "message_ids"  # changed meanwhile: say what record said
    return field, f"{field}: {error}"


async def show_send(request: web.Request) -> web.Response:
    state = request.app[STATE]
    message_id = request.match_info["message_id"]
    if not normalize(message_id):
        raise Problem(400, "invalid-field", f"not a Message-ID: {message_id!r}", field="message_id")
    found = await state.run(state.sends.get, message_id)
    if found is None:
        raise Problem(404, "not-found", f"no recorded send has Message-ID {normalize(message_id)}")
    return _ok(found.as_dict())


# -- enrollments -----------------------------------------------------------------------------------
async def show_enrollment(request: web.Request) -> web.Response:
    state = request.app[STATE]
    enrollment_id = request.match_info["enrollment_id"]

    def read() -> dict[str, Any] | None:
        found = state.enrollments.get(enrollment_id)
        if found is not None:
            found["history"] = state.enrollments.history(enrollment_id)
        return found

    found = await state.run(read)
    if found is None:
        raise Problem(404, "not-found", f"unknown enrollment {enrollment_id!r}")
    return _ok(found)


async def resume_enrollment(request: web.Request) -> web.Response:
    state = request.app[STATE]
    enrollment_id = request.match_info["enrollment_id"]
    body = await _json(request, optional=True) or {}
    if not isinstance(body, dict):
        raise Problem(400, "invalid-field", "the body must be a JSON object (or empty)")
    unknown = sorted(set(body) - set(RESUME_FIELDS))
    if unknown:
        raise Problem(400, "invalid-field", f"unknown field {unknown[0]!r} (fields: by, force)", field=unknown[0])
    by, force = body.get("by", "api"), body.get("force", False)
    if not isinstance(by, str) or not by.strip():
        raise Problem(400, "invalid-field", "by: must be a non-empty string", field="by")
    if not isinstance(force, bool):
        raise Problem(400, "invalid-field", "force: must be true or false", field="force")

    def resume() -> tuple[dict[str, Any] | None, bool]:
        if state.enrollments.get(enrollment_id) is None:
            return None, False
        done = state.enrollments.resume(enrollment_id, by, force=force) is not None
        return state.enrollments.get(enrollment_id), done

    found, done = await state.run(resume)
    if found is None:
        raise Problem(404, "not-found", f"unknown enrollment {enrollment_id!r}")
    if not done:
        why = ("it is stopped ({}); send {{\"force\": true}} to reopen it".format(found["reason"] or "no reason")
               if found["status"] == "stopped" else "it is already active: nothing to resume")
        raise Problem(409, "not-resumable", f"enrollment {enrollment_id!r} was not resumed: {why}",
                      enrollment_status=found["status"])
    return _ok(found)


# -- transitions -----------------------------------------------------------------------------------
def _query(request: web.Request) -> tuple[str | None, int, float]:
    after = request.query.get("after")
    if after is not None and transitions.parse_cursor(after) is None:
        raise Problem(400, "invalid-parameter", "after: must be a cursor from an earlier answer (<ms>-<seq>)",
                      field="after")
    try:
        limit = int(request.query.get("limit", DEFAULT_LIMIT))
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError
    except ValueError:
        raise Problem(400, "invalid-parameter", f"limit: must be a whole number from 1 to {MAX_LIMIT}",
                      field="limit") from None
    try:
        wait = float(request.query.get("wait", 0))
        if not 0 <= wait < float("inf"):
            raise ValueError
    except ValueError:
        raise Problem(400, "invalid-parameter", "wait: must be a number of seconds, 0 or more", field="wait") from None
    return transitions.parse_cursor(after) if after is not None else None, limit, min(wait, MAX_WAIT)


def _cursor_problem(exc: transitions.CursorExpired | transitions.CursorAhead, field: str) -> Problem:
    """410 for a cursor behind the stream's trim, 400 for one beyond the stream."""
    if isinstance(exc, transitions.CursorAhead):
        return Problem(400, "invalid-parameter", f"{field}: {exc.cursor} is beyond the newest transition's cursor "
                       f"({exc.newest}): it is not a cursor from this stream", field=field)
    kept = f"the oldest entry kept is {exc.oldest}" if exc.oldest else "no entry is kept (no oldest_cursor)"
    return Problem(410, "cursor-expired", f"{field}: {exc.cursor} fell behind the stream's trim (it keeps ~{STREAM_MAXLEN:,}): "
                   f"transitions after it may be gone; {kept}. Pass after={exc.resume_after} (or no cursor) to "
                   "continue from the oldest kept, and reconcile from the enrollments' state", field=field,
                   oldest_cursor=exc.oldest, resume_after=exc.resume_after)


async def _page(state: State, after: str | None, limit: int, field: str) -> tuple[list[dict[str, Any]], str]:
    try:
        return await state.run(transitions.page, state.conn, after, limit)
    except (transitions.CursorExpired, transitions.CursorAhead) as exc:
        raise _cursor_problem(exc, field) from None


async def list_transitions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    after, limit, wait = _query(request)
    deadline = time.monotonic() + wait
    while True:
        generation = state.follower.generation
        items, following = await _page(state, after, limit, "after")
        remaining = deadline - time.monotonic()
        if items or remaining <= 0 or state.follower.closing:
            return _ok({"transitions": items, "next": following})
        after = following  # entries skipped as unreadable are not read again
        await state.follower.wait(generation, remaining)


async def stream_transitions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    after, limit, _ = _query(request)
    last_event = request.headers.get("Last-Event-ID")
    field = "after"
    if last_event:
        after, field = transitions.parse_cursor(last_event.strip()), "Last-Event-ID"
        if after is None:
            raise Problem(400, "invalid-parameter", "Last-Event-ID: must be an event id from this stream",
                          field="Last-Event-ID")
    generation = state.follower.generation
    items, after = await _page(state, after, limit, field)  # a Redis failure or a bad cursor: a problem still
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    try:
        while not state.follower.closing:
            for item in items:
                await response.write(transitions.event(item))
            if not items and not await state.follower.wait(generation, KEEPALIVE):
                await response.write(b": keep-alive\n\n")
            generation = state.follower.generation
            items, after = await _page(state, after, limit, field)
    except Problem as problem:  # trimmed past this client while it was behind: it must know
        await response.write(f"event: error\ndata: {json.dumps(problem.document())}\n\n".encode())
    except redis.exceptions.RedisError as exc:
        log.warning("event stream ended: Redis failed", error=type(exc).__name__)
        await response.write(b"event: error\ndata: {\"detail\": \"Redis cannot be reached; reconnect later\"}\n\n")
    except ConnectionResetError:
        pass  # the client went away
    return response


# -- operations ------------------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        await state.run(state.conn.ping)
    except redis.exceptions.RedisError as exc:
        return _ok({"status": "unavailable", "redis": f"unreachable ({type(exc).__name__})"}, 503)
    return _ok({"status": "ok", "redis": "ok"})


async def metrics(_request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].openapi, content_type="application/json")


# -- the application -------------------------------------------------------------------------------
def create_app(settings: config.Settings) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=settings.api_max_body_bytes)
    app[SETTINGS] = settings
    app[STATE] = State(settings)
    app.router.add_post("/v1/sends", record_sends)
    app.router.add_get("/v1/sends/{message_id:.+}", show_send, allow_head=False)
    app.router.add_get("/v1/enrollments/{enrollment_id}", show_enrollment, allow_head=False)
    app.router.add_post("/v1/enrollments/{enrollment_id}/resume", resume_enrollment)
    app.router.add_get("/v1/transitions", list_transitions, allow_head=False)
    app.router.add_get("/v1/transitions/stream", stream_transitions, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/v1/openapi.json", openapi, allow_head=False)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_release_waiters)
    return app


async def _release_waiters(app: web.Application) -> None:
    """Long-polls and event streams end at once when the server stops (it waits for requests)."""
    await app[STATE].follower.release()


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The follower and the heartbeat run while the app serves."""
    state, settings = app[STATE], app[SETTINGS]
    host, _, port = settings.api_listen.rpartition(":")
    beat = presence.Presence(state.conn, presence.process_id(int(port)), f"http://{host}:{port}",
                             prune_after=10 * settings.lease_seconds)
    tasks = [asyncio.create_task(state.follower.run()),
             asyncio.create_task(_heartbeat(state, beat, settings.lease_seconds / 3))]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(redis.exceptions.RedisError):
        await state.run(beat.leave)
    state.follower.close()
    state.executor.shutdown(wait=False, cancel_futures=True)


async def _heartbeat(state: State, beat: presence.Presence, interval: float) -> None:
    failing = False
    while True:
        try:
            await state.run(beat.beat)
            failing = False
        except redis.exceptions.RedisError as exc:
            if not failing:
                log.warning("cannot write the API heartbeat; retrying", error=type(exc).__name__)
            failing = True
        await asyncio.sleep(interval)


async def serve(settings: config.Settings, ready: Callable[[str], None]) -> None:
    """Serve on ``api_listen`` until SIGTERM or SIGINT; ``ready(base_url)`` once listening."""
    host, _, port = settings.api_listen.rpartition(":")
    if not settings.api_tokens:
        log.warning("api_tokens is empty: every request but /healthz gets 401")
    runner = web.AppRunner(create_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]"), int(port)).start()
        ready(f"http://{host}:{port}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping the API")
    finally:
        await runner.cleanup()
