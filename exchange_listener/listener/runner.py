"""The long-lived listener: leases mailboxes, streams them in groups, enqueues every new mail.

One thread balances leases and publishes liveness (``leases``), one thread per group streams
(``sources.ews_stream``), a few threads catch up from SyncFolderItems state (``sync_state``).
Nothing is lost on the way to the queue:

- a stream event is enqueued at once; while Redis is unreachable it waits in memory
  (``Sink``) and is flushed when Redis is back;
- catch-up runs on start and after every reconnect, resubscribe, expiry, server restart and
  takeover, and its sync state only advances after its items are enqueued;
- while streaming, the folders that had new mail are checkpointed every ``checkpoint_seconds``
  (a catch-up that finds only processed mail), so a restart reads only the gap;
- a move (also to Deleted Items or Recoverable Items) is recorded in the ledger, so a worker
  whose item is gone follows it; mail in a folder made since the tree was read triggers a
  catch-up with the tree refreshed;
- mail held while Redis was away is flushed in slices between lease renewals, so a backlog
  never costs the leases.

SIGTERM (or SIGINT): streams are stopped, subscriptions removed, leases released; exit 0 well
within supervisord's 10 s.
"""
from __future__ import annotations

import collections
import os
import queue as queue_mod
import signal
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import redis

from exchange_listener import queueing
from exchange_listener.core import logs, metrics, redis_conn
from exchange_listener.core.backoff import Backoff
from exchange_listener.core.config import Settings, scrub
from exchange_listener.listener import leases as leases_mod
from exchange_listener.listener import mailboxes as mailboxes_mod
from exchange_listener.sources.base import NewMail
from exchange_listener.sources.ews import account as ews_account
from exchange_listener.sources.ews.catch_up import SyncStore, catch_up_mailbox
from exchange_listener.sources.ews.stream import StreamGroup
from exchange_listener.sources.ledger import Ledger

if TYPE_CHECKING:  # exchangelib's (untyped); account makes them
    from exchangelib import Configuration

REDIS_ERRORS = (redis.exceptions.RedisError,  # unreachable, loading, read-only after a failover, OOM: all buffered
                OSError)
BUFFER_LIMIT = 200_000  # mails held in memory while Redis is away; beyond it, catch-up recovers them
CATCHUP_THREADS = 4
SHUTDOWN_BUDGET = 5.0  # seconds of cleanup; supervisord kills after 10, so keep a margin for a loaded host
FLUSH_SLICE_SECONDS = 0.25  # held mail enqueued per main-loop tick, so leases keep renewing meanwhile
MAX_GROUP_SIZE = 200  # Exchange's limit of subscriptions per GetStreamingEvents; groups may grow to it


class Sink:
    """Enqueue new mail; while Redis is unreachable, hold it in memory and flush later."""

    def __init__(self, conn: redis.Redis, settings: Settings):
        self.queue = queueing.make_queue(conn, settings.queue_name)
        self.settings = settings
        self.buffer: collections.deque[Sequence[NewMail]] = collections.deque()
        self.overflowed = False
        self._lock = threading.Lock()
        self.log = logs.get_logger()

    def enqueue(self, mails: Sequence[NewMail]) -> None:
        """Enqueue now or raise (used by catch-up, which must not advance its state otherwise)."""
        job = queueing.enqueue_new_mail(self.queue, mails, retries=self.settings.job_retries,
                                        job_timeout=self.settings.job_timeout,
                                        failure_ttl=max(queueing.FAILURE_TTL, self.settings.processed_days * 86400))
        if job is not None:
            metrics.JOBS_ENQUEUED.labels(mails[0].via).inc()
            self.log.debug("enqueued", mailbox=mails[0].mailbox, job_id=job.id, items=len(mails), via=mails[0].via)

    def put(self, mails: Sequence[NewMail]) -> None:
        """Enqueue from a stream; never raises."""
        with self._lock:
            if self.buffer:
                self._hold(mails)
                return
        try:
            self.enqueue(mails)
        except REDIS_ERRORS as exc:
            with self._lock:
                if not self.buffer:
                    self.log.warning("Redis unreachable; holding new mail in memory until it is back", error=str(exc))
                self._hold(mails)

    def _hold(self, mails: Sequence[NewMail]) -> None:
        if len(self.buffer) >= BUFFER_LIMIT:
            self.overflowed = True  # the oldest stay; catch-up finds the rest once Redis is back
            return
        self.buffer.append(mails)

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
            self.enqueue(mails)
            with self._lock:
                self.buffer.popleft()
            sent += 1
        if sent:
            self.log.info("Redis is back; enqueued held mail", jobs=sent, still_held=len(self.buffer))
        return sent


class CatchUps:
    """Catch-up work for mailboxes, on a few threads, at most one run per mailbox at a time.

    A request names a mailbox and either some folders (a checkpoint) or the whole mailbox with
    its folder tree refreshed (after a gap); requests for a mailbox already waiting are merged.

    Each thread has a Protocol (one HTTP session) of its own. With one pool shared by the
    threads, exchangelib answers ErrorServerBusy by shrinking the pool, and threads then wait
    for a session without end (``Protocol.get_session``): whole mailboxes were never caught up
    after a busy spell (found by the chaos drill). A pool of one is never shrunk.
    """

    def __init__(self, listener: Listener, threads: int = CATCHUP_THREADS):
        self.listener = listener
        self._queue: queue_mod.Queue[str] = queue_mod.Queue()
        self._lock = threading.Lock()
        self._queued: dict[str, tuple[str, set[str] | None]] = {}  # mailbox -> (reason, folders or None = all)
        self._running: set[str] = set()
        self._again: dict[str, tuple[str, set[str] | None]] = {}
        self._retry: dict[str, tuple[float, Backoff, str, set[str] | None]] = {}
        self.log = logs.get_logger()
        for i in range(threads):
            config = ews_account.make_configuration(listener.settings, pool=f"{listener.listener_id}/sync-{i}",
                                                    max_connections=1)
            threading.Thread(target=self._work, args=(config,), name=f"catchup-{i}", daemon=True).start()

    @staticmethod
    def _merge(old: tuple[str, set[str] | None] | None, reason: str,
               folders: set[str] | None) -> tuple[str, set[str] | None]:
        if old is None:
            return reason, (set(folders) if folders is not None else None)
        if old[1] is None or folders is None:
            return (old[0] if old[1] is None else reason), None
        return old[0], old[1] | set(folders)

    def request(self, mailboxes: Iterable[str], reason: str, folders: set[str] | None = None) -> None:
        with self._lock:
            for mailbox in mailboxes:
                if mailbox in self._running:
                    self._again[mailbox] = self._merge(self._again.get(mailbox), reason, folders)
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

    def _work(self, config: Configuration) -> None:
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
                if self.listener.holds(mailbox):
                    self._catch_up(config, mailbox, reason, folders)
            except Exception as exc:  # noqa: BLE001 - retried with backoff; nothing is lost meanwhile
                with self._lock:
                    backoff = backoff or Backoff(base=1.0, cap=60.0)
                    delay = backoff.next()
                    self._retry[mailbox] = (time.monotonic() + delay, backoff, reason, folders)
                self.log.warning("catch-up failed; will retry", mailbox=mailbox, reason=reason,
                                 error=scrub(f"{type(exc).__name__}: {exc}", self.listener.settings)[:300],
                                 retry_in=round(delay, 1))
            finally:
                with self._lock:
                    self._running.discard(mailbox)
                    again = self._again.pop(mailbox, None)
                if again:
                    self.request([mailbox], *again)

    def _catch_up(self, config: Configuration, mailbox: str, reason: str, folders: set[str] | None) -> None:
        listener = self.listener
        account = ews_account.make_account(listener.settings, mailbox, config)
        account.protocol.TIMEOUT = 30
        total, watched = catch_up_mailbox(account, mailbox, listener.sync, listener.ledger, listener.sink.enqueue,
                                          added_at=listener.watched.get(mailbox),
                                          folders=sorted(folders) if folders is not None else None)
        if watched is not None:
            group = listener.group_of.get(mailbox)
            if group is not None:
                _, ignored = listener.sync.known(mailbox)
                group.set_folders(mailbox, watched, ignored)
        metrics.CATCHUPS.labels("checkpoint" if folders is not None else "full").inc()
        self.log.debug("caught up", mailbox=mailbox, reason=reason, items=total,
                       folders="all" if folders is None else len(folders))


class Listener:
    def __init__(self, settings: Settings):
        settings.require("ews_url", "redis_url")
        self.settings = settings
        self.listener_id = settings.listener_id or f"{socket.gethostname()}-{os.getpid()}"
        self.conn = redis_conn.connect(settings.redis_url, socket_timeout=5.0)
        self.leases = leases_mod.Leases(self.conn, self.listener_id, settings.lease_seconds)
        self.sync = SyncStore(self.conn)
        self.ledger = Ledger(self.conn, processed_days=settings.processed_days)
        self.sink = Sink(self.conn, settings)
        self.log = logs.get_logger(listener=self.listener_id)
        self.watched: dict[str, float] = {}
        self.groups: list[StreamGroup] = []
        self.group_of: dict[str, StreamGroup] = {}
        self._group_seq = 0
        self._version_seen: int | None = None
        self._set_missing = False
        self._stop = threading.Event()
        self._redis_ok = True
        self._redis_run_id: str | None = None
        self._activity_lock = threading.Lock()
        self._active: dict[str, tuple[float, set[str]]] = {}  # mailbox -> (first new mail, folders) since its checkpoint
        self._full_groups: list[StreamGroup] = []  # groups the server refused a connection for
        self.catchups = CatchUps(self)
        self.started_at = time.time()

    # -- callbacks from stream threads -----------------------------------------------------
    def holds(self, mailbox: str) -> bool:
        return mailbox in self.group_of

    def _on_mail(self, mails: Sequence[NewMail], *, subscription_id: str, group: str) -> None:
        for mail in mails:  # one job per item, the id a catch-up gives it too (RQ dedupes the twins)
            self.sink.put([mail])
        self._note_activity(mails[0].mailbox, {m.folder for m in mails})
        self.log.debug("new mail", mailbox=mails[0].mailbox, group=group, subscription_id=subscription_id,
                       items=len(mails))

    def _note_activity(self, mailbox: str, folders: set[str]) -> None:
        with self._activity_lock:
            since, known = self._active.get(mailbox, (time.monotonic(), set()))
            self._active[mailbox] = (since, known | folders)

    def _on_subscribed(self, mailboxes: Iterable[str], reason: str) -> None:
        self.catchups.request(mailboxes, reason)

    def _on_unknown_folder(self, mailbox: str, folder_id: str, first: bool = True) -> None:
        if first:
            self.log.info("new mail in a folder not known yet; reading the folder tree and catching up",
                          mailbox=mailbox, folder=folder_id)
        self.catchups.request([mailbox], "new_folder")  # requests merge: a burst costs one more run

    def _on_moves(self, mailbox: str, moves: Sequence[tuple[str, str]], moved_into: Iterable[str] = ()) -> None:
        """Record moves for workers whose item is gone, and have the folders mail was moved into
        checkpointed: mail moved there that no job covers (moved before a stream saw it, or before
        the move was recorded) is found by the checkpoint; processed mail is skipped there."""
        if moved_into:
            self._note_activity(mailbox, set(moved_into))
        if not moves:
            return
        try:
            self.ledger.record_moves(mailbox, moves)
        except REDIS_ERRORS as exc:  # the next full catch-up finds the moved mail in its new folder
            self.log.warning("could not record moved mail; a catch-up will find it", mailbox=mailbox,
                             error=str(exc), moves=len(moves))
            self.catchups.request([mailbox], "moves_unrecorded")

    def _on_limit(self, group: StreamGroup) -> None:
        with self._activity_lock:
            if group not in self._full_groups:
                self._full_groups.append(group)

    def _checkpoints(self) -> None:
        """Catch up the folders that had new mail, once per ``checkpoint_seconds`` per mailbox."""
        due_before = time.monotonic() - self.settings.checkpoint_seconds
        with self._activity_lock:
            due = {m: f for m, (since, f) in self._active.items() if since <= due_before}
            for mailbox in due:
                del self._active[mailbox]
        for mailbox, folders in due.items():
            if mailbox in self.group_of:
                self.catchups.request([mailbox], "checkpoint", folders)

    def _reform(self) -> None:
        """Fold groups the server refused a connection for into groups with room (fewer connections)."""
        with self._activity_lock:
            full, self._full_groups = self._full_groups, []
        for group in full:
            if group not in self.groups or not group.assigned:
                continue
            others = [g for g in self.groups if g is not group and g.size() < MAX_GROUP_SIZE]
            moving = sorted(group.assigned)
            moved = []
            for target in sorted(others, key=lambda g: -g.size()):
                room = MAX_GROUP_SIZE - target.size()
                batch, moving = moving[:room], moving[room:]
                if batch:
                    target.add(batch)
                    for mailbox in batch:
                        self.group_of[mailbox] = target
                    moved += batch
                if not moving:
                    break
            if moved:
                group.remove(moved)
                self.log.warning("server refused another streaming connection; moved mailboxes into other groups",
                                 group=group.id, moved=len(moved), left=len(group.assigned))
            if not group.assigned:
                group.stop()
                self.groups.remove(group)

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self, *_args: object) -> None:
        self._stop.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        metrics.serve(self.settings.metrics_port)
        self.log.info("listener starting", ews_url=self.settings.ews_url, group_size=self.settings.group_size,
                      lease_seconds=self.settings.lease_seconds)
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
                        self.catchups.request(list(self.group_of), "buffer_overflow")
                if not self._redis_ok:
                    self._redis_ok = True
                    self.log.info("Redis reachable again")
                    self._check_redis_identity()
            except REDIS_ERRORS as exc:
                if self._redis_ok:
                    self._redis_ok = False
                    self.log.warning("Redis unreachable; streams keep running, new mail is held in memory",
                                     error=str(exc))
            self.catchups.retry_due()
            self._checkpoints()
            self._reform()
            for group in self.groups:
                group.poke()
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
                             "since its last writes may be missing", mailboxes=len(self.group_of))
            self.catchups.request(list(self.group_of), "redis_changed")
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
        self.watched = mailboxes_mod.list_all(self.conn)
        self._version_seen = version if version is not None else 0
        return True

    def _balance(self) -> None:
        watched = sorted(self.watched)
        held = list(self.group_of)
        live = max(1, len(self.leases.live_listeners()))
        holders = self.leases.holders([m for m in watched if m not in self.group_of])
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
                          holding=len(self.group_of), live_listeners=live)

    def _take(self, mailboxes: Iterable[str]) -> None:
        size = self.settings.group_size
        for mailbox in mailboxes:
            group = next((g for g in self.groups if g.size() < size), None)
            if group is None:
                self._group_seq += 1
                group = StreamGroup(f"g{self._group_seq}", self.settings, on_mail=self._on_mail,
                                    on_subscribed=self._on_subscribed, on_unknown_folder=self._on_unknown_folder,
                                    on_moves=self._on_moves, on_limit=self._on_limit, folder_cache=self.sync,
                                    listener_id=self.listener_id)
                self.groups.append(group)
                group.start()
            group.add([mailbox])
            self.group_of[mailbox] = group

    def _drop(self, mailboxes: Iterable[str]) -> None:
        by_group: collections.defaultdict[StreamGroup, list[str]] = collections.defaultdict(list)
        for mailbox in mailboxes:
            group = self.group_of.pop(mailbox, None)
            if group is not None:
                by_group[group].append(mailbox)
        for group, members in by_group.items():
            group.remove(members)

    def _info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": self.started_at,
                "mailboxes": len(self.group_of), "groups": [g.status() for g in self.groups],
                "held_in_memory": len(self.sink.buffer), "catchups_pending": self.catchups.pending()}

    def _publish(self) -> None:
        self.leases.heartbeat(self._info())

    def _shutdown(self) -> int:
        deadline = time.monotonic() + SHUTDOWN_BUDGET
        self.log.info("listener stopping", mailboxes=len(self.group_of))
        for group in self.groups:
            group.stop()
        joined_by = time.monotonic() + 1.5  # one shared wait: a thread stuck in a request is left behind
        for group in self.groups:
            group.join(max(0.0, joined_by - time.monotonic()))
        done = []
        threads = [threading.Thread(target=lambda g=g: done.append(g.unsubscribe_all()), daemon=True)
                   for g in self.groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.05, deadline - time.monotonic() - 2))
        try:
            if self.sink.buffer:
                self.sink.flush()
            self.leases.release(list(self.group_of))
            self.leases.leave()
        except REDIS_ERRORS as exc:
            self.log.warning("could not release leases; they expire on their own", error=str(exc))
        self.log.info("listener stopped", unsubscribed=sum(done))
        return 0


def run(settings: Settings) -> int:
    return Listener(settings).run()
