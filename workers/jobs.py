"""The job: fetch a mailbox's new items, classify each, match it to recorded sends, and act.

``handle_mail(payload)`` is what the listener enqueues (see ``exchange_listener.queueing``).
A job may carry many mails of one mailbox, or of several (stream mail that arrived together:
each mailbox's part is then handled as below on its own, and a part that fails is split off as
a job of its own). What can be asked for all the mails of a mailbox together is
(``_prepare``): one GetItem for the headers, one MGET for the sends their header ids name, one
pipeline of first-received scripts and stored decisions, one GetItem for the texts of the
matched replies that look human, and one ledger write at the end. Per item:

1. headers from the batched fetch; the MIME only when ``needs_body`` says so and either an id
   matched a send or the headers say or hint bounce / receipt / complaint (their body names
   the original), so unrelated bulk mail is not read; an item that is gone is looked for
   where it is now (``fetcher.relocate``, when the source has it);
2. classify (``workers.classify``);
3. match every Message-ID in In-Reply-To/References, and a bounce's or receipt's original
   Message-ID, against the send registry: the reply may come from any address; a mail that
   matched and looks human by its headers has the start of its text read (``fetch_text``
   when the source has it, else the first text part of its MIME), since some out-of-office
   replies and ticket acknowledgements say what they are only there. Unmatched mail stays on
   the headers-only path;
4. decide (``workers.policy.decide``: the rules, as data) and apply the actions, exactly once
   per (enrollment, message, kind) — the event key hashes the message's Message-ID (or mailbox
   + item id when it has none), so the same mail delivered twice, to two mailboxes, or
   replayed by a retry makes one transition;
5. mark the mail processed in the ledger (``exchange_listener.sources.ledger``), so a catch-up never
   fetches it again — for every outcome but a failure; written for the whole job once all its
   items are through (so after every transition).

Time and one decision per mail: the mail's time is its Date header bounded by when its first
copy was received anywhere (``el:first_received:{hash}``, the earliest ``received_at`` any
copy had, kept ``retention_days`` once a copy matched a send, else ``processed_days``). The first copy that matches a send stores its decision
(``el:decision:{hash}``, same TTL); every later copy of that Message-ID — in another mailbox,
another folder, or a retry — applies the stored decision instead of deciding again, so an
enrollment created between two copies, a pause computed a second later or a different
classification cannot make the copies disagree. Mail that matched nothing stores no decision
(a send recorded late is still found by a later copy).

"Recorded" means an entry in the capped ``el:observed`` stream (field ``data``: JSON with
enrollment_id, kind, at, event_key, by, item_id, message_id, mailbox, failed_recipients),
for operators; enrollment state does not change. A mail seen twice is recorded twice with
the same event_key.

Mail the mailbox sent itself, and a copy of one of our own sends, is skipped. Unmatched mail
is counted and ignored. An item that exists nowhere (not even after a move or a delete) is
reported in the item's summary (``gone``, ``gone_reason``), logged as a warning and counted
(``el_items_gone_total``, outcome relocated | nowhere | unreadable). A failure on one item
does not stop the others; the job then fails with every item's error in its message, and RQ
retries it (replays are harmless). RQ's job timeout is never taken for an item's error: it
ends the job.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
import math
import time
from typing import Any, cast

import structlog
from rq import get_current_job
from rq.timeouts import BaseTimeoutException
from structlog.typing import FilteringBoundLogger

from exchange_listener import queueing
from exchange_listener.core import keys, logs, metrics
from exchange_listener.core.lua import Script
from exchange_listener.mail.message_ids import normalize, references_of
from exchange_listener.sources.base import (
    FetchedMessage,
    ItemGone,
    ItemUnreadable,
    MailFetcher,
    NewMail,
)
from workers import context, policy
from workers.classify import (
    Classification,
    UnparseableMessage,
    classify_headers,
    classify_message,
    first_text,
    needs_body,
    needs_text,
    settle_with_text,
)
from workers.state.sends import Send

OBSERVED_KEY = keys.OBSERVED
OBSERVED_MAXLEN = 100_000
MAX_ITEMS = 500  # items one job may carry; more is a listener bug, refused visibly
MAX_RELOCATIONS = 2  # an item that moves again while we read it is looked for once more, then reported

_FIRST_RECEIVED = Script("first_received")  # the earliest receipt of any copy; TTL only extended
_DECIDE_ONCE = Script("decide_once")  # the first copy's decision counts

log = logs.get_logger(component="jobs")


class InvalidPayload(ValueError):
    """The job's payload is not what the listener enqueues; retrying cannot fix it."""


class ItemsFailed(RuntimeError):
    """Some items of the job could not be processed (the others were)."""


def _address(value: Any) -> bool:
    return isinstance(value, str) and "@" in value and not any(c in value for c in "\r\n")


def _validate(payload: Any) -> tuple[str, list[tuple[str, list[NewMail]]]]:
    """(source, [(mailbox, its mails), ...] in the order the payload names them)."""
    if not isinstance(payload, dict):
        raise InvalidPayload(f"payload must be an object, got {type(payload).__name__}")
    source, mails = payload.get("source", "ews"), payload.get("mails")
    if "mailboxes" in payload and "mailbox" not in payload:
        listed = payload["mailboxes"]
        if not isinstance(listed, list) or not listed or not all(_address(m) for m in listed):
            raise InvalidPayload("payload.mailboxes must be a non-empty list of email addresses")
        mailboxes = {m.lower(): m for m in listed}
    elif _address(payload.get("mailbox")):
        mailboxes = {payload["mailbox"].lower(): payload["mailbox"]}
    else:
        raise InvalidPayload("payload.mailbox must be an email address")
    if not isinstance(source, str) or not source:
        raise InvalidPayload("payload.source must be a non-empty string")
    if not isinstance(mails, list) or not mails:
        raise InvalidPayload("payload.mails must be a non-empty list")
    if len(mails) > MAX_ITEMS:
        raise InvalidPayload(f"payload.mails has {len(mails)} items (at most {MAX_ITEMS})")
    groups: dict[str, list[NewMail]] = {}
    only = next(iter(mailboxes.values())) if len(mailboxes) == 1 else None
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
        mailbox = mailboxes.get((raw.get("mailbox") or only or "").lower())
        if mailbox is None:
            raise InvalidPayload(f"{where} belongs to another mailbox" if raw.get("mailbox")
                                 else f"{where} needs a mailbox (the job names several)")
        groups.setdefault(mailbox, []).append(NewMail.from_dict({**raw, "mailbox": raw.get("mailbox") or mailbox,
                                                                 "seen_at": float(seen_at)}))
    return source, list(groups.items())


def _identity(mailbox: str, item: FetchedMessage, classification: Classification) -> str:
    """This mail across mailboxes, folders and retries: its Message-ID, else this one item."""
    msgid = classification.message_id or normalize(item.internet_message_id or "")
    identity = f"mid\n{msgid}" if msgid else f"item\n{mailbox.lower()}\n{item.item_id}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def event_key(kind: str, mailbox: str, item: FetchedMessage, classification: Classification) -> str:
    """Stable id of "this message, as this kind": the same mail seen twice gives the same key."""
    return f"{kind}:{_identity(mailbox, item, classification)}"


@dataclasses.dataclass
class _Ahead:
    """What the job learned of one fetched item before processing it, in round trips all its
    items share: the verdict of its headers, whether they ask for the body, the sends its
    header ids match, and the text of a matched reply that looks human (``None``: not read)."""

    c: Classification
    body: bool
    found: list[Send]
    text: str | None = None
    earliest: str | None = None  # the first_received script's reply, when the job ran it already
    decision_read: bool = False  # whether ``decision`` holds what el:decision held
    decision: bytes | None = None

    def reads_body(self, item: FetchedMessage) -> bool:
        """Its MIME is read (its verdict and ids may change): it goes on its own from there."""
        return self.body and bool(self.found or _body_may_cite(self.c, item))


_CITING_KINDS = ("bounce", "read_receipt", "complaint")  # their body names the original's Message-ID
_BOUNCE_HINTS = ("null return path", "bounce subject", "bounce hints: body decides", "x-failed-recipients")


def _body_may_cite(c: Classification, item: FetchedMessage) -> bool:
    """The headers say bounce, receipt or complaint, or hint at one: the body may name one of
    our sends even though no header id did, so such mail keeps its MIME read."""
    if c.kind in _CITING_KINDS or any(r in c.reasons for r in _BOUNCE_HINTS):
        return True
    if (item.item_class or "").upper().startswith("REPORT."):  # Exchange's own NDRs and receipts
        return True
    ctype = (_header(item, "content-type") or "").strip().lower()
    return ctype.startswith("multipart/report") or _header(item, "x-amz-sns-message-id") is not None


def _prepare(ctx: context.Context, fetcher: MailFetcher, mailbox: str,
             pairs: list[tuple[NewMail, Any]]) -> dict[str, _Ahead]:
    """Classify every fetched item by its headers, look up the sends their ids name (one MGET),
    run the first-received script and read the stored decision of every item whose ids are
    final (one pipeline), and read the text of the matched ones that look human and still
    need a decision (one ``fetch_texts``)."""
    mails = {id(f): m for m, f in pairs}
    # our own mail is skipped by ``_process`` first: no send lookup, first-received write or text for it
    items = [f for _m, f in pairs if isinstance(f, FetchedMessage) and not f.outgoing]
    ahead: dict[str, _Ahead] = {}
    id_lists = []
    for item in items:
        c = classify_headers(item.headers, item.item_class)
        own_id = c.message_id or normalize(item.internet_message_id or "")
        id_lists.append(([own_id] if own_id else []) + _match_ids(item, c))
        ahead[item.item_id] = _Ahead(c, needs_body(item.headers), [])
    for item, found in zip(items, ctx.sends.lookup_each(id_lists)):
        ahead[item.item_id].found = found
    pipe = ctx.redis.pipeline(transaction=False)
    asked: list[tuple[_Ahead, str]] = []
    for item in items:
        a = ahead[item.item_id]
        own_id = a.c.message_id or normalize(item.internet_message_id or "")
        sender = a.c.from_address or (item.from_address or "").lower() or None
        if a.reads_body(item) or sender == mailbox.lower() or (own_id and any(own_id in s.message_ids
                                                                              for s in a.found)):
            continue  # skipped by ``_process`` before any of this, or decided after its MIME is read
        identity = _identity(mailbox, item, a.c)
        if own_id:
            _first_received(ctx, pipe, identity, bool(a.found), _received(mails[id(item)], item))
            asked.append((a, "earliest"))
        if a.found:
            pipe.get(keys.decision(identity))
            asked.append((a, "decision"))
    for (a, what), reply in zip(asked, pipe.execute() if asked else []):
        if what == "earliest":
            a.earliest = reply.decode() if isinstance(reply, bytes) else str(reply)
        else:
            a.decision_read, a.decision = True, reply
    want = [item.item_id for item in items if (a := ahead[item.item_id]).decision_read and a.decision is None
            and needs_text(a.c)]
    fetch_texts = getattr(fetcher, "fetch_texts", None)  # a fetcher need not derive from MailFetcher
    if want and fetch_texts is not None:
        try:
            texts = fetch_texts(mailbox, want)
        except BaseTimeoutException:
            raise
        except Exception as exc:  # noqa: BLE001 - each item then reads its own text (and reports its error)
            log.warning("batched text fetch failed; reading texts one by one", error=f"{type(exc).__name__}: {exc}",
                        items=len(want))
            texts = []
        for item_id, text in zip(want, texts):
            if isinstance(text, str):  # a gone or unreadable one is read again, alone, where it is
                ahead[item_id].text = text
    return ahead


def _classify(fetcher: MailFetcher, mailbox: str, item: FetchedMessage, ahead: _Ahead,
              bound: FilteringBoundLogger) -> tuple[Classification, bool]:
    """Headers first; the full MIME source only when the headers cannot settle it and either
    an id matched a send or the body may name one (a bounce or receipt): unrelated bulk mail
    is not read. Also says whether the verdict saw the body (then the text was already read)."""
    if not ahead.reads_body(item):
        return ahead.c, False
    try:
        raw = fetcher.fetch_mime(mailbox, item.item_id)  # ItemGone: the caller looks for it elsewhere
    except ItemUnreadable as exc:  # the item is there but Exchange cannot give its MIME: headers decide
        bound.warning("mime unavailable, classified from headers", error=str(exc))
        return classify_headers(item.headers, item.item_class), False
    try:
        return classify_message(raw), True
    except UnparseableMessage as exc:
        bound.warning("mime unusable, classified from headers", error=str(exc))
        return classify_headers(item.headers, item.item_class), False


def _settle(fetcher: MailFetcher, mailbox: str, item: FetchedMessage, c: Classification, when: dt.datetime,
            bound: FilteringBoundLogger, text: str | None = None) -> Classification:
    """A human reply by its headers may still be an out-of-office or a ticket acknowledgement
    that says so only in its text: read the start of it (the source's ``fetch_text``, e.g. EWS
    UniqueBody; else the first text part of the MIME), unless the job read it already
    (``text``). Called only for mail that matched a send, so unrelated mail stays on the
    headers-only path."""
    if text is not None:
        return settle_with_text(c, text, item.subject or "", when.date())
    fetch_text = getattr(fetcher, "fetch_text", None)
    try:
        text = fetch_text(mailbox, item.item_id) if fetch_text else first_text(fetcher.fetch_mime(mailbox, item.item_id))
    except ItemUnreadable as exc:  # there, but its body cannot be read: the headers' verdict stands
        bound.warning("text unavailable, classified from headers", error=str(exc))
        return c
    return settle_with_text(c, text or "", item.subject or "", when.date())


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


def _header(item: FetchedMessage, name: str) -> str | None:
    return next((value for key, value in item.headers if key.lower() == name), None)


def _received(mail: NewMail, item: FetchedMessage) -> dt.datetime:
    """When this copy reached the mailbox: the server's time, else the listener's, else now."""
    moment = item.received_at
    if isinstance(moment, dt.datetime):  # a plain datetime: exchangelib's EWSDateTime refuses stdlib zones
        aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
        return dt.datetime.fromtimestamp(aware.timestamp(), dt.UTC)
    for seconds in (getattr(mail, "received_at", 0.0), mail.seen_at):
        if seconds:
            return dt.datetime.fromtimestamp(float(seconds), dt.UTC)
    return dt.datetime.now(dt.UTC)


UNMATCHED_RECEIPT_TTL = 86400  # seconds a copy that matched nothing keeps its receipt (a send recorded late)


def _first_received(ctx: context.Context, client: Any, identity: str, matched: bool, received: dt.datetime) -> Any:
    ttl = int(ctx.settings.retention_days) * 86400 if matched else UNMATCHED_RECEIPT_TTL
    return _FIRST_RECEIVED(client, first_received=keys.first_received(identity),
                           received_at=repr(received.timestamp()), ttl=ttl)


def _reply_time(ctx: context.Context, identity: str, has_message_id: bool, matched: bool, mail: NewMail,
                item: FetchedMessage, earliest: str | None = None) -> tuple[dt.datetime, dt.datetime]:
    """(the mail's Date bounded by the earliest receipt of any copy of it, that earliest
    receipt). The receipt is kept in Redis for ``retention_days`` once the mail matched a send;
    a copy that matched nothing keeps it a day (``UNMATCHED_RECEIPT_TTL``), for a send the
    platform records late — one key per received mail for longer would cost far more memory.
    ``earliest``: the script's reply when the job ran it for all its items together."""
    received = _received(mail, item)
    if has_message_id:
        if earliest is None:
            earliest = _first_received(ctx, ctx.redis, identity, matched, received)
        received = dt.datetime.fromtimestamp(float(earliest), dt.UTC)
    return policy.reply_time(_header(item, "date"), received), received


def _decision_json(c: Classification, key: str, when: dt.datetime, received: dt.datetime,
                   actions: list[policy.Action], matched: list[str]) -> str:
    def plain(value: object) -> object:
        return value.isoformat() if isinstance(value, (dt.date, dt.datetime)) else value

    return json.dumps({
        "kind": c.kind, "return_date": plain(c.return_date), "bounce_type": c.bounce_type,
        "failed_recipients": list(c.failed_recipients), "event_key": key, "reply_time": when.isoformat(),
        "received": received.isoformat(), "matched": matched,
        "actions": [{**dataclasses.asdict(a), "extra": {k: plain(v) for k, v in a.extra.items()}} for a in actions],
    }, separators=(",", ":"))


def _observe(ctx: context.Context, enrollment_id: str, kind: str, details: dict) -> None:
    entry = {"enrollment_id": enrollment_id, "kind": kind, "at": dt.datetime.now(dt.UTC).isoformat(),
             **{k: v for k, v in details.items() if v is not None}}
    ctx.redis.xadd(OBSERVED_KEY, {"data": json.dumps(entry, default=str)}, maxlen=OBSERVED_MAXLEN, approximate=True)


def _process(ctx: context.Context, fetcher: MailFetcher, mailbox: str, mail: NewMail, item: FetchedMessage,
             ahead: dict[str, _Ahead], bound: FilteringBoundLogger) -> dict:
    """Classify and match one fetched mail, decide (or reuse the decision an earlier copy
    made) and apply it. Returns the item's summary. ``ahead`` holds what the job learned of
    its items together (an item met again, or found elsewhere, is looked at on its own)."""
    if item.outgoing:  # our own mail (Graph's subscription covers Sent Items too): never a reply
        ahead.pop(item.item_id, None)
        return {"item_id": item.item_id, "kind": "other", "matched": [], "actions": [],
                "skipped": "in the mailbox's own-mail folders (Sent Items, Drafts, Outbox)"}
    first = ahead.pop(item.item_id, None) or _prepare(ctx, fetcher, mailbox, [(mail, item)])[item.item_id]
    c, body_seen = _classify(fetcher, mailbox, item, first, bound)
    kind = c.kind
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
    # the body may name more ids (a bounce's original): look again; else the job's look-up stands
    found = ctx.sends.lookup_many(([own_id] if own_id else []) + _match_ids(item, c)) if body_seen else first.found
    if own_id and any(own_id in s.message_ids for s in found):
        summary["skipped"] = "a copy of one of our sends"
        return summary
    identity = _identity(mailbox, item, c)
    when, received = _reply_time(ctx, identity, bool(own_id), bool(found), mail, item,
                                 None if body_seen else first.earliest)
    summary["matched"] = list(dict.fromkeys(s.enrollment_id for s in found))
    if not found:
        metrics.UNMATCHED.labels(kind).inc()
        bound.debug("mail matched no send", kind=kind)  # counted in "job done" (unmatched, kinds)
        return summary

    decision, reused = _decide_once(ctx, fetcher, mailbox, item, c, body_seen, found, sender, when, received,
                                    identity, None if body_seen else first, bound)
    if reused:
        summary["decision"] = "reused"  # an earlier copy (another mailbox, folder or attempt) decided
    summary["kind"] = decision["kind"]
    if decision["kind"] == "auto_reply" and decision.get("return_date"):
        summary["return_date"] = decision["return_date"]
    summary["reply_time"] = decision["reply_time"]
    common = {"event_key": decision["event_key"], "by": sender, "item_id": item.item_id, "message_id": own_id,
              "mailbox": mailbox}
    for action in decision["actions"]:
        summary["actions"].append(_apply(ctx, mail, policy.Action(**action), common, decision["kind"], bound))
    return summary


def _decide_once(ctx: context.Context, fetcher: MailFetcher, mailbox: str, item: FetchedMessage, c: Classification,
                 body_seen: bool, found: list[Send], sender: str | None, when: dt.datetime, received: dt.datetime,
                 identity: str, first: _Ahead | None, bound: FilteringBoundLogger) -> tuple[dict, bool]:
    """The decision for this mail: the one an earlier copy stored, else this copy's (settled
    with the text when the headers look human, then ``policy.decide``), stored unless another
    worker stored one first. Returns (decision, whether it was an earlier copy's)."""
    key = keys.decision(identity)
    stored = first.decision if first is not None and first.decision_read else ctx.redis.get(key)
    if stored is not None:
        return _covering(ctx, fetcher, mailbox, item, c, body_seen, found, sender, json.loads(stored), bound), True
    if not body_seen and needs_text(c):
        c = _settle(fetcher, mailbox, item, c, when, bound, first.text if first is not None else None)
    settings = policy.PolicySettings.from_settings(ctx.settings)
    domain = policy.domain_to_check(c, found, mailbox, sender, settings)
    candidates = ctx.sends.domain_enrollments(domain) if domain else []
    actions = policy.decide(c, found, mailbox=mailbox, sender=sender, when=when, now=dt.datetime.now(dt.UTC),
                            settings=settings, domain_candidates=candidates)
    matched = sorted({s.enrollment_id for s in found})
    mine = _decision_json(c, event_key(c.kind, mailbox, item, c), when, received, actions, matched)
    stored = _DECIDE_ONCE(ctx.redis, decision=key, candidate=mine, ttl=int(ctx.settings.retention_days) * 86400)
    text = stored.decode() if isinstance(stored, bytes) else stored
    if text == mine:
        return json.loads(text), False
    return _covering(ctx, fetcher, mailbox, item, c, body_seen, found, sender, json.loads(text), bound), True


def _covering(ctx: context.Context, fetcher: MailFetcher, mailbox: str, item: FetchedMessage, c: Classification,
              body_seen: bool, found: list[Send], sender: str | None, decision: dict,
              bound: FilteringBoundLogger) -> dict:
    """An earlier copy's decision, plus actions for sends it did not match (a send recorded
    since, e.g. the id a mail server gave one of our sends): decided with the stored kind and
    times, so the copies still agree on everything the first one saw."""
    covered = set(decision.get("matched") or [a["enrollment_id"] for a in decision["actions"]])
    extra = [s for s in found if s.enrollment_id not in covered]
    if not extra:
        return decision
    if not body_seen and needs_text(c):
        c = _settle(fetcher, mailbox, item, c, _stored_time(decision["reply_time"]), bound)
    stored_return = decision.get("return_date")
    c = dataclasses.replace(  # the first copy's verdict, so extra sends are decided as it would have
        c, kind=decision["kind"], bounce_type=decision.get("bounce_type", c.bounce_type),
        failed_recipients=list(decision.get("failed_recipients", c.failed_recipients)),
        return_date=dt.date.fromisoformat(stored_return[:10]) if stored_return else None)
    when = _stored_time(decision["reply_time"])
    received = policy.parse_time(decision.get("received")) or when
    more = policy.decide(c, extra, mailbox=mailbox, sender=sender, when=when, now=dt.datetime.now(dt.UTC),
                         settings=policy.PolicySettings.from_settings(ctx.settings))
    plain = json.loads(_decision_json(c, decision["event_key"], when, received, more, []))["actions"]
    bound.info("decision of an earlier copy extended to sends recorded since", enrollments=[s.enrollment_id
                                                                                           for s in extra])
    return {**decision, "actions": decision["actions"] + plain}


def _stored_time(value: str) -> dt.datetime:
    """A time a stored decision holds: ``_decision_json`` writes an ISO string, so never None."""
    moment = policy.parse_time(value)
    if moment is None:
        raise ValueError(f"a stored decision holds no time: {value!r}")
    return moment


def _apply(ctx: context.Context, mail: NewMail, action: policy.Action, common: dict, kind: str,
           bound: FilteringBoundLogger) -> dict:
    """Carry out one action of the policy; its entry in the item's summary."""
    if action.action == policy.RECORD:
        _observe(ctx, action.enrollment_id, action.reason,
                 {**common, "failed_recipients": action.extra.get("failed_recipients")})
        return {"enrollment_id": action.enrollment_id, "action": "recorded"}
    if action.status is None:
        return {"enrollment_id": action.enrollment_id, "action": "none", "reason": action.reason}
    transition = ctx.enrollments.transition(action.enrollment_id, action.status, action.reason, **common,
                                            until=action.extra.get("until"))
    if transition is not None:
        metrics.TRANSITIONS.labels(action.status, action.reason).inc()
        if mail.seen_at:
            metrics.DELIVERY_TO_STOP.observe(max(0.0, time.time() - float(mail.seen_at)))
        bound.info("enrollment transition", enrollment_id=action.enrollment_id, status=action.status,
                   reason=action.reason, kind=kind, transition_id=transition.id,
                   paused_until=transition.paused_until)
    return {"enrollment_id": action.enrollment_id, "action": action.status, "reason": action.reason,
            "applied": transition is not None}


def handle_mail(payload: dict) -> dict:
    """Process one job (see the module docstring). Returns a JSON-safe summary."""
    job = get_current_job()  # None when called outside a worker (tests, tools)
    job_id = job.id if job is not None else None
    with structlog.contextvars.bound_contextvars(job_id=job_id):
        try:
            source, groups = _validate(payload)
        except InvalidPayload as exc:
            metrics.JOBS_PROCESSED.labels("invalid").inc()
            log.error("job payload invalid; failing without retry", error=str(exc))
            if job is not None:
                job.retries_left = 0  # a retry cannot fix it: straight to the failed registry
            raise
        if len(groups) == 1:
            return _handle_group(*groups[0], source)
        return _handle_groups(groups, source)


def _handle_group(mailbox: str, mails: list[NewMail], source: str, part: bool = False) -> dict:
    """The mails of one mailbox: the job's whole work, or (``part``) one part of a job of several
    mailboxes, whose failure is the caller's to handle and whose outbox the job delivers once."""
    started = time.monotonic()
    with structlog.contextvars.bound_contextvars(mailbox=mailbox):
        try:
            summary = _handle(mailbox, source, mails, notify=not part)
        except BaseTimeoutException:
            metrics.JOBS_PROCESSED.labels("timeout").inc()
            log.error("job timed out", items=len(mails), seconds=round(time.monotonic() - started, 2))
            raise
        except Exception as exc:
            if not part:
                metrics.JOBS_PROCESSED.labels("failed").inc()
                log.error("job failed", error=f"{type(exc).__name__}: {exc}", items=len(mails))
            raise
        metrics.JOBS_PROCESSED.labels("ok").inc()
        summary["seconds"] = round(time.monotonic() - started, 4)
        log.info("job done", outcome="ok", items=len(mails), kinds=summary["kinds"], transitions=summary["transitions"],
                 unmatched=summary["unmatched"], gone=summary["gone"], seconds=summary["seconds"])
        return summary


def _handle_groups(groups: list[tuple[str, list[NewMail]]], source: str) -> dict:
    """A job carrying mail of several mailboxes: each mailbox's part on its own. A part that
    fails does not fail the others: it goes on as a job of its own, on the retry schedule the
    shared job was on (its next retry is due when the shared job's would have been), so RQ's
    retries and the failed registry hold only that mailbox's mail. Once half the job's timeout
    is spent (a slow server), the parts not started go on as jobs of their own at once; and a
    shared job run again after a failure of its own (a timeout) only splits into its parts. If
    such a job cannot be enqueued, this whole job fails for RQ to retry (the parts that went
    through are then replayed: harmless, their decisions and transitions are stored once)."""
    ctx = context.get()
    ctx.fetcher(source)  # an unknown source fails the job as it is, not once per mailbox
    job = get_current_job()
    budget = (job.timeout or ctx.settings.job_timeout) / 2 if job is not None else None
    used = max(0, len(job.retry_intervals or []) - (job.retries_left or 0)) if job is not None else 0
    retries = len(job.retry_intervals or []) if job is not None else ctx.settings.job_retries
    started = time.monotonic()
    parts: list[dict] = []
    later: list[tuple[str, list[NewMail], str, float, int]] = []  # (mailbox, mails, why, delay, retries used)
    for index, (mailbox, mails) in enumerate(groups):
        if used:
            later.extend((m, ms, "the shared job failed before; each mailbox goes on alone", 0.0, used)
                         for m, ms in groups[index:])
            break
        if budget is not None and time.monotonic() - started > budget:
            later.extend((m, ms, "half the job's timeout spent before its turn", 0.0, used) for m, ms in groups[index:])
            break
        try:
            parts.append(_handle_group(mailbox, mails, source, part=True))
        except BaseTimeoutException:
            raise  # RQ's job timeout: the job ends here and is retried whole
        except Exception as exc:  # noqa: BLE001 - split off below
            # this attempt counts as one of the part's tries: it goes on as the shared job's retry would
            later.append((mailbox, mails, f"{type(exc).__name__}: {exc}"[:500], queueing.retry_delay(used), used + 1))
            metrics.JOBS_PROCESSED.labels("split").inc()
            log.warning("mail of one mailbox failed inside a shared job; it goes on in a job of its own",
                        mailbox=mailbox, items=len(mails), error=f"{type(exc).__name__}: {exc}")
    split = []
    for mailbox, mails, why, delay, spent in later:
        try:
            again = _split_off(ctx, job, mailbox, mails, source, delay, retries, spent)
        except BaseTimeoutException:
            raise
        except Exception as enqueue_error:  # the job is retried whole instead
            log.error("could not split off a mailbox's mail; the whole job is retried", mailbox=mailbox,
                      error=f"{type(enqueue_error).__name__}: {enqueue_error}")
            raise RuntimeError(f"mail of {mailbox} could not go on alone ({why})") from enqueue_error
        split.append({"mailbox": mailbox, "items": len(mails), "job_id": again.id if again else None, "error": why})
    if split:
        log.info("parts of a shared job go on as jobs of their own", parts=len(split),
                 split_job_ids=[s["job_id"] for s in split])
    if split or any(p["transitions"] for p in parts):  # a failed part may have made transitions too
        _notify(ctx)
    return {"mailboxes": [m for m, _ in groups], **_tally([i for p in parts for i in p["items"]]), "split": split}


def _split_off(ctx: context.Context, job: Any, mailbox: str, mails: list[NewMail], source: str, delay: float,
               retries: int, used: int) -> Any:
    """Enqueue one mailbox's part of a shared job as a job of its own, due ``delay`` s from now,
    with ``used`` of its ``retries`` spent, carrying what the shared job counted for its mails
    (``nowhere_attempts``)."""
    attempts = (job.meta.get("nowhere_attempts") or {}) if job is not None else {}
    carried = {m.item_id: attempts[m.item_id] for m in mails if m.item_id in attempts}
    return queueing.enqueue_later(queueing.make_queue(ctx.redis, ctx.settings.queue_name), mails, delay,
                                  retries=retries, job_timeout=ctx.settings.job_timeout, source=source,
                                  failure_ttl=max(queueing.FAILURE_TTL, ctx.settings.processed_days * 86400),
                                  meta={"nowhere_attempts": carried} if carried else None, retries_used=used)


NOWHERE_RETRIES = 2  # a job that finds its mail nowhere is retried this often before saying so


class NotFoundYet(RuntimeError):
    """The mail is nowhere we can see *yet*: a move may not be recorded yet (the listener lags,
    or is catching up). The job is retried (RQ's backoff) before the mail is reported gone."""


def _retry_before_nowhere(mail: NewMail, exc: ItemGone, bound: FilteringBoundLogger) -> None:
    """Raise ``NotFoundYet`` while this job has retries and has not used ``NOWHERE_RETRIES``."""
    job = get_current_job()
    if job is None or not job.retries_left:
        return
    attempts = job.meta.setdefault("nowhere_attempts", {})  # per item: one job may carry several
    tried = int(attempts.get(mail.item_id, 0))
    if tried >= NOWHERE_RETRIES:
        return
    attempts[mail.item_id] = tried + 1
    job.save_meta()
    bound.info("mail not found anywhere yet; the job is retried before it is reported gone", reason=str(exc),
               attempt=tried + 1)
    raise NotFoundYet(f"item …{mail.item_id[-16:]} not found yet ({exc})")


def _gone(mail: NewMail, exc: ItemGone, outcome: str, bound: FilteringBoundLogger) -> dict:
    metrics.ITEMS_GONE.labels(outcome).inc()
    bound.warning("mail exists nowhere" if outcome == "nowhere" else "mail cannot be read", reason=str(exc))
    return {"item_id": mail.item_id, "kind": None, "gone": True, "gone_reason": str(exc), "matched": [], "actions": []}


def _item(ctx: context.Context, fetcher: MailFetcher, mailbox: str, mail: NewMail, fetched: FetchedMessage | ItemGone,
          ahead: dict[str, _Ahead], marks: list[tuple[str | None, str]], bound: FilteringBoundLogger) -> dict:
    """One item, wherever it is now: a gone item is looked for (``fetcher.relocate``) and
    processed where it was found; only one that exists nowhere is reported gone. What the
    ledger is to mark processed is added to ``marks``."""
    relocate = getattr(fetcher, "relocate", None)
    relocated = False
    for _ in range(MAX_RELOCATIONS + 1):
        if isinstance(fetched, ItemUnreadable):
            return _gone(mail, fetched, "unreadable", bound)
        if isinstance(fetched, ItemGone):
            if relocate is None:
                return _gone(mail, fetched, "nowhere", bound)
            try:
                found = relocate(mailbox, mail)
            except ItemUnreadable as exc:
                return _gone(mail, exc, "unreadable", bound)
            except ItemGone as exc:
                found = exc
            if not isinstance(found, FetchedMessage):
                gone = found if isinstance(found, ItemGone) else fetched
                _retry_before_nowhere(mail, gone, bound)
                return _gone(mail, gone, "nowhere", bound)
            metrics.ITEMS_GONE.labels("relocated").inc()
            bound.info("mail found elsewhere", now_item_id=found.item_id, reason=str(fetched))
            fetched, relocated = found, True
        try:
            summary = _process(ctx, fetcher, mailbox, mail, fetched, ahead, bound)
        except ItemGone as exc:  # it moved while we read it (e.g. fetching its MIME)
            fetched = exc
            continue
        metrics.CLASSIFIED.labels(summary["kind"]).inc()
        message_id = normalize(fetched.internet_message_id)
        # the ledger keys the item the job carried, as the listener's catch-up computes it
        marks.append((message_id, mail.item_id))
        if relocated:
            summary.update(item_id=mail.item_id, relocated=True, relocated_item_id=fetched.item_id)
            if not message_id:  # identified by item id only: a catch-up would meet it under the new one
                marks.append((None, fetched.item_id))
        return summary
    # every pass that did not return ended on the ItemGone its _process raised
    return _gone(mail, cast(ItemGone, fetched), "nowhere", bound)


def _handle(mailbox: str, source: str, mails: list[NewMail], notify: bool = True) -> dict:
    ctx = context.get()
    fetcher = ctx.fetcher(source)
    items, errors = [], []
    marks: list[tuple[str | None, str]] = []
    fetched_all = _fetch(fetcher, mailbox, mails)
    try:
        ahead = _prepare(ctx, fetcher, mailbox, list(zip(mails, fetched_all)))
    except BaseTimeoutException:
        raise
    except (ValueError, TypeError, KeyError) as exc:  # one bad stored value must not fail the whole job
        log.warning("batched look-ups failed; each item looks itself up", error=f"{type(exc).__name__}: {exc}")
        ahead = {}
    finished = False
    try:
        for mail, fetched in zip(mails, fetched_all):
            bound = log.bind(item_id=mail.item_id)
            if isinstance(fetched, Exception) and not isinstance(fetched, ItemGone):
                bound.error("item could not be fetched", error=f"{type(fetched).__name__}: {fetched}")
                errors.append(f"{mail.item_id[-16:]}: {type(fetched).__name__}: {fetched}")
                continue
            try:
                items.append(_item(ctx, fetcher, mailbox, mail, fetched, ahead, marks, bound))
            except BaseTimeoutException:
                raise  # RQ's job timeout: the job must end here, not go on to the next item
            except Exception as exc:  # noqa: BLE001 - one bad item must not cost the others their processing
                bound.error("item failed", error=f"{type(exc).__name__}: {exc}")
                errors.append(f"{mail.item_id[-16:]}: {type(exc).__name__}: {exc}")
        finished = True
    finally:
        if not finished:  # RQ's job timeout ended the job half-way: keep the marks of the items done
            _mark_after_interruption(ctx, mailbox, marks)
    ctx.ledger.mark_processed_many(mailbox, marks)  # after every transition of the job, so a catch-up never skips one
    summary = {"mailbox": mailbox, **_tally(items)}
    if summary["transitions"] and notify:
        _notify(ctx)
    if errors:
        raise ItemsFailed(f"{len(errors)} of {len(mails)} item(s) failed: " + "; ".join(errors)[:2000])
    return summary


def _tally(items: list[dict]) -> dict:
    """A job's (or a part's) summary counts, from its items' summaries."""
    return {
        "items": items,
        "kinds": dict(collections.Counter(i["kind"] for i in items if i["kind"])),
        "transitions": sum(1 for i in items for a in i["actions"] if a.get("applied")),
        "unmatched": sum(1 for i in items if i["kind"] and not i["matched"] and not i.get("skipped")),
        "gone": sum(1 for i in items if i.get("gone")),
    }


def _mark_after_interruption(ctx: context.Context, mailbox: str, marks: list[tuple[str | None, str]]) -> None:
    """The marks of the items a cut-short job finished, so its retry does not redo them; a failure
    here is logged, never raised over what ended the job (RQ retries it either way)."""
    try:
        ctx.ledger.mark_processed_many(mailbox, marks)
    except BaseTimeoutException:
        raise
    except Exception as exc:  # noqa: BLE001 - the exception that ended the job is the one to report
        log.warning("could not mark the finished items processed", error=f"{type(exc).__name__}: {exc}")


def _fetch(fetcher: MailFetcher, mailbox: str, mails: list[NewMail]) -> list:
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


def _notify(ctx: context.Context) -> None:
    """Deliver the outbox now; a failure here is retried by the worker's drain timer."""
    if not ctx.notifier.channels:  # Redis state only: nothing to deliver now; the worker's timer clears the outbox
        return
    try:
        ctx.notifier.drain()
    except BaseTimeoutException:
        raise  # RQ's job timeout fired while delivering: end the job, the outbox keeps the rest
    except Exception as exc:  # noqa: BLE001 - the transitions are safe in the outbox; say so and go on
        log.warning("notification drain failed; will retry", error=f"{type(exc).__name__}: {exc}")
