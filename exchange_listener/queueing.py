"""The job contract between listener and workers: one queue, JSON payloads, deterministic ids.

A job is ``workers.jobs.handle_mail(payload)`` with
``payload = {"mailbox": str, "source": "ews", "mails": [NewMail.as_dict(), ...]}`` when its mails
are of one mailbox, and ``{"mailboxes": [str, ...], "source": "ews", "mails": [...]}`` when they
are of several (stream mail that arrived together: RQ's own cost, most of a one-mail job's, is
then paid once for all of them; the worker still asks each mailbox once).
Its id hashes the mailboxes and item ids (EWS ItemIds hold characters RQ forbids in ids), and it
is enqueued with ``unique=True``, so the same batch enqueued twice while the first is queued or
running runs once (a catch-up replaying a page from the same state makes the same batches).
A stream batch and a catch-up batch rarely hold the same items, so a mail in both runs twice:
harmless (decisions are stored once, transitions are once per event), but it costs work.
"""
from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from exchange_listener.core.config import default
from exchange_listener.sources.base import NewMail

JOB_FUNC = "workers.jobs.handle_mail"
RETRY_INTERVALS = [2, 10, 30, 120, 600]  # seconds; the last repeats for further retries
FAILURE_TTL = 14 * 86400  # seconds a failed job stays listed (``make failed``)


def make_queue(connection: redis.Redis, name: str, **kwargs: Any) -> Queue:
    return Queue(name, connection=connection, serializer=JSONSerializer, **kwargs)


def job_id(mailbox: str, item_ids: Iterable[str]) -> str:
    digest = hashlib.sha256("\n".join([mailbox.lower(), *sorted(item_ids)]).encode()).hexdigest()
    return f"mail-{digest[:40]}"


def mails_job_id(mails: Sequence[NewMail]) -> str:
    """``job_id`` for mail of one mailbox (so a stream mail and a catch-up's twin share it); for
    several, a hash of every (mailbox, item id) pair."""
    if len({m.mailbox.lower() for m in mails}) == 1:
        return job_id(mails[0].mailbox, [m.item_id for m in mails])
    pairs = sorted(f"{m.mailbox.lower()}\t{m.item_id}" for m in mails)
    return "mail-" + hashlib.sha256("\n".join(["*", *pairs]).encode()).hexdigest()[:40]


def payload(mails: Sequence[NewMail], source: str = "ews") -> dict[str, Any]:
    if not mails:
        raise ValueError("a job carries at least one mail")
    mailboxes = list(dict.fromkeys(m.mailbox for m in mails))
    if len({m.lower() for m in mailboxes}) == 1:
        return {"mailbox": mails[0].mailbox, "source": source, "mails": [m.as_dict() for m in mails]}
    return {"mailboxes": mailboxes, "source": source, "mails": [m.as_dict() for m in mails]}


def describe(job_payload: Any) -> str | None:
    """The mailbox (or mailboxes) a job's payload is for, for listings."""
    if not isinstance(job_payload, dict):
        return None
    if isinstance(job_payload.get("mailbox"), str):
        return str(job_payload["mailbox"])
    several = job_payload.get("mailboxes")
    return ", ".join(str(m) for m in several) if isinstance(several, list) and several else None


def retry_policy(retries: int, used: int = 0) -> Retry | None:
    """RQ's Retry for ``retries`` retries in all, ``used`` of them spent already (a job that goes
    on from another: it keeps the same schedule)."""
    if retries - used <= 0:
        return None
    return Retry(max=retries - used, interval=[retry_delay(i) for i in range(used, retries)])


def retry_delay(used: int) -> int:
    """Seconds RQ waits before retry number ``used + 1`` under ``retry_policy``."""
    return RETRY_INTERVALS[min(used, len(RETRY_INTERVALS) - 1)]


def enqueue_new_mail(queue: Queue, mails: Sequence[NewMail], *, retries: int = default("job_retries"),
                     job_timeout: int = default("job_timeout"),
                     source: str = "ews", failure_ttl: int = FAILURE_TTL) -> Job | None:
    """Enqueue one job for ``mails`` (of one mailbox or several). Returns the job, or None if its
    twin is pending. A failed job is kept ``failure_ttl`` seconds: at least as long as the
    ledger's memory, since a catch-up leaves mail whose job failed to the failed registry."""
    try:
        return queue.enqueue(JOB_FUNC, payload(mails, source), unique=True,
                             **_job_options(mails, retries, job_timeout, failure_ttl))
    except DuplicateJobError:
        return None


def enqueue_later(queue: Queue, mails: Sequence[NewMail], delay: float, *, retries: int, job_timeout: int,
                  source: str, failure_ttl: int = FAILURE_TTL, meta: dict[str, Any] | None = None,
                  retries_used: int = 0) -> Job | None:
    """``enqueue_new_mail``, due ``delay`` seconds from now (RQ's scheduler enqueues it then),
    with ``meta`` as the job's meta and ``retries_used`` of its retries spent. Returns None if
    its twin is pending."""
    opts = _job_options(mails, retries, job_timeout, failure_ttl, retries_used)
    job = queue.create_job(JOB_FUNC, args=(payload(mails, source),), job_id=opts.pop("job_id"),
                           timeout=opts.pop("job_timeout"), meta=meta, **opts)
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)
    try:
        return queue.schedule_job(job, when, unique=True)
    except DuplicateJobError:
        return None


def _job_options(mails: Sequence[NewMail], retries: int, job_timeout: int, failure_ttl: int,
                 retries_used: int = 0) -> dict[str, Any]:
    mailboxes = list(dict.fromkeys(m.mailbox.lower() for m in mails))
    whose = mailboxes[0] if len(mailboxes) == 1 else f"{len(mailboxes)} mailboxes"
    return {"job_id": mails_job_id(mails), "retry": retry_policy(retries, retries_used), "job_timeout": job_timeout,
            "result_ttl": 3600, "failure_ttl": failure_ttl, "description": f"new mail for {whose} ({len(mails)} item(s))"}
