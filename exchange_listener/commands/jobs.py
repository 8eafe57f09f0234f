"""``exchange-listener jobs failed|requeue-failed|queue``: what failed and why, and retrying it.

``failed`` also lists the notifications (webhook or callable deliveries of enrollment
transitions) the outbox gave up on, after the failed jobs and only if there are any: text rows
under their own heading, JSON rows with ``"kind": "notification"`` (job rows are unchanged and
have no ``kind``). They are sent again with ``exchange-listener enrollments outbox
--retry-failed``, not by ``requeue-failed``: they are not RQ jobs.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import redis
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from exchange_listener import queueing
from exchange_listener.commands import add_config_argument, load_settings
from exchange_listener.core import redis_conn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("action", choices=["failed", "requeue-failed", "queue"],
                        help="failed: list failed jobs with their errors; requeue-failed: put them back; queue: depth")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--limit", type=int, default=100, help="most jobs (and most failed notifications) to list")


def _last_error_line(job: Job) -> str:
    text = (job.exc_info or "").strip()
    return text.splitlines()[-1] if text else ""


RETRY_NOTIFICATIONS = "exchange-listener enrollments outbox --retry-failed"


def _failed_notifications(conn: redis.Redis) -> list[dict[str, Any]]:
    """The outbox's given-up transitions, oldest failure first, as rows shaped like the job rows."""
    from workers.sinks.webhooks import Notifier

    rows = []
    for record in Notifier(conn).failed():  # visibility only: no channel needed
        transition = record.get("transition") or {}
        rows.append({"kind": "notification", "id": record.get("id"), "mailbox": transition.get("mailbox"),
                     "ended_at": record.get("failed_at"), "error": record.get("last_error") or "",
                     "enrollment_id": transition.get("enrollment_id"), "version": transition.get("version"),
                     "status": transition.get("status"), "attempts": record.get("attempts")})
    return sorted(rows, key=lambda r: (r["ended_at"] or "", str(r["enrollment_id"]), r["version"] or 0))


def _print_failed_notifications(rows: list[dict], limit: int, as_json: bool) -> None:
    if not rows:
        return
    if not as_json:
        print(f"{len(rows)} failed notification(s) (webhook/callable deliveries given up; "
              f"send them again with: {RETRY_NOTIFICATIONS})")
    for row in rows[:limit]:
        print(json.dumps(row) if as_json else
              f"{row['id']}  {row['mailbox'] or '-'}  {row['ended_at'] or '-'}  enrollment {row['enrollment_id']} "
              f"v{row['version']} {row['status']}  {row['attempts']} attempt(s): {row['error']}")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    conn = redis_conn.connect(settings.redis_url)
    queue = queueing.make_queue(conn, settings.queue_name)
    registry = FailedJobRegistry(queue=queue)
    if args.action == "queue":
        print(json.dumps({"queue": settings.queue_name, "queued": queue.count, "failed": registry.count}))
        return 0
    ids = registry.get_job_ids()
    if args.action == "requeue-failed":
        requeued = 0
        for job_id in ids:
            try:
                registry.requeue(job_id)
                requeued += 1
            except Exception as exc:  # noqa: BLE001 - a job whose data expired cannot come back; say so, go on
                print(f"{job_id}: not requeued ({exc})")
        print(f"requeued {requeued} of {len(ids)} failed job(s)")
        return 0
    jobs = [j for j in Job.fetch_many(ids[: args.limit], connection=conn, serializer=JSONSerializer) if j]
    for job in jobs:
        row = {
            "id": job.id,
            "mailbox": queueing.describe(job.args[0]) if job.args else None,
            "ended_at": job.ended_at.isoformat() if job.ended_at else None,
            "error": _last_error_line(job),
        }
        print(json.dumps(row) if args.json else f"{row['id']}  {row['mailbox'] or '-'}  {row['ended_at'] or '-'}  {row['error']}")
    if not args.json:
        print(f"{len(ids)} failed job(s)")
    _print_failed_notifications(_failed_notifications(conn), args.limit, args.json)
    return 0
