"""Reading the transition stream (``el:transitions``) for platforms: pages, long-polls, SSE.

A cursor is a stream entry id (``<ms>-<seq>``); a page holds the entries strictly after it, so
handing back ``next`` continues exactly where the last page ended, skipping and repeating
nothing. The stream is capped (~100,000 entries, ``workers.state.enrollments``): a cursor older
than the oldest entry simply continues from the oldest one kept.

Waiting for new entries does not cost a Redis connection per waiting client: one ``Follower``
per process blocks in XREAD on its own connection and bumps a generation number whenever
entries arrive (or its connection failed, which may have hidden some); waiting requests sleep on
that number and then read their page with XRANGE.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
from typing import Any, cast

import redis

from exchange_listener.core import keys, logs, redis_conn
from workers.state.transitions import STREAM_FIELD, Transition

log = logs.get_logger(component="api")
CURSOR = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
MAX_ID = 2**64 - 1
BLOCK_MS = 2000  # one XREAD of the follower; also how long a stop may wait for it


class CursorExpired(Exception):
    """The cursor is older than the oldest entry kept, and entries have been trimmed: some of
    what followed it may be gone. ``oldest``: the oldest kept entry's cursor (None: none kept);
    ``resume_after``: the cursor to pass to continue from the oldest kept entry."""

    def __init__(self, cursor: str, oldest: str | None, resume_after: str):
        super().__init__(f"cursor {cursor} fell behind the stream's trim")
        self.cursor, self.oldest, self.resume_after = cursor, oldest, resume_after


class CursorAhead(Exception):
    """The cursor is beyond the newest id the stream has generated (``newest``)."""

    def __init__(self, cursor: str, newest: str):
        super().__init__(f"cursor {cursor} is beyond the stream's newest id {newest}")
        self.cursor, self.newest = cursor, newest


def _key(cursor: str) -> tuple[int, int]:
    ms, _, seq = cursor.partition("-")
    return int(ms), int(seq or 0)


def parse_cursor(value: str) -> str | None:
    """``value`` as a stream id, or None if it is not one."""
    if not CURSOR.fullmatch(value):
        return None
    ms, seq = (int(part) for part in value.split("-"))
    return f"{ms}-{seq}" if ms <= MAX_ID and seq <= MAX_ID else None


def _decode(entry_id: bytes | str, fields: dict[Any, Any]) -> dict[str, Any] | None:
    raw = fields.get(STREAM_FIELD.encode()) or fields.get(STREAM_FIELD) if fields else None
    try:
        transition = Transition.from_json(raw or "")
    except (AttributeError, TypeError, ValueError):  # not a transition: skipped, the cursor still moves on
        return None
    return {"cursor": redis_conn.text(entry_id), **transition.to_fields()}


def page(conn: redis.Redis, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str]:
    """Up to ``limit`` transitions after the cursor ``after`` (None: from the oldest kept), and
    the cursor to continue from (``after`` itself when there is nothing new; without ``after``,
    the newest id the stream generated, ``0-0`` for no stream).
    ``CursorExpired`` / ``CursorAhead`` when ``after`` is behind the trim / beyond the stream."""
    start = "-" if after is None else "(" + after
    pipe = conn.pipeline(transaction=True)  # the check and the page see the same stream
    pipe.exists(keys.TRANSITIONS)
    pipe.xinfo_stream(keys.TRANSITIONS)  # an error when there is no stream: only then ignored
    last = after == f"{MAX_ID}-{MAX_ID}"  # nothing can follow it (and XRANGE refuses it exclusive)
    if not last:
        pipe.xrange(keys.TRANSITIONS, min=start, max="+", count=limit)
    exists, info, *rest = pipe.execute(raise_on_error=False)
    raw = rest[0] if rest else []
    for reply in (exists, raw) if not exists else (exists, info, raw):
        if isinstance(reply, Exception):
            raise reply
    if not exists:
        info = None  # no stream (yet): nothing was trimmed, nothing generated
    if after is not None:
        _check(after, info)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], raw)
    items = [item for item in (_decode(i, f) for i, f in entries) if item is not None]
    if entries:
        following = redis_conn.text(entries[-1][0])
    else:  # nothing new: the newest id, never one behind a trim that would expire at once
        following = after or (redis_conn.text(info["last-generated-id"]) if info else "0-0")
    return items, following


def _check(after: str, info: dict[str, Any] | None) -> None:
    newest = redis_conn.text(info["last-generated-id"]) if info else "0-0"
    if _key(after) > _key(newest):
        raise CursorAhead(after, newest)
    if not info or int(info.get("entries-added") or 0) <= int(info["length"]):
        return  # nothing was ever removed: every cursor up to the newest is whole
    first = info.get("first-entry")
    if first and first[0] is not None:  # the id just before the oldest kept: nothing can lie between
        ms, seq = _key(redis_conn.text(first[0]))
        oldest: str | None = f"{ms}-{seq}"
        resume = f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{MAX_ID}"
    else:  # everything was trimmed
        oldest, resume = None, newest
    if _key(after) < _key(resume):
        raise CursorExpired(after, oldest, resume)


def event(item: dict[str, Any]) -> bytes:
    """One transition as a server-sent event: its cursor is the event id."""
    return f"id: {item['cursor']}\nevent: transition\ndata: {json.dumps(item)}\n\n".encode()


class Follower:
    """Blocks in XREAD on the stream and wakes waiting requests when entries arrive."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn  # its own client: a socket timeout longer than BLOCK_MS
        self.generation = 0
        self.closing = False  # the server stops: waiting requests and event streams end now
        self.changed = asyncio.Condition()
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="api-follower")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last: str | None = None
        failing = False
        while True:
            try:
                if last is None:  # the newest entry now: anything later wakes the waiters
                    newest = await loop.run_in_executor(self.executor, self._newest)
                    last = newest
                reply = await loop.run_in_executor(self.executor, self._read, last)
                if failing:
                    log.info("transition stream readable again")
                    failing = False
            except redis.exceptions.RedisError as exc:
                if not failing:
                    log.warning("cannot follow the transition stream; retrying", error=type(exc).__name__)
                    failing = True
                last = None  # entries may have come and gone unseen: wake everyone once back
                await self._bump()
                await asyncio.sleep(1.0)
                continue
            if reply:
                last = redis_conn.text(reply[0][1][-1][0])
                await self._bump()

    def _newest(self) -> str:
        found = cast(list[tuple[bytes, Any]], self.conn.xrevrange(keys.TRANSITIONS, count=1))
        return redis_conn.text(found[0][0]) if found else "0-0"

    def _read(self, last: str) -> Any:
        return self.conn.xread({keys.TRANSITIONS: last}, count=1000, block=BLOCK_MS)

    async def _bump(self) -> None:
        async with self.changed:
            self.generation += 1
            self.changed.notify_all()

    async def wait(self, generation: int, timeout: float) -> bool:
        """True once the generation differs from ``generation``; False after ``timeout`` s."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.generation != generation), timeout)
            except TimeoutError:
                return False
        return True

    async def release(self) -> None:
        """Wake every waiting request for good (the server is stopping)."""
        self.closing = True
        await self._bump()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
