"""Enrollment state in Redis: each transition happens exactly once, with an audit trail and outbox.

An enrollment is active, paused (until a time; an out-of-office) or stopped (terminal: replied,
bounced, ...). ``transition`` is one Lua script, so replays, duplicate jobs and concurrent workers
cannot apply the same event twice, and the notification for a transition is written to the
outbox in the same atomic step (``workers.sinks.webhooks`` delivers it; a crash loses nothing).

API::

    store = EnrollmentStore(redis, retention_days=settings.retention_days, pause_days=settings.pause_days)
    store.get(enrollment_id) -> dict | None       # effective state; None if unknown
    store.get_many(ids) -> list[dict | None]      # one round trip
    store.history(enrollment_id) -> list[dict]    # every transition, oldest first (Transition.to_fields())
    store.transitions(enrollment_id) -> list[Transition]   # the same, as Transition objects
    store.transition(enrollment_id, status, reason, *, event_key, by=None, item_id=None,
                     message_id=None, mailbox=None, until=None) -> Transition | None
    store.resume(enrollment_id, by, *, force=False) -> Transition | None   # operators
    store.ensure(enrollment_id, sequence_id="", mailbox="", prospect="")   # create as active if missing

Rules of ``transition`` (``None`` means nothing changed):
- the same ``event_key`` for the same enrollment applies at most once, ever (within retention);
  use a key that names the cause, e.g. ``f"{status}:{mailbox}:{item_id}"``;
- ``stopped`` is terminal: nothing but ``resume(force=True)`` leaves it;
- a pause never overrides a stop; a stop overrides a pause; a pause may only extend a pause;
- a pause whose ``paused_until`` has passed counts as active (``get`` reports ``active``,
  reason ``pause_expired``);
- ``until`` (datetime, date or ISO string; naive = UTC) defaults to now + ``pause_days``.

Fields of ``get``: enrollment_id, status, reason, updated_at (ISO 8601 UTC), paused_until,
stopped_by, by, item_id, message_id, mailbox, sequence_id, created_at, version (number of
transitions), prospect (the first ``to`` address of the first recorded send). Empty values are
``None``.

A platform reading Redis directly (instead of ``exchange-listener enrollments show``) checks
``status`` and, when it is ``paused``, ``paused_until_ms`` (epoch ms): past it, sending may resume.
A missing hash means an unknown enrollment (never recorded, or past its retention).

Redis keys (named in ``exchange_listener.core.keys``; all expire ``retention_days`` after their last write):
- ``el:enrollment:{id}``          hash: the fields above (+ ``paused_until_ms``, ``updated_at_ms``)
- ``el:enrollment:{id}:events``   set: event keys already seen (the exactly-once guard)
- ``el:enrollment:{id}:history``  list: JSON transitions, oldest first
- ``el:transition:{tid}``         string: JSON of one transition (``workers.state.transitions``), read by the notifier
- ``el:outbox``                   zset: transition id -> epoch ms when it may next be delivered
- ``el:transitions``              stream: every transition (field ``data`` = JSON), capped
  at ~100,000 entries, for anyone who wants to follow along (XREAD)

A transition's id is ``sha256(enrollment_id + "\\n" + event_key)[:32]``: stable across replays,
so webhook receivers can deduplicate by it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from redis.client import Pipeline

from exchange_listener.core import keys
from exchange_listener.core.config import default
from exchange_listener.core.lua import Script
from workers.state.transitions import Transition

OUTBOX_KEY = keys.OUTBOX
STREAM_KEY = keys.TRANSITIONS
STREAM_MAXLEN = 100_000
STATUSES = ("active", "paused", "stopped")
FIELDS = ("status", "reason", "updated_at", "paused_until", "stopped_by", "by", "item_id", "message_id",
          "mailbox", "sequence_id", "created_at", "version", "prospect")


enrollment_key = keys.enrollment
transition_key = keys.transition


def transition_id(enrollment_id: str, event_key: str) -> str:
    return hashlib.sha256(f"{enrollment_id}\n{event_key}".encode()).hexdigest()[:32]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def to_utc(value: dt.datetime | dt.date | str) -> dt.datetime:
    """A datetime, date or ISO 8601 string as an aware UTC datetime (naive means UTC)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            raise ValueError(f"not an ISO 8601 date/time: {value!r}") from None
    if not isinstance(value, dt.datetime):  # a date: the start of that day, UTC
        value = dt.datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


_TRANSITION = Script("enrollment_transition")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text or None


class EnrollmentStore:
    """Read and change enrollment state; see the module docstring for rules and keys."""

    def __init__(self, redis_client: redis.Redis, retention_days: int = default("retention_days"),
                 pause_days: int = default("pause_days")):
        self.redis = redis_client
        self.ttl = int(retention_days) * 86400
        self.pause_days = pause_days

    # -- reading -------------------------------------------------------------------------
    def _view(self, enrollment_id: str, raw: Mapping[bytes | str, bytes | str]) -> dict[str, Any] | None:
        if not raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        view: dict[str, Any] = {"enrollment_id": enrollment_id, **{name: data.get(name) for name in FIELDS}}
        view["status"] = view["status"] or "active"
        view["version"] = int(view["version"] or 0)
        until_ms = data.get("paused_until_ms")
        if view["status"] == "paused" and until_ms and int(until_ms) <= utcnow().timestamp() * 1000:
            view["status"], view["reason"] = "active", "pause_expired"
        return view

    def get(self, enrollment_id: str) -> dict[str, Any] | None:
        return self._view(enrollment_id, self.redis.hgetall(enrollment_key(enrollment_id)))

    def get_many(self, enrollment_ids: Iterable[str]) -> list[dict[str, Any] | None]:
        ids = list(enrollment_ids)
        pipe = self.redis.pipeline(transaction=False)
        for eid in ids:
            pipe.hgetall(enrollment_key(eid))
        return [self._view(eid, raw) for eid, raw in zip(ids, pipe.execute())]

    def transitions(self, enrollment_id: str) -> list[Transition]:
        """Every transition of the enrollment, oldest first."""
        return [Transition.from_json(item) for item in self.redis.lrange(keys.enrollment_history(enrollment_id), 0, -1)]

    def history(self, enrollment_id: str) -> list[dict[str, Any]]:
        return [t.to_fields() for t in self.transitions(enrollment_id)]

    # -- writing -------------------------------------------------------------------------
    def ensure_commands(self, pipe: Pipeline, enrollment_id: str, sequence_id: str = "", mailbox: str = "",
                        prospect: str = "") -> None:
        """Queue on ``pipe`` the commands that create the enrollment as active if it is missing.

        ``prospect``: the first ``to`` address of its first recorded send (kept once set), which
        the Salesforce sink looks up; a colleague's reply still belongs to this prospect."""
        key = enrollment_key(enrollment_id)
        now = iso(utcnow())
        pipe.hsetnx(key, "status", "active")
        pipe.hsetnx(key, "reason", "enrolled")
        pipe.hsetnx(key, "created_at", now)
        pipe.hsetnx(key, "updated_at", now)
        pipe.hsetnx(key, "version", 0)
        if sequence_id:
            pipe.hsetnx(key, "sequence_id", sequence_id)
        if mailbox:
            pipe.hsetnx(key, "mailbox", mailbox)
        if prospect:
            pipe.hsetnx(key, "prospect", prospect)
        for live_key in (key, keys.enrollment_events(enrollment_id), keys.enrollment_history(enrollment_id)):
            # the audit trail lives as long as the state
            pipe.expire(live_key, self.ttl)

    def ensure(self, enrollment_id: str, sequence_id: str = "", mailbox: str = "", prospect: str = "") -> None:
        pipe = self.redis.pipeline(transaction=True)
        self.ensure_commands(pipe, enrollment_id, sequence_id, mailbox, prospect)
        pipe.execute()

    def transition(self, enrollment_id: str, status: str, reason: str, *, event_key: str, by: str | None = None,
                   item_id: str | None = None, message_id: str | None = None, mailbox: str | None = None,
                   until: dt.datetime | dt.date | str | None = None, _reopen: bool = False) -> Transition | None:
        """Apply ``status`` once per ``event_key``; the applied Transition, or None if nothing changed."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)} (got {status!r})")
        if not enrollment_id or not event_key:
            raise ValueError("enrollment_id and event_key are required")
        now = utcnow()
        until_iso, until_ms = "", "0"
        if status == "paused":
            moment = to_utc(until) if until is not None else now + dt.timedelta(days=self.pause_days)
            until_iso, until_ms = iso(moment), str(int(moment.timestamp() * 1000))
        tid = transition_id(enrollment_id, event_key)
        # what the script does not fill in (Transition.FROM_STATE) is stored as given here
        draft = Transition(id=tid, enrollment_id=enrollment_id, status=status, previous_status="", reason=reason or "",
                           at=iso(now), event_key=event_key, version=0, by=by or None, item_id=item_id or None,
                           message_id=message_id or None, mailbox=mailbox or None, paused_until=until_iso or None)
        payload = _TRANSITION(
            self.redis, enrollment=keys.enrollment(enrollment_id), events=keys.enrollment_events(enrollment_id),
            history=keys.enrollment_history(enrollment_id), outbox=keys.OUTBOX, transition=keys.transition(tid),
            stream=keys.TRANSITIONS, draft=draft.to_json(), until_ms=until_ms, now_ms=int(now.timestamp() * 1000),
            ttl=self.ttl, reopen="1" if _reopen else "0", stream_maxlen=STREAM_MAXLEN)
        return Transition.from_json(payload) if payload else None

    def resume(self, enrollment_id: str, by: str, *, force: bool = False) -> Transition | None:
        """Operator action: lift a pause (and, with ``force``, reopen a stopped enrollment)."""
        return self.transition(enrollment_id, "active", "resumed", event_key=f"resume:{uuid.uuid4().hex}",
                               by=by, _reopen=force)
