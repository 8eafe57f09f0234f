"""What every listener process does, whatever its mail source (EWS streams, Graph notifications).

A listener holds the leases of its fair share of the watched mailboxes of its source
(``settings.source``), publishes its liveness, and enqueues every new mail a source reports.
Nothing is lost on the way to the queue:

- new mail is enqueued at once (stream mail by the sink's thread, which may put what arrived
  together in one job); while Redis is unreachable it waits in memory (``Sink``) and is
  flushed when Redis is back, in slices between lease renewals, so a backlog never costs the
  leases;
- catch-ups (``CatchUps``) run on a few threads, one run per mailbox at a time, retried with
  backoff; a source asks for one after every gap;
- when the Redis behind the URL changes (a failover, a restart), every held mailbox is caught up,
  since the last jobs and states written may be missing.

A source's listener (``listener.ews``, ``listener.graph``) subclasses ``BaseListener`` and fills
in how a mailbox is taken, dropped, caught up and stopped.
"""
from __future__ import annotations

import collections
import contextlib
import os
import queue as queue_mod
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import redis

from exchange_listener import queueing
from exchange_listener.core import logs, metrics, redis_conn
from exchange_listener.core.backoff import Backoff
from exchange_listener.core.config import Settings, scrub
from exchange_listener.listener import leases as leases_mod
from exchange_listener.listener import mailboxes as mailboxes_mod
from exchange_listener.sources.base import MAX_MAILS_PER_JOB, NewMail
from exchange_listener.sources.ledger import Ledger

REDIS_ERRORS = (redis.exceptions.RedisError,  # unreachable, loading, read-only after a failover, OOM: all buffered
                OSError)
BUFFER_LIMIT = 200_000  # mails held in memory (while Redis is away, or handed to the sink and not sent yet);
# beyond it, catch-up recovers them
CATCHUP_THREADS = 4
SHUTDOWN_BUDGET = 5.0  # seconds of cleanup; supervisord kills after 10, so keep a margin for a loaded host
FLUSH_SLICE_SECONDS = 0.25  # held mail enqueued per main-loop tick, so leases keep renewing meanwhile

T = TypeVar("T")
Folders = set[str] | None  # some folders (a checkpoint), or None: the whole mailbox


class Sink:
    """Enqueue new mail; while Redis is unreachable, hold it in memory and flush later.

    Stream mail (``put``) is handed to the sink's own thread, so a stream never waits on Redis.
    The thread enqueues whatever is pending when it comes round, up to ``MAX_MAILS_PER_JOB``
    mails: a lone mail goes out at once (no added wait), and mail that arrives during one
    enqueue forms the next batch. While a job waits in the queue (the workers are behind), a
    batch of several mailboxes is one job, so RQ's per-job cost is shared by many mails; else it
    is one job per mailbox, for idle workers to take in parallel. Catch-ups call ``enqueue``,
    which enqueues now or raises.
    """

    def __init__(self, conn: redis.Redis, settings: Settings, source: str = "ews"):
        self.queue = queueing.make_queue(conn, settings.queue_name)
        self.settings = settings
        self.source = source
        self.buffer: collections.deque[Sequence[NewMail]] = collections.deque()  # held while Redis is away
        self.overflowed = False
        self._lock = threading.Lock()
        self._pending: collections.deque[NewMail] = collections.deque()  # handed over, not yet enqueued
        self._wake = threading.Condition(self._lock)
        self._sending = 0  # mails the thread is enqueuing right now
        self._held = 0  # mails in ``buffer``
        self._thread: threading.Thread | None = None
        self._closing = False
        self._lost: set[str] = set()  # mailboxes whose mail was dropped on an error other than Redis'
        self.log = logs.get_logger()

    def enqueue(self, mails: Sequence[NewMail]) -> None:
        """Enqueue now or raise (used by catch-up, which must not advance its state otherwise)."""
        job = queueing.enqueue_new_mail(self.queue, mails, retries=self.settings.job_retries,
                                        job_timeout=self.settings.job_timeout, source=self.source,
                                        failure_ttl=max(queueing.FAILURE_TTL, self.settings.processed_days * 86400))
        if job is not None:
            metrics.JOBS_ENQUEUED.labels(mails[0].via).inc()
            self.log.debug("enqueued", mailbox=mails[0].mailbox, job_id=job.id, items=len(mails), via=mails[0].via)

    def put(self, mails: Sequence[NewMail]) -> None:
        """Hand stream mail to the sink's thread; never raises, never waits on Redis."""
        with self._lock:
            if self.buffer or self._closing:  # Redis is away (or we are stopping): behind what is held
                for start in range(0, len(mails), MAX_MAILS_PER_JOB):  # held as the jobs flush will make
                    self._hold(mails[start:start + MAX_MAILS_PER_JOB])
                return
            if len(self._pending) + self._sending + len(mails) > BUFFER_LIMIT:  # Redis slower than mail comes
                self.overflowed = True  # the main loop has every mailbox caught up
                return
            self._pending.extend(mails)
            self._start_thread()
            self._wake.notify()

    def in_memory(self) -> int:
        """Mails not enqueued yet: held while Redis is away, or handed over and not sent yet."""
        with self._lock:
            return self._held + len(self._pending) + self._sending

    def take_lost(self) -> set[str]:
        """Mailboxes whose mail could not be enqueued for a reason other than Redis (a bug): the
        mail was dropped from memory, so the caller has them caught up."""
        with self._lock:
            lost, self._lost = self._lost, set()
            return lost

    def check(self) -> None:
        """Start the thread again if it is gone with mail pending (it never should be)."""
        with self._lock:
            if self._pending and not self._closing:
                self._start_thread()

    def _start_thread(self) -> None:
        """With the lock held: a thread serving ``_pending``, if none is alive. If none can be
        started, the pending mail is held for the main loop's flush."""
        if self._thread is not None and self._thread.is_alive():
            return
        thread = threading.Thread(target=self._send_pending, name="sink", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of threads or memory
            self._thread = None
            self._hold_pending()
            self.log.error("cannot start the sink's thread; the main loop enqueues held mail", error=str(exc))
            return
        self._thread = thread

    def _next_batch(self) -> list[NewMail]:
        """With the lock held: up to ``MAX_MAILS_PER_JOB`` pending mails, each once."""
        batch: list[NewMail] = []
        seen: set[tuple[str, str]] = set()
        while self._pending and len(batch) < MAX_MAILS_PER_JOB:
            mail = self._pending.popleft()
            key = (mail.mailbox.lower(), mail.item_id)
            if key not in seen:  # the same item reported twice is one mail
                seen.add(key)
                batch.append(mail)
        return batch

    def _send_pending(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    self._thread = None
                    self._wake.notify_all()
                    return
                batch = self._next_batch()
                self._sending = len(batch)
            error: Exception | None = None
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - kept below; the thread must outlive any error
                error = exc
            with self._lock:
                self._sending = 0
                first = not self.buffer
                if isinstance(error, REDIS_ERRORS):
                    self._hold(batch)
                    self._hold_pending()  # behind the batch, in order; put() holds from now on
                elif error is not None:  # a bug: holding it would fail every flush; a catch-up finds it
                    self._lost.update(m.mailbox for m in batch)
                self._wake.notify_all()
            if error is not None:  # logged once the mail is safe
                with contextlib.suppress(Exception):
                    if not isinstance(error, REDIS_ERRORS):
                        self.log.error("enqueue failed; the mailboxes are caught up instead",
                                       error=f"{type(error).__name__}: {error}",
                                       mailboxes=len({m.mailbox for m in batch}), items=len(batch))
                    elif first:
                        self.log.warning("Redis unreachable; holding new mail in memory until it is back",
                                         error=str(error))

    def _send(self, batch: list[NewMail]) -> None:
        """One job for ``batch`` while workers are behind (a job waits in the queue: sharing RQ's
        cost then drains the queue sooner), else one job per mailbox, so that idle workers take
        the mailboxes in parallel (each mailbox costs a job its own round trips to the server)."""
        by_mailbox: dict[str, list[NewMail]] = {}
        for mail in batch:
            by_mailbox.setdefault(mail.mailbox.lower(), []).append(mail)
        if len(by_mailbox) == 1 or self.queue.count > 0:
            self.enqueue(batch)
            return
        for mails in by_mailbox.values():  # an error part-way holds the whole batch (a part sent may run twice)
            self.enqueue(mails)

    def _hold_pending(self) -> None:
        """With the lock held: move what is pending into ``buffer``, in order."""
        while self._pending:
            self._hold(self._next_batch())

    def close(self, deadline: float) -> None:
        """Let the thread send what was handed over (until ``deadline``, a monotonic time); what
        is still pending then is held, for ``flush``. Later ``put``s hold too."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
                self._wake.wait(max(0.0, deadline - time.monotonic()))
            self._hold_pending()

    def _hold(self, mails: Sequence[NewMail]) -> None:
        if self._held + len(mails) > BUFFER_LIMIT:
            self.overflowed = True  # the oldest stay; catch-up finds the rest once Redis is back
            return
        self.buffer.append(mails)
        self._held += len(mails)

    def flush(self, budget: float | None = None) -> int:
        """Enqueue what was held, for at most ``budget`` seconds (None: all of it); returns how
        many jobs went out. Raises while Redis is still away."""
        sent = 0
        until = None if budget is None else time.monotonic() + budget
        while until is None or time.monotonic() < until:
            with self._lock:
                if not self.buffer:
                    break
                mails = self.buffer[0]
            try:
                self.enqueue(mails)
            except REDIS_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug: it would fail every flush; a catch-up finds the mail
                self.log.error("enqueue of held mail failed; the mailboxes are caught up instead",
                               error=f"{type(exc).__name__}: {exc}", items=len(mails))
                with self._lock:
                    self._lost.update(m.mailbox for m in mails)
            with self._lock:
                self.buffer.popleft()
                self._held -= len(mails)
            sent += 1
        if sent:
            self.log.info("Redis is back; enqueued held mail", jobs=sent, still_held=self.in_memory())
        return sent


class CatchUps(Generic[T]):
    """Catch-up work for mailboxes, on a few threads, at most one run per mailbox at a time.

    A request names a mailbox and either some folders (a checkpoint) or the whole mailbox (after
    a gap); requests for a mailbox already waiting are merged. ``run(state, mailbox, reason,
    folders)`` does one run with the calling thread's own ``state`` (``make_state(i)``: e.g. an
    HTTP session per thread); a run that raises is retried with backoff, its work merged into
    the next one, so nothing asked for is forgotten.
    """

    def __init__(self, holds: Callable[[str], bool], run: Callable[[T, str, str, Folders], None],
                 make_state: Callable[[int], T], settings: Settings, threads: int = CATCHUP_THREADS):
        self.holds = holds
        self.run = run
        self.settings = settings
        self._queue: queue_mod.Queue[str] = queue_mod.Queue()
        self._lock = threading.Lock()
        self._queued: dict[str, tuple[str, Folders]] = {}  # mailbox -> (reason, folders or None = all)
        self._running: set[str] = set()
        self._again: dict[str, tuple[str, Folders]] = {}
        self._retry: dict[str, tuple[float, Backoff, str, Folders]] = {}
        self.log = logs.get_logger()
        for i in range(threads):
            threading.Thread(target=self._work, args=(make_state(i),), name=f"catchup-{i}", daemon=True).start()

    @staticmethod
    def _merge(old: tuple[str, Folders] | None, reason: str, folders: Folders) -> tuple[str, Folders]:
        if old is None:
            return reason, (set(folders) if folders is not None else None)
        if old[1] is None or folders is None:
            return (old[0] if old[1] is None else reason), None
        return old[0], old[1] | set(folders)

    def request(self, mailboxes: Iterable[str], reason: str, folders: Folders = None) -> None:
        now = time.monotonic()
        with self._lock:
            for mailbox in mailboxes:
                waiting = self._retry.get(mailbox)
                if mailbox in self._running:
                    self._again[mailbox] = self._merge(self._again.get(mailbox), reason, folders)
                elif waiting is not None and waiting[0] > now:
                    # its last run failed: this work joins the retry, which keeps its backoff (a
                    # request every tick must not make a failing mailbox a call per second)
                    self._retry[mailbox] = (waiting[0], waiting[1],
                                            *self._merge((waiting[2], waiting[3]), reason, folders))
                elif mailbox in self._queued:
                    self._queued[mailbox] = self._merge(self._queued[mailbox], reason, folders)
                else:
                    self._queued[mailbox] = self._merge(None, reason, folders)
                    self._queue.put(mailbox)

    def retry_due(self) -> None:
        """Queue the retries that came due (once: the run that starts takes the entry over)."""
        now = time.monotonic()
        with self._lock:
            due = [(m, r, f) for m, (at, _b, r, f) in self._retry.items()
                   if at <= now and m not in self._queued and m not in self._running]
        for mailbox, reason, folders in due:
            self.request([mailbox], reason, folders)

    def pending(self) -> int:
        with self._lock:
            return len(self._queued) + len(self._running) + len(self._retry)

    def _work(self, state: T) -> None:
        while True:
            mailbox = self._queue.get()
            with self._lock:
                reason, folders = self._queued.pop(mailbox, ("again", None))
                pending = self._retry.pop(mailbox, None)  # a failed run's work is part of this one
                if pending is not None:
                    reason, folders = self._merge((pending[2], pending[3]), reason, folders)
                    backoff = pending[1]
                else:
                    backoff = None
                self._running.add(mailbox)
            try:
                if self.holds(mailbox):
                    self.run(state, mailbox, reason, folders)
            except Exception as exc:  # noqa: BLE001 - retried with backoff; nothing is lost meanwhile
                with self._lock:
                    backoff = backoff or Backoff(base=1.0, cap=60.0)
                    delay = backoff.next()
                    self._retry[mailbox] = (time.monotonic() + delay, backoff, reason, folders)
                self.log.warning("catch-up failed; will retry", mailbox=mailbox, reason=reason,
                                 error=scrub(f"{type(exc).__name__}: {exc}", self.settings)[:300],
                                 retry_in=round(delay, 1))
            finally:
                with self._lock:
                    self._running.discard(mailbox)
                    again = self._again.pop(mailbox, None)
                if again:
                    self.request([mailbox], *again)


class BaseListener:
    """The loop every listener runs: liveness, the watched set of its source, fair-share leases,
    held mail flushed, Redis identity checked; the source's work in ``_take``/``_drop``/``_tick``."""

    source = "ews"
    catchups: CatchUps[Any]

    def __init__(self, settings: Settings):
        settings.require("redis_url")
        self.settings = settings
        self.listener_id = settings.listener_id or f"{socket.gethostname()}-{os.getpid()}"
        self.conn = redis_conn.connect(settings.redis_url, socket_timeout=5.0)
        self.leases = leases_mod.Leases(self.conn, self.listener_id, settings.lease_seconds, source=self.source)
        self.ledger = Ledger(self.conn, processed_days=settings.processed_days)
        self.sink = Sink(self.conn, settings, source=self.source)
        self.log = logs.get_logger(listener=self.listener_id, source=self.source)
        self.watched: dict[str, float] = {}
        self._version_seen: int | None = None
        self._set_missing = False
        self._stop = threading.Event()
        self._redis_ok = True
        self._redis_run_id: str | None = None
        self._activity_lock = threading.Lock()
        self._active: dict[str, tuple[float, set[str]]] = {}  # mailbox -> (first new mail, folders) since its checkpoint
        self.started_at = time.time()

    # -- what a source fills in ----------------------------------------------------------------
    def held(self) -> list[str]:
        """The mailboxes this listener watches now."""
        raise NotImplementedError

    def holds(self, mailbox: str) -> bool:
        raise NotImplementedError

    def _take(self, mailboxes: list[str]) -> None:
        """Start watching ``mailboxes`` (their leases are ours)."""
        raise NotImplementedError

    def _drop(self, mailboxes: list[str]) -> None:
        """Stop watching ``mailboxes`` (released, lost, or no longer watched at all)."""
        raise NotImplementedError

    def _tick(self) -> None:
        """The source's periodic work, once per main-loop tick (about a second)."""

    def _source_info(self) -> dict[str, Any]:
        return {}

    def _stop_source(self, deadline: float) -> dict[str, Any]:
        """Stop the source's threads and connections by ``deadline``; returns fields for the log."""
        return {}

    def _banner(self) -> dict[str, Any]:
        return {}

    # -- shared --------------------------------------------------------------------------------
    def _note_activity(self, mailbox: str, folders: set[str]) -> None:
        with self._activity_lock:
            since, known = self._active.get(mailbox, (time.monotonic(), set()))
            self._active[mailbox] = (since, known | folders)

    def _checkpoints(self) -> None:
        """Catch up the folders that had new mail, once per ``checkpoint_seconds`` per mailbox."""
        due_before = time.monotonic() - self.settings.checkpoint_seconds
        with self._activity_lock:
            due = {m: f for m, (since, f) in self._active.items() if since <= due_before}
            for mailbox in due:
                del self._active[mailbox]
        for mailbox, folders in due.items():
            if self.holds(mailbox):
                self.catchups.request([mailbox], "checkpoint", folders)

    def stop(self, *_args: object) -> None:
        self._stop.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        metrics.serve(self.settings.metrics_port)
        self.log.info("listener starting", lease_seconds=self.settings.lease_seconds, **self._banner())
        redis_conn.check_at_start(self.conn, allow_volatile=self.settings.allow_volatile_redis, log=self.log)
        self._redis_run_id = self._run_id()
        tick = min(1.0, self.settings.lease_seconds / 3)
        balance_every = max(tick, self.settings.lease_seconds / 3)
        next_balance = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self._publish()
                changed = self._poll_mailboxes()
                if changed or now >= next_balance:
                    self._balance()
                    self._check_redis_identity()
                    next_balance = now + balance_every
                if self.sink.buffer:
                    self.sink.flush(budget=FLUSH_SLICE_SECONDS)
                if self.sink.overflowed:
                    self.sink.overflowed = False
                    self.catchups.request(self.held(), "buffer_overflow")
                self.sink.check()
                lost = self.sink.take_lost()
                if lost:
                    self.catchups.request([m for m in lost if self.holds(m)], "enqueue_failed")
                if not self._redis_ok:
                    self._redis_ok = True
                    self.log.info("Redis reachable again")
                    self._check_redis_identity()
            except REDIS_ERRORS as exc:
                if self._redis_ok:
                    self._redis_ok = False
                    self.log.warning("Redis unreachable; sources keep running, new mail is held in memory",
                                     error=str(exc))
            self.catchups.retry_due()
            self._checkpoints()
            self._tick()
            self._stop.wait(tick)
        return self._shutdown()

    def _run_id(self) -> str | None:
        try:
            return redis_conn.server_run_id(self.conn)
        except REDIS_ERRORS:
            return None

    def _check_redis_identity(self) -> None:
        """Another server behind the URL (a failover, a restart) may lack the last writes before
        it: the jobs just enqueued, the sync states just stored. Catch every held mailbox up.
        Checked every balance: redis-py retries commands, so a quick restart may raise nothing."""
        run_id = self._run_id()
        if run_id and self._redis_run_id and run_id != self._redis_run_id:
            self.log.warning("Redis changed under us (failover or restart); catching up every mailbox we hold, "
                             "since its last writes may be missing", mailboxes=len(self.held()))
            self.catchups.request(self.held(), "redis_changed")
            redis_conn.check_at_start(self.conn, allow_volatile=self.settings.allow_volatile_redis, log=self.log)
        self._redis_run_id = run_id or self._redis_run_id

    def _poll_mailboxes(self) -> bool:
        version = mailboxes_mod.version(self.conn)
        if version is None and self._version_seen is not None:
            if self.watched and not self._set_missing:
                self._set_missing = True
                self.log.error("the watched-mailbox set is missing from Redis (data loss?); keeping the current set "
                               "until `exchange-listener mailboxes add` writes it again", mailboxes=len(self.watched))
            return False
        was_missing, self._set_missing = self._set_missing, False
        if version == self._version_seen and self._version_seen is not None and not was_missing:
            return False
        self.watched = mailboxes_mod.list_all(self.conn, source=self.source)
        self._version_seen = version if version is not None else 0
        return True

    def _balance(self) -> None:
        watched = sorted(self.watched)
        held = self.held()
        live = max(1, len(self.leases.live_listeners()))
        holders = self.leases.holders([m for m in watched if not self.holds(m)])
        to_claim, to_release = leases_mod.plan(watched, held, holders, live, self.listener_id)
        releasing = set(to_release)
        keep = [m for m in held if m not in releasing]
        got = set(self.leases.claim(keep + to_claim))
        lost = [m for m in keep if m not in got]
        if lost:
            self.log.warning("lost leases to another listener", mailboxes=len(lost))
        self._drop(to_release + lost)
        if to_release:
            self.leases.release(to_release)
        new = [m for m in to_claim if m in got]
        if new:
            self._take(new)
        if to_release or new or lost:
            self.log.info("mailboxes rebalanced", took=len(new), released=len(to_release), lost=len(lost),
                          holding=len(self.held()), live_listeners=live)

    def _info(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": self.started_at,
                "source": self.source, "mailboxes": len(self.held()), "held_in_memory": self.sink.in_memory(),
                "catchups_pending": self.catchups.pending(), **self._source_info()}

    def _publish(self) -> None:
        self.leases.heartbeat(self._info())

    def _shutdown(self) -> int:
        deadline = time.monotonic() + SHUTDOWN_BUDGET
        held = self.held()
        self.log.info("listener stopping", mailboxes=len(held))
        summary = self._stop_source(deadline)
        self.sink.close(deadline)
        try:
            if self.sink.buffer:
                self.sink.flush()
            self.leases.release(held)
            self.leases.leave()
        except REDIS_ERRORS as exc:
            self.log.warning("could not release leases; they expire on their own (mail still in memory is found "
                             "by the next holder's catch-up)", error=str(exc), in_memory=self.sink.in_memory())
        self.log.info("listener stopped", in_memory=self.sink.in_memory(), **summary)
        return 0
