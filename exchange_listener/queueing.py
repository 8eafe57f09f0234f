"""The job contract between listener and workers: one queue, JSON payloads, deterministic ids.

A job is ``workers.jobs.handle_mail(payload)`` with
``payload = {"mailbox": str, "source": "ews", "mails": [NewMail.as_dict(), ...]}``.
Its id hashes the mailbox and item ids (EWS ItemIds hold characters RQ forbids in ids), and it
is enqueued with ``unique=True``, so the same batch enqueued twice while the first is queued or
running runs once (a catch-up replaying a page from the same state makes the same batches).
A stream batch and a catch-up batch rarely hold the same items, so a mail in both runs twice:
harmless (decisions are stored once, transitions are once per event), but it costs work.
"""
from __future__ import annotations

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


def payload(mails: Sequence[NewMail], source: str = "ews") -> dict[str, Any]:
    mailboxes = {m.mailbox for m in mails}
    if len(mailboxes) != 1:
        raise ValueError("one job carries mail of one mailbox")
    return {"mailbox": mails[0].mailbox, "source": source, "mails": [m.as_dict() for m in mails]}


def retry_policy(retries: int) -> Retry | None:
    if retries <= 0:
        return None
    intervals = RETRY_INTERVALS[: min(retries, len(RETRY_INTERVALS))] + [RETRY_INTERVALS[-1]] * max(0, retries - len(RETRY_INTERVALS))
    return Retry(max=retries, interval=intervals)


def enqueue_new_mail(queue: Queue, mails: Sequence[NewMail], *, retries: int = default("job_retries"),
                     job_timeout: int = default("job_timeout"),
                     source: str = "ews", failure_ttl: int = FAILURE_TTL) -> Job | None:
    """Enqueue one job for ``mails`` (all of one mailbox). Returns the job, or None if its twin is
    pending. A failed job is kept ``failure_ttl`` seconds: at least as long as the ledger's
    memory, since a catch-up leaves mail whose job failed to the failed registry."""
    try:
        return queue.enqueue(
            JOB_FUNC,
            payload(mails, source),
            job_id=job_id(mails[0].mailbox, [m.item_id for m in mails]),
            unique=True,
            retry=retry_policy(retries),
            job_timeout=job_timeout,
            result_ttl=3600,
            failure_ttl=failure_ttl,
            description=f"new mail for {mails[0].mailbox} ({len(mails)} item(s))",
        )
    except DuplicateJobError:
        return None
