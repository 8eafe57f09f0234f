"""One snapshot of the whole system's health, read from Redis, for ``exchange-listener status``.

Everything comes from what the parts already publish, plus what the Redis server itself is
set to keep (``exchange_listener.core.redis_conn.durability``): listener liveness and group activity
(``exchange_listener.listener.leases``), the HTTP API processes' heartbeats
(``exchange_listener.api.presence``), the watched set (``exchange_listener.listener.mailboxes``), RQ's queue,
registries and worker records, the transition stream (``workers.state.enrollments``) and the
notification outbox (``workers.sinks.webhooks``). Nothing here writes.

``snapshot(conn, queue_name)`` gathers the facts; ``problems(snap, limits)`` judges them, so a
test or a monitor can apply its own limits to the same facts.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from typing import Any, cast

import redis
from rq import Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from exchange_listener.core import keys, redis_conn
from exchange_listener.core.config import default
from exchange_listener.listener import mailboxes
from exchange_listener.queueing import make_queue
from workers.state.transitions import STREAM_FIELD, Transition

STOPS_WINDOW = 3600.0


@dataclasses.dataclass(frozen=True)
class Limits:
    """When a fact becomes a problem (seconds)."""

    stale_listener: float = float(default("lease_seconds"))  # a listener's heartbeat older than this: it is stale
    stale_api: float = float(default("lease_seconds"))  # an API process's heartbeat older than this: it is stale
    # a group's stream silent (no heartbeat, no event) this long: three missed heartbeats and some slack
    silent_group: float = 3 * float(default("heartbeat_seconds")) + 15
    stuck_queue: float = 120.0  # oldest queued job this old and no worker busy: the queue is stuck
    allow_volatile_redis: bool = False  # a Redis that can evict our keys or persists nothing is accepted
    mailbox_failure_grace: float = float(default("mailbox_failure_grace_seconds"))  # a mailbox that cannot be subscribed this long is a problem


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 1)


def _until(now: float, then: float | None) -> float | None:
    return None if not then else round(max(0.0, then - now), 1)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float | None:  # None or a non-number: None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _listeners(conn: redis.Redis, now: float) -> list[dict]:
    found = []
    # withscores: (member, score) pairs (redis-py's type covers every form of ZRANGE's reply)
    for raw_id, score in cast(list[tuple[bytes | str, float]], conn.zrange(keys.LISTENERS, 0, -1, withscores=True)):
        listener_id = _text(raw_id)
        info = {_text(k): _text(v) for k, v in conn.hgetall(keys.listener(listener_id)).items()}
        try:
            groups = json.loads(info.get("groups") or "[]")
        except ValueError:
            groups = []
        started = _number(info.get("started_at"))
        try:
            graph = json.loads(info.get("graph") or "null")
        except ValueError:
            graph = None
        try:
            imap = json.loads(info.get("imap") or "null")
        except ValueError:
            imap = None
        try:
            throttling = json.loads(info.get("throttling") or "null")
        except ValueError:
            throttling = None
        found.append({
            "id": listener_id,
            "source": info.get("source") or "ews",
            "host": info.get("host"),
            "pid": int(info["pid"]) if info.get("pid", "").isdigit() else None,
            "last_heartbeat_age_s": _age(now, score),
            "started_age_s": _age(now, started),
            "mailboxes": int(info.get("mailboxes") or 0),
            "groups": [{
                "group": g.get("group"),
                "anchor": g.get("anchor"),
                "mailboxes": g.get("mailboxes"),
                "connected": bool(g.get("connected")),
                # never active yet: silent since the listener started
                "last_activity_age_s": _age(now, g.get("last_activity") or started),
                "failing_count": int(g.get("failing_count") or 0),
                "failing": [{"mailbox": f.get("mailbox"), "error": f.get("error"),
                             "failing_for_s": _age(now, f.get("since")), "retry_in_s": _until(now, f.get("retry_at"))}
                            for f in g.get("failing") or () if isinstance(f, dict)],
            } for g in groups if isinstance(g, dict)],
            **({"graph": _graph(graph, now)} if isinstance(graph, dict) else {}),
            **({"imap": _imap(imap, now)} if isinstance(imap, dict) else {}),
            **({"throttling": _throttling(throttling)} if isinstance(throttling, dict) else {}),
        })
    return found


def _throttling(info: dict) -> dict:
    """An EWS listener's distance from Exchange's default throttling policy: streaming
    connections per budget (the impersonated mailbox), subscriptions per mailbox, group size,
    each used / allowed."""
    fields = ("streaming_connections", "connections_per_budget_max", "connections_per_budget_allowed",
              "subscriptions", "subscriptions_per_mailbox_max", "subscriptions_per_mailbox_allowed",
              "group_size_max", "group_size_allowed")
    return {name: int(_number(info.get(name)) or 0) for name in fields}


def _imap(info: dict, now: float) -> dict:
    """An IMAP listener's IDLE connections (one per watched folder), as ``status`` shows them."""
    return {
        "folders": int(info.get("folders") or 0),
        "connected": int(info.get("connected") or 0),
        "last_activity_age_s": _age(now, _number(info.get("last_activity_at"))),
        "failing_count": int(info.get("failing_count") or 0),
        "failing": [{"mailbox": f.get("mailbox"), "folder": f.get("folder"), "error": f.get("error"),
                     "failing_for_s": _age(now, f.get("since"))}
                    for f in info.get("failing") or () if isinstance(f, dict)],
        # other folders the sweep cannot read (skipped; mail filed there is not seen)
        "sweep_unreadable_count": int(info.get("sweep_unreadable_count") or 0),
        "sweep_unreadable": [f for f in info.get("sweep_unreadable") or () if isinstance(f, dict)],
    }


def _graph(info: dict, now: float) -> dict:
    """A Graph listener's receiver and subscriptions, as ``status`` shows them."""
    return {
        "mode": info.get("mode"),
        "receiver": info.get("receiver"),
        "subscriptions": int(info.get("subscriptions") or 0),
        "next_expiry_in_s": _number(info.get("next_expiry_in_s")),
        "notifications": int(info.get("notifications") or 0),
        "last_notification_age_s": _age(now, _number(info.get("last_notification_at"))),
        "failing_count": int(info.get("failing_count") or 0),
        "failing": [{"mailbox": f.get("mailbox"), "error": f.get("error"), "failing_for_s": _age(now, f.get("since"))}
                    for f in info.get("failing") or () if isinstance(f, dict)],
    }


def _api_processes(conn: redis.Redis, now: float) -> list[dict]:
    found = []
    for raw_id, raw in conn.hgetall(keys.API_PROCESSES).items():
        try:
            info = json.loads(raw)
            info = info if isinstance(info, dict) else {}
        except ValueError:
            info = {}
        found.append({
            "id": _text(raw_id),
            "address": info.get("address"),
            "host": info.get("host"),
            "pid": info.get("pid") if isinstance(info.get("pid"), int) else None,
            "last_heartbeat_age_s": _age(now, _number(info.get("heartbeat_at"))),
            "started_age_s": _age(now, _number(info.get("started_at"))),
        })
    return sorted(found, key=lambda p: p["id"])


def _leases(conn: redis.Redis, watched: list[str]) -> dict[str, str | None]:
    if not watched:
        return {}
    values = conn.mget([keys.lease(m) for m in watched])
    return {m: (_text(v) if v is not None else None) for m, v in zip(watched, values)}


def _queue(conn: redis.Redis, queue_name: str, now: float) -> tuple[dict, list[dict]]:
    queue = make_queue(conn, queue_name)
    oldest_age = None
    for job_id in queue.get_job_ids(0, 5):  # the head; a job whose data expired is skipped
        job = Job.fetch_many([job_id], connection=conn, serializer=JSONSerializer)[0]
        if job is not None and job.enqueued_at is not None:
            oldest_age = _age(now, job.enqueued_at.timestamp())
            break
    facts = {
        "name": queue_name,
        "depth": queue.count,
        "oldest_job_age_s": oldest_age,
        "running": StartedJobRegistry(queue=queue).count,
        "scheduled_retries": ScheduledJobRegistry(queue=queue).count,
        "failed": FailedJobRegistry(queue=queue).count,
    }
    workers: list[dict[str, Any]] = []
    for worker in Worker.all(queue=queue, serializer=JSONSerializer):
        workers.append({
            "name": worker.name,
            "hostname": worker.hostname,
            "pid": worker.pid,
            "state": getattr(worker.get_state(), "value", None) or str(worker.get_state()),
            "current_job": worker.get_current_job_id(),
            "last_heartbeat_age_s": _age(now, worker.last_heartbeat.timestamp()) if worker.last_heartbeat else None,
            "successful_jobs": worker.successful_job_count,
            "failed_jobs": worker.failed_job_count,
        })
    workers.sort(key=lambda w: w["name"])
    return facts, workers


def _transitions(conn: redis.Redis, now: float, window: float = STOPS_WINDOW) -> dict:
    """Stops and pauses in the last ``window`` seconds, from the transition stream (read in pages)."""
    stops: dict[str, int] = {}
    paused = 0
    start = f"{int((now - window) * 1000)}-0"
    while True:
        page = conn.xrange(keys.TRANSITIONS, min=start, max="+", count=1000) or []
        for _entry_id, fields in page:
            raw = (fields.get(STREAM_FIELD.encode()) or fields.get(STREAM_FIELD)) if fields else None
            try:
                transition = Transition.from_json(raw or "")
            except (AttributeError, TypeError, ValueError):  # not a transition: nothing to count
                continue
            if transition.status == "stopped":
                reason = transition.reason or "unknown"
                stops[reason] = stops.get(reason, 0) + 1
            elif transition.status == "paused":
                paused += 1
        if len(page) < 1000:
            break
        start = "(" + _text(page[-1][0])
    return {"window_s": window, "stops": sum(stops.values()), "stops_by_reason": stops, "pauses": paused}


def snapshot(conn: redis.Redis, queue_name: str, now: float | None = None) -> dict:
    """Every fact ``status`` shows, as one JSON-safe dict."""
    now = time.time() if now is None else now
    watched = sorted(mailboxes.list_all(conn))
    holders = _leases(conn, watched)
    queue, workers = _queue(conn, queue_name, now)
    return {
        "checked_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
        "listeners": _listeners(conn, now),
        "api": _api_processes(conn, now),
        "mailboxes": {
            "watched": len(watched),
            "held": sum(1 for h in holders.values() if h),
            "unowned": [m for m, h in holders.items() if not h],
        },
        "queue": queue,
        "workers": workers,
        "last_hour": _transitions(conn, now),
        "notifications_failed": conn.hlen(keys.OUTBOX_FAILED),
        "redis": redis_conn.durability(conn),
    }


def problems(snap: dict, limits: Limits = Limits()) -> list[str]:
    """What is wrong, one sentence each; empty when healthy."""
    found = []
    if not limits.allow_volatile_redis:
        found += snap["redis"]["problems"]
    unowned = snap["mailboxes"]["unowned"]
    if unowned:
        shown = ", ".join(unowned[:5]) + (f" and {len(unowned) - 5} more" if len(unowned) > 5 else "")
        found.append(f"{len(unowned)} watched mailbox(es) held by no listener: {shown}")
    for listener in snap["listeners"]:
        age = listener["last_heartbeat_age_s"]
        if age is not None and age > limits.stale_listener:
            found.append(f"listener {listener['id']} is stale: last heartbeat {age:.0f} s ago")
            continue
        for group in listener["groups"]:
            for failing in group["failing"]:
                if (failing["failing_for_s"] or 0) > limits.mailbox_failure_grace:
                    found.append(f"mailbox {failing['mailbox']} cannot be subscribed for {failing['failing_for_s']:.0f} s "
                                 f"(listener {listener['id']}): {failing['error']}")
            silent = group["last_activity_age_s"]  # (a Graph listener has no groups)
            if not group["connected"] and (silent is None or silent > limits.silent_group):
                found.append(f"listener {listener['id']} group {group['group']} is not connected")
            elif silent is not None and silent > limits.silent_group:
                found.append(f"listener {listener['id']} group {group['group']} silent for {silent:.0f} s")
        for failing in listener.get("graph", {}).get("failing", ()):
            if (failing["failing_for_s"] or 0) > limits.mailbox_failure_grace:
                found.append(f"mailbox {failing['mailbox']} cannot be subscribed through Graph for "
                             f"{failing['failing_for_s']:.0f} s (listener {listener['id']}): {failing['error']}")
        for failing in listener.get("imap", {}).get("failing", ()):
            if (failing["failing_for_s"] or 0) > limits.mailbox_failure_grace:
                found.append(f"mailbox {failing['mailbox']} folder {failing['folder']} cannot be watched through IMAP "
                             f"for {failing['failing_for_s']:.0f} s (listener {listener['id']}): {failing['error']}")
    for process in snap.get("api", ()):
        age = process["last_heartbeat_age_s"]
        if age is None or age > limits.stale_api:
            shown = "never" if age is None else f"{age:.0f} s ago"
            found.append(f"API process {process['id']} ({process['address']}) is stale: last heartbeat {shown}")
    queue = snap["queue"]
    busy = [w for w in snap["workers"] if w["state"] == "busy"]
    if queue["depth"] and not snap["workers"]:
        found.append(f"{queue['depth']} job(s) queued and no worker running")
    elif queue["depth"] and not busy and (queue["oldest_job_age_s"] or 0) > limits.stuck_queue:
        found.append(f"queue stuck: oldest job waited {queue['oldest_job_age_s']:.0f} s and no worker is busy")
    return found
