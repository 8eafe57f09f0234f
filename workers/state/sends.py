"""The send registry: which enrollment each outbound Message-ID belongs to, kept for a retention.

A reply names the sends it answers in In-Reply-To/References; a bounce carries the original
Message-ID. Both are looked up here in one round trip. A send may carry several Message-IDs
(the one we set and the one the mail server assigned, e.g. Amazon SES rewrites it); each id
points at the whole send. Recording a send also creates its enrollment (active) if missing.

API::

    registry = SendRegistry(redis, retention_days=settings.retention_days)
    registry.record(message_ids, enrollment_id, sequence_id, mailbox, to, cc=(), sent_at=None) -> Send
    registry.validate(...same arguments...) -> SendDraft   # record's checks only, nothing stored
    registry.draft(fields) -> SendDraft   # one send as a JSON object (INPUT_FIELDS): import, the HTTP API
    registry.record_many(drafts, all_or_nothing=False) -> list[Send | ValueError]  # one transaction
                                                                   # (at most BATCH_LIMIT drafts)
    registry.record_batches(batches) -> Iterator[list[Send | ValueError]]  # record_many each, pipelined
    registry.get(message_id) -> Send | None
    registry.lookup_many(message_ids) -> list[Send]   # distinct sends, in the order first matched
    registry.enrollments_for_domain(domain) -> list[str]   # enrollments sent to anyone @domain
    registry.domain_enrollments(domain) -> list[DomainEnrollment]   # the same, with first/last sent_at

Message-IDs are stored normalized (``exchange_listener.mail.message_ids.normalize``), so ``<A@x>``, ``A@x``
and `` <A@x> `` all find the same send. Recording an id that already belongs to another
enrollment raises ``ValueError`` and changes nothing; recording it again for the same
enrollment merges the id lists and keeps the earlier ``sent_at`` (a send goes out once; adding
the id the mail server assigned later must not move it past the replies that answer it).
A send's keys, its domain index entries and its enrollment are written by one script in one
MULTI/EXEC (``core/scripts/send_batch.lua``): never half of them, for one send or a batch.

Redis keys (named in ``exchange_listener.core.keys``):
- ``el:send:{normalized message id}``  string: JSON of the Send; expires ``retention_days``
  after ``sent_at``
- ``el:domain:{domain}``               zset: enrollment id -> epoch seconds of its latest send to
  a ``to`` address at that (lower-cased) domain; entries older than the retention are trimmed
- ``el:domain:{domain}:first``         zset: enrollment id -> epoch seconds of its first send to
  that domain (the domain rule stops only enrollments whose first send precedes the reply);
  trimmed together with the entry above
- ``el:enrollment:{id}``               created active if missing (see ``workers.state.enrollments``)
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import redis

from exchange_listener.core import keys, redis_conn
from exchange_listener.core.config import default
from exchange_listener.core.lua import Script
from exchange_listener.mail.message_ids import normalize
from workers.state.enrollments import EnrollmentStore, iso, to_utc, utcnow

INPUT_FIELDS = ("message_id", "message_ids", "enrollment", "sequence", "mailbox", "to", "cc", "sent_at")
# The most sends one ``record_many`` transaction should take: it WATCHes every id of the batch and
# WATCH costs Redis the square of a batch's ids, so 1,000 sends (~4x an import batch's keys)
# stall Redis for every other client. The HTTP API refuses larger requests.
BATCH_LIMIT = 250
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps with separators builds an encoder a call
_WRITE = Script("send_batch")  # send keys, domain indexes and enrollments of a batch, at once


# an address with nothing for parseaddr to take apart (it gives such a one back unchanged, and
# costs ~5 µs an address: a tenth of a bulk import's time)
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
# "Display Name <local@domain>" with a name of plain words and a dot-atom address: parseaddr gives
# the address inside the brackets (checked against it on random near-misses), at ~15 µs a call
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_NAMED_ADDRESS = re.compile(rf"[A-Za-z0-9]+(?: [A-Za-z0-9]+)* <([{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


class BadSend(ValueError):
    """Unusable send input; ``field`` names the input field at fault (an ``INPUT_FIELDS`` name, or
    an unknown field), so a caller can point at it (the HTTP API's problem ``field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class SendConflict(BadSend):
    """A Message-ID of the send already belongs to another enrollment (found when recording)."""


def _string(data: Mapping[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise BadSend(name, f"{name}: must be a string")
    _encodable(name, value)
    return value


def _strings(data: Mapping[str, Any], name: str) -> list[str]:
    """A list of strings; one string alone is taken as that list of one (as ``record`` takes it)."""
    value = data[name]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadSend(name, f"{name}: must be a list of strings")
    for item in value:
        _encodable(name, item)
    return value


def _encodable(name: str, value: str) -> None:
    """A JSON ``\\u`` escape can make a lone surrogate, which cannot be sent to Redis as UTF-8."""
    if value.isascii():  # the usual case, checked in C (most of a bulk import's strings)
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSend(name, f"{name}: not UTF-8: a \\u escape makes a lone surrogate") from None


def _domain(address: str) -> str | None:
    _, at, domain = address.strip().rpartition("@")
    return domain.strip().strip(">").lower() or None if at else None


@dataclasses.dataclass(frozen=True)
class DomainEnrollment:
    """An enrollment with a send to a ``to`` address at some domain: when its first and its
    latest such send went out (aware UTC)."""

    enrollment_id: str
    first_sent_at: dt.datetime
    last_sent_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Send:
    message_ids: tuple[str, ...]
    enrollment_id: str
    sequence_id: str
    mailbox: str
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    sent_at: str = ""  # ISO 8601 UTC

    def as_dict(self) -> dict[str, Any]:
        # the fields in order; dataclasses.asdict deep-copies each (a fifth of a bulk import's time)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    def to_json(self) -> str:
        return _COMPACT.encode(self.as_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> Send:
        data = json.loads(raw)
        if data.keys() == _SEND_FIELDS:  # what to_json writes: no loop, no filter (a re-import reads one a line)
            return cls(tuple(data["message_ids"] or ()), data["enrollment_id"], data["sequence_id"], data["mailbox"],
                       tuple(data["to"] or ()), tuple(data["cc"] or ()), data["sent_at"])
        for name in ("message_ids", "to", "cc"):
            data[name] = tuple(data.get(name) or ())
        return cls(**{k: v for k, v in data.items() if k in _SEND_FIELDS})  # tolerate fields a newer version adds


_SEND_FIELDS = frozenset(f.name for f in dataclasses.fields(Send))


@dataclasses.dataclass(frozen=True)
class SendDraft:
    """A send's input, checked and normalized by ``SendRegistry.validate``, before it meets what
    is stored (``record_many`` merges it with an earlier send of the same ids)."""

    message_ids: tuple[str, ...]  # normalized, distinct
    enrollment_id: str
    sequence_id: str
    mailbox: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    sent_at: dt.datetime  # aware UTC


def _merge(draft: SendDraft, stored: Iterable[Send | None]) -> tuple[Send, dt.datetime]:
    """The Send to store for ``draft`` given the sends its ids hold now, and its sent_at: the id
    lists merged, the earlier sent_at kept; ValueError if an id belongs to another enrollment."""
    merged, moment = list(draft.message_ids), draft.sent_at
    for old in stored:
        if old is None:
            continue
        if old.enrollment_id != draft.enrollment_id:
            raise SendConflict("message_id", f"message id already recorded for enrollment {old.enrollment_id!r}")
        merged += [m for m in old.message_ids if m not in merged]
        if old.sent_at:
            moment = min(moment, to_utc(old.sent_at))
    return Send(tuple(merged), draft.enrollment_id, draft.sequence_id, draft.mailbox, draft.to, draft.cc,
                iso(moment)), moment


def _resp(args: Sequence[str | int]) -> bytes:
    """One command in Redis's wire protocol, as redis-py's ``pack_command`` packs it (UTF-8,
    ints in decimal) at a third of its cost: a batch's EVAL carries ~1,500 keys, and packing
    them was a fifth of a bulk import's time."""
    data = [a.encode() if isinstance(a, str) else _int(a) for a in args]
    return b"".join([b"*%d\r\n" % len(data), *[b"$%d\r\n%b\r\n" % (len(d), d) for d in data]])


def _int(value: object) -> bytes:
    if type(value) is not int:  # a float would be cut, a bool sent as 1: refuse, as redis-py does for bools
        raise TypeError(f"_resp packs str and int only, not {type(value).__name__}")
    return b"%d" % value


def _watched(drafts: Sequence[SendDraft]) -> list[str]:
    """The send keys of the drafts' ids, each once: what a batch reads and WATCHes."""
    return list(dict.fromkeys(keys.send(m) for draft in drafts for m in draft.message_ids))


def _addresses(values: Iterable[str] | str, what: str) -> tuple[str, ...]:
    """Bare addresses ("Jane <jane@x.example>" is stored as jane@x.example), so every later
    comparison (bounced recipient, domain policy) is address to address."""
    values = [values] if isinstance(values, str) else list(values)
    cleaned = []
    for value in (v.strip() for v in values if v and v.strip()):
        if any(c in value for c in "\r\n"):
            raise BadSend(what, f"{what}: not an email address: {value!r}")
        if _PLAIN_ADDRESS.fullmatch(value):
            address = value
        else:
            named = _NAMED_ADDRESS.fullmatch(value)
            address = named.group(1) if named else email.utils.parseaddr(value)[1] or value
        if "@" not in address:
            raise BadSend(what, f"{what}: not an email address: {value!r}")
        cleaned.append(address)
    return tuple(cleaned)


class SendRegistry:
    """Record and look up outbound sends; see the module docstring for keys and rules."""

    def __init__(self, redis_client: redis.Redis, retention_days: int = default("retention_days")):
        self.redis = redis_client
        self.retention = dt.timedelta(days=int(retention_days))
        self.enrollments = EnrollmentStore(redis_client, retention_days=retention_days)

    def validate(self, message_ids: Sequence[str] | str, enrollment_id: str, sequence_id: str, mailbox: str,
                 to: Sequence[str] | str, cc: Sequence[str] | str = (),
                 sent_at: dt.datetime | str | None = None) -> SendDraft:
        """The checked, normalized input of ``record`` (nothing read or written); ValueError
        naming the field when it is unusable."""
        ids = [message_ids] if isinstance(message_ids, str) else list(message_ids)
        normalized = []
        for raw in ids:
            mid = normalize(raw) if raw else None
            if not mid:
                raise BadSend("message_id", f"message id: not a Message-ID: {raw!r}")
            if mid not in normalized:
                normalized.append(mid)
        if not normalized:
            raise BadSend("message_id", "message id: at least one is required")
        if not enrollment_id or not str(enrollment_id).strip():
            raise BadSend("enrollment", "enrollment: required")
        to_addrs, cc_addrs = _addresses(to, "to"), _addresses(cc, "cc")
        if not to_addrs:
            raise BadSend("to", "to: at least one recipient is required")
        try:
            given = to_utc(sent_at) if sent_at is not None else utcnow()
        except ValueError as exc:
            raise BadSend("sent_at", f"sent_at: {exc}") from None
        if given + self.retention <= utcnow():
            raise BadSend("sent_at", f"sent_at {iso(given)} is older than the retention ({self.retention.days} days)")
        return SendDraft(tuple(normalized), enrollment_id, sequence_id or "", mailbox or "", to_addrs, cc_addrs, given)

    def draft(self, data: Any) -> SendDraft:
        """One send given as a JSON object (``INPUT_FIELDS``; cc and sent_at optional, message_id
        and message_ids together are one send's ids) checked as ``validate`` checks ``record``'s
        arguments; BadSend naming the field if it is unusable. ``sends import`` and the HTTP API
        take their sends through here."""
        if not isinstance(data, dict):
            raise BadSend("", "not a JSON object")
        unknown = sorted(set(data) - set(INPUT_FIELDS), key=str)
        if unknown:
            raise BadSend(unknown[0], f"unknown field {', '.join(map(repr, unknown))} (fields: {', '.join(INPUT_FIELDS)})")
        missing = [n for n in ("enrollment", "sequence", "mailbox", "to") if n not in data]
        if "message_id" not in data and "message_ids" not in data:
            missing.insert(0, "message_id")
        if missing:
            raise BadSend(missing[0], f"{'message_id (or message_ids)' if missing[0] == 'message_id' else missing[0]}"
                                      ": required")
        ids = ([_string(data, "message_id")] if "message_id" in data else []) + (
            _strings(data, "message_ids") if "message_ids" in data else [])
        cc = _strings(data, "cc") if data.get("cc") is not None else []
        sent_at = _string(data, "sent_at") if data.get("sent_at") is not None else None
        enrollment, sequence, mailbox = (_string(data, n) for n in ("enrollment", "sequence", "mailbox"))
        to = _strings(data, "to")
        try:
            return self.validate(ids, enrollment, sequence, mailbox, to, cc=cc, sent_at=sent_at)
        except BadSend as exc:
            if exc.field == "message_id" and "message_id" not in data:
                exc.field = "message_ids"
            raise

    def record(self, message_ids: Sequence[str] | str, enrollment_id: str, sequence_id: str, mailbox: str,
               to: Sequence[str] | str, cc: Sequence[str] | str = (), sent_at: dt.datetime | str | None = None) -> Send:
        result = self.record_many([self.validate(message_ids, enrollment_id, sequence_id, mailbox, to, cc, sent_at)])[0]
        if isinstance(result, ValueError):
            raise result
        return result

    def record_many(self, drafts: Sequence[SendDraft], *, all_or_nothing: bool = False) -> list[Send | ValueError]:
        """Record validated sends in one transaction: each result is the stored Send, or the
        ValueError that refused it (an id of another enrollment; nothing of it is stored). With
        ``all_or_nothing``, one refused send means none is stored (the results still say which).

        The drafts meet what is stored, and each other, in order, exactly as one ``record`` after
        another would; the ids are WATCHed and the writes are one script inside MULTI/EXEC, so
        the whole batch is written or none of it, and a concurrent change to an id reruns it."""
        watched = _watched(drafts)
        # what write made on its last run, the one whose EXEC went through (redis-py types
        # transaction's callable as returning None, so its value is not taken from there)
        results: list[Send | ValueError] = []

        def write(pipe: redis.client.Pipeline) -> None:
            planned, script = self._plan(drafts, watched, pipe.mget(watched))
            results[:] = planned
            pipe.multi()
            if script and not (all_or_nothing and any(isinstance(r, ValueError) for r in planned)):
                _WRITE(pipe, **script)

        if drafts:
            self.redis.transaction(write, *watched)
        return results

    def record_batches(self, batches: Iterable[Sequence[SendDraft]]) -> Iterator[list[Send | ValueError]]:
        """``record_many`` for each batch in turn, yielding each batch's results (a bulk import).

        While Redis runs one batch's script, the next batch is taken from ``batches``, so a
        caller that checks its input in a generator does that work meanwhile instead of waiting
        (half as many records a second again when a core is free). Each batch is still WATCH,
        MGET, MULTI/EXEC on one connection of the client's pool, rerun when an id changed in
        between; any error ends the iteration with the batch in flight written whole or not at
        all. An empty batch yields an empty list."""
        pool = self.redis.connection_pool
        conn: Any = pool.get_connection()  # redis-py leaves the Connection's methods unannotated
        try:
            upcoming = iter(batches)
            drafts = next(upcoming, None)
            while drafts is not None:
                if not drafts:
                    yield []
                    drafts = next(upcoming, None)
                    continue
                watched, following, pulled = _watched(drafts), None, False
                while True:
                    conn.send_packed_command([_resp(["WATCH", *watched]) + _resp(["MGET", *watched])])
                    conn.read_response()  # OK
                    results, script = self._plan(drafts, watched, conn.read_response())
                    commands = [_resp(["MULTI"])]
                    if script:
                        names, args = _WRITE.bind(**script)
                        commands.append(_resp(["EVAL", _WRITE.text, len(names), *names, *args]))
                    conn.send_packed_command([b"".join([*commands, _resp(["EXEC"])])])
                    if not pulled:
                        following, pulled = next(upcoming, None), True
                    for _ in commands:
                        conn.read_response()  # OK, QUEUED
                    reply = conn.read_response()
                    if reply is not None:  # None: a watched id changed since WATCH; plan again
                        break
                failed = [r for r in reply if isinstance(r, Exception)]
                if failed:
                    raise failed[0]
                yield results
                drafts = following
        except BaseException:
            conn.disconnect()  # a reply may be unread: the connection is not reused
            raise
        finally:
            pool.release(conn)

    def _plan(self, drafts: Sequence[SendDraft], watched: list[str],
              raws: Sequence[bytes | str | None]) -> tuple[list[Send | ValueError], dict[str, Any] | None]:
        """Each draft's result given what ``watched`` holds (``raws``), and the send_batch
        script's named arguments for the ones to store (None when there are none)."""
        stored: dict[str, Send | None] = {
            key: None if raw is None else Send.from_json(raw) for key, raw in zip(watched, raws)}
        results: list[Send | ValueError] = []
        names: list[str] = []
        args: list[tuple[int, int, str, str, str, str, str, str, str]] = []
        for draft in drafts:
            try:
                send, moment = _merge(draft, [stored[keys.send(m)] for m in draft.message_ids])
            except ValueError as exc:
                results.append(exc)
                continue
            results.append(send)
            stored.update((keys.send(m), send) for m in send.message_ids)
            domains = sorted({d for d in map(_domain, send.to) if d})
            names += [keys.send(m) for m in send.message_ids]
            for domain in domains:
                names += [keys.domain(domain), keys.domain_first(domain)]
            names += [keys.enrollment(send.enrollment_id), keys.enrollment_events(send.enrollment_id),
                      keys.enrollment_history(send.enrollment_id)]
            args.append((len(send.message_ids), len(domains), send.to_json(),
                         str(int((moment + self.retention).timestamp() * 1000)), send.enrollment_id,
                         repr(moment.timestamp()), send.sequence_id, send.mailbox, send.to[0] if send.to else ""))
        if not args:
            return results, None
        now = utcnow()
        return results, {"keys": names, "now": iso(now), "oldest": repr((now - self.retention).timestamp()),
                         "ttl": int(self.retention.total_seconds()), "sends": json.dumps(args, ensure_ascii=False)}

    def get(self, message_id: str) -> Send | None:
        found = self.lookup_many([message_id])
        return found[0] if found else None

    def lookup_many(self, message_ids: Iterable[str]) -> list[Send]:
        """The distinct sends any of ``message_ids`` belongs to (one MGET; unknown ids skipped)."""
        return self.lookup_each([message_ids])[0]

    def lookup_each(self, id_lists: Sequence[Iterable[str | None]]) -> list[list[Send]]:
        """``lookup_many`` for each list of ids (a job's mails), all in one MGET."""
        per_list = [list(dict.fromkeys(keys.send(n) for n in (normalize(i) if i else None for i in ids) if n))
                    for ids in id_lists]
        names = list(dict.fromkeys(name for list_names in per_list for name in list_names))
        stored = dict(zip(names, self.redis.mget(names))) if names else {}
        out = []
        for list_names in per_list:
            sends: list[Send] = []
            seen: set[str] = set()
            for name in list_names:
                raw = stored[name]
                if raw is None:
                    continue
                send = Send.from_json(raw)
                if not seen.intersection(send.message_ids):
                    sends.append(send)
                seen.update(send.message_ids)
            out.append(sends)
        return out

    def enrollments_for_domain(self, domain: str) -> list[str]:
        """Enrollments with a send to a ``to`` address at ``domain`` within the retention."""
        return [e.enrollment_id for e in self.domain_enrollments(domain)]

    def domain_enrollments(self, domain: str) -> list[DomainEnrollment]:
        """Like ``enrollments_for_domain``, with each enrollment's first and latest send to the
        domain (two round trips). An entry written before the first-send index existed reports
        its latest send as its first: later than the truth, so it can only make the domain
        rule more careful, never stop an enrollment that began after a reply."""
        name = domain.strip().lstrip("@")
        oldest = (utcnow() - self.retention).timestamp()
        # withscores: (member, score) pairs (redis-py's type covers every form of ZRANGE's reply)
        latest = cast(list[tuple[bytes | str, float]],
                      self.redis.zrangebyscore(keys.domain(name), oldest, "+inf", withscores=True))
        if not latest:
            return []
        members = [redis_conn.text(m) for m, _ in latest]
        firsts = self.redis.zmscore(keys.domain_first(name), members)

        def moment(score: float) -> dt.datetime:
            return dt.datetime.fromtimestamp(score, dt.UTC)

        return [DomainEnrollment(member, moment(first if first is not None else last), moment(last))
                for member, (_, last), first in zip(members, latest, firsts)]
