"""The job: fetch a mailbox's new items, classify each, match it to recorded sends, and act.

``handle_mail(payload)`` is what the listener enqueues (see ``exchange_listener.queueing``).
Per item:

1. one batched fetch of headers for all items (MIME only when ``needs_body`` says so);
2. classify (``workers.classify``);
3. match every Message-ID in In-Reply-To/References, and a bounce's or receipt's original
   Message-ID, against the send registry: the reply may come from any address;
4. act, exactly once per (enrollment, message, kind) — the event key hashes the message's
   Message-ID (or mailbox + item id when it has none), so the same mail delivered twice,
   to two mailboxes, or replayed by a retry makes one transition:

   ============  ========================================================================
   human_reply   stop, reason ``replied`` (with ``stop_whole_domain``: every enrollment
                 sent to the sender's domain, reason ``domain_replied``; never for the
                 mailbox's own domain or a free-mail domain)
   auto_reply    pause until the stated return date (or ``pause_days``); never a stop
   bounce hard   stop, reason ``bounced`` — unless the failed recipients are known and none
                 of them was a ``to`` recipient of the send (a bounced CC is recorded only)
   bounce soft   recorded (the mail server is still trying; no state change)
   complaint     stop, reason ``complaint`` (the prospect marked us as spam)
   read_receipt  recorded only
   other         nothing
   ============  ========================================================================

   "Recorded" means an entry in the capped ``el:observed`` stream (field ``data``: JSON with
   enrollment_id, kind, at, event_key, by, item_id, message_id, mailbox, failed_recipients),
   for operators; enrollment state does not change. A mail seen twice is recorded twice with
   the same event_key.

Mail the mailbox sent itself, and a copy of one of our own sends, is skipped. Unmatched mail
is counted and ignored. An item that is gone by the time the job runs is counted and
skipped. A failure on one item does not stop the others; the job then fails with every
item's error in its message, and RQ retries it (replays are harmless).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from typing import Any

import structlog
from rq import get_current_job
from rq.timeouts import BaseTimeoutException

from exchange_listener import logs, metrics
from exchange_listener.sources.base import (
    FetchedMessage,
    ItemGone,
    ItemUnreadable,
    NewMail,
)
from workers import context
from workers.classify import (
    Classification,
    UnparseableMessage,
    classify_headers,
    classify_message,
    needs_body,
)
from workers.message_ids import normalize, references_of

OBSERVED_KEY = "el:observed"
OBSERVED_MAXLEN = 100_000
MAX_ITEMS = 500  # items one job may carry; more is a listener bug, refused visibly
MAX_PAUSE_DAYS = 365
# A reply from one of these domains says nothing about the prospect's company.
FREE_MAIL_DOMAINS = frozenset({
    "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com", "yahoo.com",
    "ymail.com", "icloud.com", "me.com", "mac.com", "aol.com", "gmx.de", "gmx.net", "web.de", "mail.com",
    "proton.me", "protonmail.com", "yandex.ru", "mail.ru", "qq.com", "163.com", "t-online.de", "orange.fr",
})

log = logs.get_logger(component="jobs")


class InvalidPayload(ValueError):
    """The job's payload is not what the listener enqueues; retrying cannot fix it."""


class ItemsFailed(RuntimeError):
    """Some items of the job could not be processed (the others were)."""


def _validate(payload: Any) -> tuple[str, str, list[NewMail]]:
    if not isinstance(payload, dict):
        raise InvalidPayload(f"payload must be an object, got {type(payload).__name__}")
    mailbox, source, mails = payload.get("mailbox"), payload.get("source", "ews"), payload.get("mails")
    if not isinstance(mailbox, str) or "@" not in mailbox or any(c in mailbox for c in "\r\n"):
        raise InvalidPayload("payload.mailbox must be an email address")
    if not isinstance(source, str) or not source:
        raise InvalidPayload("payload.source must be a non-empty string")
    if not isinstance(mails, list) or not mails:
        raise InvalidPayload("payload.mails must be a non-empty list")
    if len(mails) > MAX_ITEMS:
        raise InvalidPayload(f"payload.mails has {len(mails)} items (at most {MAX_ITEMS})")
    parsed = []
    for index, raw in enumerate(mails):
        where = f"payload.mails[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("item_id"), str) or not raw["item_id"]:
            raise InvalidPayload(f"{where} needs a non-empty string item_id")
        for name in ("mailbox", "folder", "via"):
            if raw.get(name) is not None and not isinstance(raw[name], str):
                raise InvalidPayload(f"{where}.{name} must be a string")
        seen_at = raw.get("seen_at") or 0
        if isinstance(seen_at, bool) or not isinstance(seen_at, (int, float)) or not math.isfinite(seen_at):
            raise InvalidPayload(f"{where}.seen_at must be a number (epoch seconds)")
        mail = NewMail.from_dict({**raw, "mailbox": raw.get("mailbox") or mailbox, "seen_at": float(seen_at)})
        if mail.mailbox.lower() != mailbox.lower():
            raise InvalidPayload(f"{where} belongs to another mailbox")
        parsed.append(mail)
    return mailbox, source, parsed


def event_key(kind: str, mailbox: str, item: FetchedMessage, classification: Classification) -> str:
    """Stable id of "this message, as this kind": the same mail seen twice gives the same key."""
    msgid = classification.message_id or normalize(item.internet_message_id or "")
    identity = f"mid\n{msgid}" if msgid else f"item\n{mailbox.lower()}\n{item.item_id}"
    return f"{kind}:{hashlib.sha256(identity.encode()).hexdigest()[:32]}"


def _domain(address: str | None) -> str:
    _, at, domain = (address or "").strip().rpartition("@")
    return domain.strip().strip(">").lower() if at else ""


def _classify(fetcher, mailbox: str, item: FetchedMessage, bound) -> Classification:
    """Headers first; the full MIME source only when the headers cannot settle it."""
    if not needs_body(item.headers):
        return classify_headers(item.headers)
    try:
        raw = fetcher.fetch_mime(mailbox, item.item_id)  # ItemGone: the caller counts it as gone
    except ItemUnreadable as exc:  # the item is there but Exchange cannot give its MIME: headers decide
        bound.warning("mime unavailable, classified from headers", error=str(exc))
        return classify_headers(item.headers)
    try:
        return classify_message(raw)
    except UnparseableMessage as exc:
        bound.warning("mime unusable, classified from headers", error=str(exc))
        return classify_headers(item.headers)


def _match_ids(item: FetchedMessage, c: Classification) -> list[str]:
    ids = list(c.references)
    seen = set(ids)
    for mid in references_of(item.in_reply_to, item.references):
        if mid not in seen:
            seen.add(mid)
            ids.append(mid)
    original = normalize(c.original_message_id or "") if c.original_message_id else None
    if original and original not in seen:
        ids.insert(0, original)
    return ids


def _pause_until(c: Classification, pause_days: int) -> dt.date | dt.datetime:
    today = dt.datetime.now(dt.UTC).date()
    if c.return_date and today < c.return_date <= today + dt.timedelta(days=MAX_PAUSE_DAYS):
        return c.return_date
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=pause_days)


def _observe(ctx, send, kind: str, details: dict) -> None:
    entry = {"enrollment_id": send.enrollment_id, "kind": kind, "at": dt.datetime.now(dt.UTC).isoformat(),
             **{k: v for k, v in details.items() if v is not None}}
    ctx.redis.xadd(OBSERVED_KEY, {"data": json.dumps(entry, default=str)}, maxlen=OBSERVED_MAXLEN, approximate=True)


def _process(ctx, fetcher, mailbox: str, mail: NewMail, item: FetchedMessage, bound) -> dict:
    settings = ctx.settings
    c = _classify(fetcher, mailbox, item, bound)
    kind = c.kind
    metrics.CLASSIFIED.labels(kind).inc()
    sender = c.from_address or (item.from_address or "").lower() or None
    own_id = c.message_id or normalize(item.internet_message_id or "")
    summary: dict[str, Any] = {"item_id": item.item_id, "kind": kind, "matched": [], "actions": []}
    if kind == "bounce":
        summary["bounce_type"] = c.bounce_type
    if kind == "auto_reply" and c.return_date:
        summary["return_date"] = c.return_date.isoformat()

    if sender and sender == mailbox.lower():
        summary["skipped"] = "sent by the mailbox itself"
        return summary
    found = ctx.sends.lookup_many(([own_id] if own_id else []) + _match_ids(item, c))  # one round trip
    if own_id and any(own_id in s.message_ids for s in found):
        summary["skipped"] = "a copy of one of our sends"
        return summary
    by_enrollment = {}
    for send in found:  # several steps of one sequence may be in References: act once per enrollment
        by_enrollment.setdefault(send.enrollment_id, send)
    sends = list(by_enrollment.values())
    summary["matched"] = [s.enrollment_id for s in sends]
    if not sends:
        metrics.UNMATCHED.labels(kind).inc()
        bound.info("mail matched no send", kind=kind)
        return summary

    key = event_key(kind, mailbox, item, c)
    common = {"event_key": key, "by": sender, "item_id": item.item_id, "message_id": own_id, "mailbox": mailbox}
    plan: list[tuple[str, str, str, dict]] = []  # (enrollment, status, reason, extra)
    if kind == "human_reply":
        plan += [(s.enrollment_id, "stopped", "replied", {}) for s in sends]
        domain = _domain(sender)
        if settings.stop_whole_domain and domain and domain != _domain(mailbox) and domain not in FREE_MAIL_DOMAINS:
            matched = {s.enrollment_id for s in sends}
            plan += [(e, "stopped", "domain_replied", {}) for e in ctx.sends.enrollments_for_domain(domain)
                     if e not in matched]
    elif kind == "auto_reply":
        until = _pause_until(c, settings.pause_days)
        plan += [(s.enrollment_id, "paused", "auto_reply", {"until": until}) for s in sends]
    elif kind == "complaint":
        plan += [(s.enrollment_id, "stopped", "complaint", {}) for s in sends]
    elif kind == "bounce" and c.bounce_type != "soft":
        failed = {a.lower() for a in c.failed_recipients}
        for s in sends:
            if failed and not failed & {a.lower() for a in s.to}:
                _observe(ctx, s, "bounce_of_cc", {**common, "failed_recipients": sorted(failed)})
                summary["actions"].append({"enrollment_id": s.enrollment_id, "action": "recorded"})
            else:
                plan.append((s.enrollment_id, "stopped", "bounced", {}))
    elif kind in ("bounce", "read_receipt"):
        for s in sends:
            _observe(ctx, s, "soft_bounce" if kind == "bounce" else kind,
                     {**common, "failed_recipients": c.failed_recipients or None})
            summary["actions"].append({"enrollment_id": s.enrollment_id, "action": "recorded"})

    for enrollment_id, status, reason, extra in plan:
        transition = ctx.enrollments.transition(enrollment_id, status, reason, **common, **extra)
        action = {"enrollment_id": enrollment_id, "action": status, "reason": reason, "applied": transition is not None}
        summary["actions"].append(action)
        if transition is not None:
            metrics.TRANSITIONS.labels(status, reason).inc()
            if mail.seen_at:
                metrics.DELIVERY_TO_STOP.observe(max(0.0, time.time() - float(mail.seen_at)))
            bound.info("enrollment transition", enrollment_id=enrollment_id, status=status, reason=reason,
                       kind=kind, transition_id=transition.id,
                       paused_until=transition.paused_until)
    return summary


def handle_mail(payload: dict) -> dict:
    """Process one job (see the module docstring). Returns a JSON-safe summary."""
    started = time.monotonic()
    job = get_current_job()  # None when called outside a worker (tests, tools)
    job_id = job.id if job is not None else None
    with structlog.contextvars.bound_contextvars(job_id=job_id):
        try:
            mailbox, source, mails = _validate(payload)
        except InvalidPayload as exc:
            metrics.JOBS_PROCESSED.labels("invalid").inc()
            log.error("job payload invalid; failing without retry", error=str(exc))
            if job is not None:
                job.retries_left = 0  # a retry cannot fix it: straight to the failed registry
            raise
        with structlog.contextvars.bound_contextvars(mailbox=mailbox):
            try:
                summary = _handle(mailbox, source, mails)
            except Exception as exc:
                metrics.JOBS_PROCESSED.labels("failed").inc()
                log.error("job failed", error=f"{type(exc).__name__}: {exc}", items=len(mails))
                raise
            metrics.JOBS_PROCESSED.labels("ok").inc()
            summary["seconds"] = round(time.monotonic() - started, 4)
            log.info("job done", items=len(mails), kinds=summary["kinds"], transitions=summary["transitions"],
                     unmatched=summary["unmatched"], gone=summary["gone"], seconds=summary["seconds"])
            return summary


def _handle(mailbox: str, source: str, mails: list[NewMail]) -> dict:
    ctx = context.get()
    fetcher = ctx.fetcher(source)
    items, errors = [], []
    for mail, item in zip(mails, _fetch(fetcher, mailbox, mails)):
        bound = log.bind(item_id=mail.item_id)
        if isinstance(item, Exception) and not isinstance(item, ItemGone):
            bound.error("item could not be fetched", error=f"{type(item).__name__}: {item}")
            errors.append(f"{mail.item_id[-16:]}: {type(item).__name__}: {item}")
            continue
        if isinstance(item, ItemGone):
            bound.info("item gone before processing", reason=str(item))
            items.append({"item_id": mail.item_id, "kind": None, "gone": True, "matched": [], "actions": []})
            continue
        try:
            items.append(_process(ctx, fetcher, mailbox, mail, item, bound))
        except ItemGone as exc:
            bound.info("item gone before processing", reason=str(exc))
            items.append({"item_id": mail.item_id, "kind": None, "gone": True, "matched": [], "actions": []})
        except BaseTimeoutException:
            raise  # RQ's job timeout: the job must end here, not go on to the next item
        except Exception as exc:  # noqa: BLE001 - one bad item must not cost the others their processing
            bound.error("item failed", error=f"{type(exc).__name__}: {exc}")
            errors.append(f"{mail.item_id[-16:]}: {type(exc).__name__}: {exc}")
    transitions = sum(1 for i in items for a in i["actions"] if a.get("applied"))
    if transitions:
        _notify(ctx)
    if errors:
        raise ItemsFailed(f"{len(errors)} of {len(mails)} item(s) failed: " + "; ".join(errors)[:2000])
    kinds: dict[str, int] = {}
    for i in items:
        if i["kind"]:
            kinds[i["kind"]] = kinds.get(i["kind"], 0) + 1
    return {
        "mailbox": mailbox,
        "items": items,
        "kinds": kinds,
        "transitions": transitions,
        "unmatched": sum(1 for i in items if i["kind"] and not i["matched"] and not i.get("skipped")),
        "gone": sum(1 for i in items if i.get("gone")),
    }


def _fetch(fetcher, mailbox: str, mails: list[NewMail]) -> list:
    """One batched fetch; if the batch fails, one item at a time, so one item the server
    cannot return (or chokes on) does not hold the others hostage. If every single fetch
    fails too, the first error is raised (the server is down or busy: RQ retries the job)."""
    ids = [m.item_id for m in mails]
    try:
        return fetcher.fetch(mailbox, ids)
    except BaseTimeoutException:
        raise  # RQ's job timeout fired inside the fetch: end the job (it is retried)
    except Exception as exc:
        if len(ids) == 1:
            raise
        log.warning("batched fetch failed; fetching items one by one", error=f"{type(exc).__name__}: {exc}",
                    items=len(ids))
    results: list = []
    for item_id in ids:
        try:
            results.extend(fetcher.fetch(mailbox, [item_id]))
        except BaseTimeoutException:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per item by the caller
            results.append(exc)
    if all(isinstance(r, Exception) and not isinstance(r, ItemGone) for r in results):
        raise results[0]
    return results


def _notify(ctx) -> None:
    """Deliver the outbox now; a failure here is retried by the worker's drain timer."""
    if not ctx.notifier.channels:  # Redis state only: nothing to deliver now; the worker's timer clears the outbox
        return
    try:
        ctx.notifier.drain()
    except Exception as exc:  # noqa: BLE001 - the transitions are safe in the outbox; say so and go on
        log.warning("notification drain failed; will retry", error=f"{type(exc).__name__}: {exc}")
