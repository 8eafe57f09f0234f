"""``exchange-listener status [--json]``: is every mailbox streamed, is the queue moving?

Exit status, so a monitor can call it: 0 healthy; 1 unhealthy (a watched mailbox held by no
listener, a stale listener, API process or silent stream, a stuck queue, jobs waiting with no worker, a Redis
that may evict our keys or persists nothing, unless ``allow_volatile_redis = true``);
3 Redis unreachable; 2 configuration error.
"""
from __future__ import annotations

import argparse
import json

from exchange_listener import health
from exchange_listener.commands import add_config_argument, load_settings
from exchange_listener.core import redis_conn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object (the facts, the problems, healthy)")
    parser.add_argument("--stale-listener", type=float, metavar="S",
                        help="a listener whose last heartbeat is older is stale (default: lease_seconds)")
    parser.add_argument("--silent-group", type=float, metavar="S",
                        help="a stream silent this long is a problem (default: 3 x heartbeat_seconds + 15)")
    parser.add_argument("--stuck-queue", type=float, metavar="S", default=health.Limits.stuck_queue,
                        help="oldest queued job this old with no busy worker: stuck (default: %(default)g)")


def _age(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f}s ago" if value >= 1 else "now"
    if value < 7200:
        return f"{value / 60:.0f}m ago"
    return f"{value / 3600:.1f}h ago"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _redis_lines(found: dict) -> list[str]:
    def shown(value: object) -> str:
        return "unknown" if value is None else repr(value) if value == "" else str(value)

    aof = shown(found["appendonly"]) + (f" ({found['appendfsync']})" if found["appendfsync"] else "")
    lines = [(f"Redis {found['server']}: appendonly {aof}, save {shown(found['save'])}, "
              f"maxmemory-policy {shown(found['maxmemory_policy'])}")]
    if found.get("allow_volatile_redis"):  # otherwise they are listed among the problems above
        lines += [f"  accepted by allow_volatile_redis: {problem}" for problem in found["problems"]]
    lines += [f"  note: {note}" for note in found["notes"]]
    return lines


def render(snap: dict, found: list[str]) -> str:
    lines = [f"exchange-listener status at {snap['checked_at']}: {'HEALTHY' if not found else 'UNHEALTHY'}"]
    for problem in found:
        lines.append(f"  ! {problem}")
    lines.append("")
    listeners = snap["listeners"]
    lines.append(f"Listeners ({len(listeners)})")
    if listeners:
        rows = [["LISTENER", "SOURCE", "MAILBOXES", "HEARTBEAT",
                 "GROUPS (mailboxes, connected, last activity) / GRAPH (mode, subscriptions, last notification)"]]
        for item in listeners:
            graph, imap = item.get("graph"), item.get("imap")
            if imap is not None:
                detail = (f"IMAP: {imap['connected']}/{imap['folders']} folders in IDLE, "
                          f"last new mail {_age(imap['last_activity_age_s'])}"
                          + (f", {imap['sweep_unreadable_count']} other folder(s) unreadable"
                             if imap.get("sweep_unreadable_count") else ""))
            elif graph is not None:
                detail = (f"{graph['mode']}, {graph['subscriptions']} subscriptions, "
                          f"last notification {_age(graph['last_notification_age_s'])}")
            else:
                detail = "; ".join(
                    f"{g['group']} ({g['mailboxes']}, {'up' if g['connected'] else 'DOWN'}, {_age(g['last_activity_age_s'])})"
                    for g in item["groups"]) or "-"
                limits = item.get("throttling")
                if limits:  # how close to Exchange's default throttling policy (per budget, used/allowed)
                    detail += (f" | throttling: streams {limits['connections_per_budget_max']}/"
                               f"{limits['connections_per_budget_allowed']} per mailbox budget "
                               f"({limits['streaming_connections']} open), subscriptions "
                               f"{limits['subscriptions_per_mailbox_max']}/{limits['subscriptions_per_mailbox_allowed']}"
                               f" per mailbox, group size {limits['group_size_max']}/{limits['group_size_allowed']}")
            rows.append([item["id"], item.get("source", "ews"), str(item["mailboxes"]),
                         _age(item["last_heartbeat_age_s"]), detail])
        lines += _table(rows)
    else:
        lines.append("  none")
    api = snap.get("api", [])
    lines.append("")
    lines.append(f"API processes ({len(api)})")
    if api:
        rows = [["API PROCESS", "ADDRESS", "HEARTBEAT"]]
        rows += [[p["id"], p["address"] or "-", _age(p["last_heartbeat_age_s"])] for p in api]
        lines += _table(rows)
    else:
        lines.append("  none")
    mb = snap["mailboxes"]
    failing = [(item["id"], f) for item in listeners for g in item["groups"] for f in g["failing"]]
    failing += [(item["id"], f) for item in listeners for f in item.get("graph", {}).get("failing", ())]
    failing += [(item["id"], {**f, "mailbox": f"{f['mailbox']} {f['folder']}"})
                for item in listeners for f in item.get("imap", {}).get("failing", ())]
    failing_total = (sum(g["failing_count"] for item in listeners for g in item["groups"])
                     + sum(item.get("graph", {}).get("failing_count", 0) for item in listeners)
                     + sum(item.get("imap", {}).get("failing_count", 0) for item in listeners))
    lines.append("")
    lines.append(f"Mailboxes: {mb['watched']} watched, {mb['held']} held, {len(mb['unowned'])} unowned, "
                 f"{failing_total} failing to subscribe")
    for listener_id, f in failing[:20]:
        lines.append(f"  failing for {f['failing_for_s'] or 0:.0f} s, retry in {f.get('retry_in_s') or 0:.0f} s "
                     f"({listener_id}): {f['mailbox']}: {f['error']}")
    for address in mb["unowned"][:20]:
        lines.append(f"  unowned: {address}")
    if len(mb["unowned"]) > 20:
        lines.append(f"  ... and {len(mb['unowned']) - 20} more")
    q = snap["queue"]
    oldest = f", oldest waiting {q['oldest_job_age_s']:.1f}s" if q["oldest_job_age_s"] is not None else ""
    lines.append("")
    lines.append(f"Queue {q['name']}: {q['depth']} queued{oldest}, {q['running']} running, "
                 f"{q['scheduled_retries']} waiting to retry, {q['failed']} failed")
    workers = snap["workers"]
    lines.append("")
    lines.append(f"Workers ({len(workers)})")
    if workers:
        rows = [["WORKER", "STATE", "CURRENT JOB", "HEARTBEAT", "DONE", "FAILED"]]
        for w in workers:
            rows.append([w["name"], w["state"], w["current_job"] or "-", _age(w["last_heartbeat_age_s"]),
                         str(w["successful_jobs"]), str(w["failed_jobs"])])
        lines += _table(rows)
    else:
        lines.append("  none")
    lines.append("")
    lines += _redis_lines(snap["redis"])
    hour = snap["last_hour"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(hour["stops_by_reason"].items()))
    lines.append("")
    lines.append(f"Last hour: {hour['stops']} stopped{f' ({reasons})' if reasons else ''}, {hour['pauses']} paused")
    if snap["notifications_failed"]:
        lines.append(f"Notifications that gave up: {snap['notifications_failed']} (exchange-listener enrollments outbox)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    limits = health.Limits(
        stale_listener=args.stale_listener if args.stale_listener is not None else settings.lease_seconds,
        stale_api=settings.lease_seconds,  # the API beats every lease_seconds / 3
        silent_group=args.silent_group if args.silent_group is not None else 3 * settings.heartbeat_seconds + 15,
        stuck_queue=args.stuck_queue,
        allow_volatile_redis=settings.allow_volatile_redis,
        mailbox_failure_grace=settings.mailbox_failure_grace_seconds,
    )
    conn = redis_conn.connect(settings.redis_url)
    snap = health.snapshot(conn, settings.queue_name)
    snap["redis"].update(url=redis_conn.redact(settings.redis_url), allow_volatile_redis=settings.allow_volatile_redis)
    found = health.problems(snap, limits)
    if args.json:
        print(json.dumps({"healthy": not found, "problems": found, **snap}, indent=2))
    else:
        print(render(snap, found))
    return 1 if found else 0
