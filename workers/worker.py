"""The RQ worker that runs ``workers.jobs.handle_mail``: one queue, JSON jobs, jobs in-process.

Why in-process (a ``SimpleWorker`` subclass) rather than RQ's fork-per-job ``Worker``: a job is
a few Redis commands and one or two HTTP round trips, so forking costs more than the job
(roughly 3x the throughput here), and a forked horse starts with cold exchangelib sessions and
Redis connections every time. In-process, the HTTP sessions and the Redis pool live as long as
the worker. What forking gave is kept:

- ``job_timeout`` is still enforced: RQ's SIGALRM death penalty works in the main thread;
- liveness is still visible: a heartbeat thread renews the worker key and the job's entry in
  the StartedJobRegistry every ``worker_ttl / 3`` seconds while a job runs. RQ's
  ``SimpleWorker`` would instead register the job for ``job_timeout + 60`` seconds once, so a
  killed worker's job would wait that long (plus up to 10 minutes of maintenance interval)
  before anyone took it back.

How a kill -9'd worker's job runs again: its StartedJobRegistry entry stops being renewed and
expires ``worker_ttl`` seconds after the last beat; any live worker's maintenance (every
``maintenance_interval`` = ``worker_ttl`` seconds, checked between dequeues that block at most
``worker_ttl - 15`` seconds) finds it, and RQ retries it (the job has ``Retry``) through the
scheduler. With the default ``worker_ttl`` of 30 s that is under about 90 s (33 s measured in
tests/test_end_to_end.py). A job with no retries left (``job_retries = 0``) goes to the failed
registry instead, as RQ does. A worker restarted under a dead worker's name (supervisord after
a kill -9) takes the name over at once instead of failing until the old key expires.

The scheduler (retries with backoff) runs in a process RQ forks from the worker; ours stops
when its parent is gone, so a killed worker leaves no orphan holding the scheduler lock. The
notification outbox is drained after each job with transitions and on a timer.
SIGTERM is RQ's warm shutdown (finish the job, take no new one); a second SIGTERM is cold.
RQ raises its stop at once in an idle worker, and "idle" includes the instant after the blocking
dequeue moved a job to RQ's intermediate list but before the job started: that job would sit
there until RQ's cleanup a minute later. Here a job already taken is run first, then the worker
stops (``TakingQueue``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

import redis
from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from exchange_listener.core import logs, metrics, redis_conn
from exchange_listener.core.backoff import delay as backoff_delay
from exchange_listener.core.config import ConfigError, Settings
from workers import context

NOTIFY_INTERVAL = 5.0  # seconds between background drains of the notification outbox

log = logs.get_logger(component="worker")


class ParentBoundScheduler(RQScheduler):
    """RQ's scheduler process, which also stops (releasing its lock) once its worker has died."""

    def start(self) -> BaseProcess:
        self._parent_pid = os.getpid()
        return super().start()

    def heartbeat(self) -> None:
        if getattr(self, "_parent_pid", None) and os.getppid() != self._parent_pid:
            self.log.warning("Scheduler: worker %s is gone, stopping", self._parent_pid)
            self._stop_requested = True
            return
        super().heartbeat()

    def work(self) -> None:
        """RQ's loop, surviving Redis going away (a failover, a restart). RQ's own lets the error
        end the process; its lock then lives on for ``interval + 60`` s, and every retry that
        falls due meanwhile waits for it: about a minute after each failover. This one keeps
        trying, and on the server that comes back its lock is still its own (replicated or
        persisted), so it simply refreshes it."""
        self._install_signal_handlers()
        attempt = 0
        born = False
        while True:
            if self._stop_requested:
                with contextlib.suppress(redis.exceptions.RedisError, OSError):  # the lock lapses on its own
                    self.stop()
                break
            try:
                if not born:
                    self.register_birth()
                    born = True
                if self.should_reacquire_locks:
                    self.acquire_locks()
                self.heartbeat()
                self.enqueue_scheduled_jobs()
                if attempt:
                    self.log.info("Scheduler: Redis reachable again")
                attempt = 0
                wait = float(self.interval)
            except (redis.exceptions.RedisError, OSError) as exc:
                wait = backoff_delay(attempt, base=0.5, cap=5.0)
                attempt += 1
                born = False  # the server that comes back may have lost our record: register again
                if attempt == 1:
                    self.log.warning("Scheduler: Redis unavailable (%s); retrying", exc)
            time.sleep(wait)


class _JobHeartbeat(threading.Thread):
    """Renews the worker's and the running job's liveness while the job runs in the main thread."""

    def __init__(self, worker: MailWorker, job: Job):
        super().__init__(name="job-heartbeat", daemon=True)
        self.worker, self.job, self.done = worker, job, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.worker.job_monitoring_interval):
            try:
                self.worker.maintain_heartbeats(self.job)
            except redis.exceptions.RedisError as exc:  # next beat may succeed; the job goes on
                log.warning("job heartbeat failed", job_id=self.job.id, error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


class TakingQueue(Queue):
    """RQ's Queue, noting the job a dequeue just took, until the worker starts it."""

    taken: str | None = None  # one worker per process
    closing = False  # MailWorker._shutdown closed the socket under this dequeue's read

    @classmethod
    def dequeue_any(cls, *args: Any, **kwargs: Any) -> tuple[Job, Queue] | None:
        TakingQueue.taken = None  # a job taken earlier and never started (an error in between) is not ours now
        try:
            result = super().dequeue_any(*args, **kwargs)
        except ValueError:  # redis-py's read, unwinding, touched the buffer the disconnect closed
            if TakingQueue.closing:
                raise StopRequested() from None  # the stop it is: RQ ends work() quietly
            raise
        if result is not None:
            TakingQueue.taken = result[0].id
        return result


class MailWorker(SimpleWorker):
    """SimpleWorker with short, renewed heartbeats (see the module docstring)."""

    queue_class = TakingQueue

    def work(self, *args: Any, **kwargs: Any) -> bool:
        TakingQueue.closing = False  # a worker made after an earlier one stopped in this process
        return super().work(*args, **kwargs)

    def _shutdown(self) -> None:
        if self.get_state() != WorkerStatus.BUSY:
            if TakingQueue.taken is not None:
                self._stop_requested = True  # run the job just taken, then stop (see the module docstring)
                log.info("warm shutdown: running the job just taken first", job_id=TakingQueue.taken)
                if self.scheduler:
                    self.stop_scheduler()
                return
            # Idle in the blocking dequeue: RQ's stop interrupts our read, but the server keeps the
            # BLMOVE waiting on the open socket and would move the next job to the intermediate
            # list for a reader that is gone. Closing the socket cancels it. The pool also holds
            # the pubsub connection (RQ's command channel): stop its thread first, or it dies
            # reading a closed socket and prints a traceback on every idle stop.
            with contextlib.suppress(Exception):
                self.unsubscribe()
                self.pubsub_thread = None  # RQ's teardown unsubscribes again: nothing left to do
            TakingQueue.closing = True
            with contextlib.suppress(Exception):
                self.connection.connection_pool.disconnect()
        super()._shutdown()

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.worker_ttl

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            self.prepare_execution(job)  # busy from here on: a stop waits for the job
        finally:
            TakingQueue.taken = None
        beat = _JobHeartbeat(self, job)
        beat.start()
        try:
            self.perform_job(job, queue)
        finally:
            beat.stop()
        self.set_state(WorkerStatus.IDLE)

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO", date_format: str | None = None,
                         log_format: str | None = None) -> None:
        self.scheduler = ParentBoundScheduler(self.queues, connection=self.connection, serializer=self.serializer,
                                              logging_level=logging_level or "INFO")
        self.scheduler.acquire_locks()
        if self.scheduler.acquired_locks:
            if burst:
                try:
                    self.scheduler.register_birth()
                    self.scheduler.enqueue_scheduled_jobs()
                finally:
                    self.scheduler.release_locks()
                    self.scheduler.register_death()
            else:
                self.scheduler.start()

    def register_birth(self) -> None:
        """Take over the name of a dead worker of this host (a restart after kill -9) at once."""
        data = self.connection.hgetall(self.key)
        if data and b"death" not in data and redis_conn.text(data.get(b"hostname", b"")) == self.hostname:
            try:
                pid = int(data.get(b"pid", b"0"))
            except ValueError:
                pid = 0
            if pid == os.getpid() or not _alive(pid):
                log.warning("previous worker with this name is dead; taking over", worker=self.name, old_pid=pid)
                self.connection.hset(self.key, "death", "taken-over")
        super().register_birth()


def _sleep_unless_stopped(seconds: float) -> bool:
    """Sleep ``seconds``; True as soon as SIGTERM or SIGINT asks the worker to stop meanwhile."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return stop.wait(seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_worker(settings: Settings, connection: redis.Redis | None = None, name: str | None = None) -> MailWorker:
    connection = connection or redis_conn.connect(settings.redis_url, socket_timeout=None)
    ttl = settings.worker_ttl
    return MailWorker(
        [settings.queue_name],
        name=name or f"{socket.gethostname()}-{os.getpid()}",
        connection=connection,
        serializer=JSONSerializer,
        worker_ttl=ttl,
        maintenance_interval=ttl,
        job_monitoring_interval=max(1, ttl // 3),
        queue_class=TakingQueue,
    )


def _warm_up(ctx: context.Context) -> None:
    """Pay the one-off costs before the first job rather than inside it: the job code and
    exchangelib's import, the fetchers, dateparser's language data (together over a second on a
    cold process, which would otherwise land on the first reply's latency)."""
    import workers.jobs  # noqa: F401 - the import is the point
    from workers.classify import find_return_date

    ctx.warm_up()
    find_return_date("back on 14 December", None)


def run(settings: Settings, *, burst: bool = False, name: str | None = None) -> int:
    """Run a worker until SIGTERM (or, with ``burst``, until the queue is empty)."""
    ctx = context.configure(settings)
    try:
        metrics.serve(settings.metrics_port)
    except OSError as exc:
        raise ConfigError(f"metrics_port: cannot serve metrics on port {settings.metrics_port} ({exc.strerror}); "
                          "every worker process needs its own port") from None
    _warm_up(ctx)
    first = make_worker(settings, name=name)
    worker_name = first.name
    log.info("worker starting", worker=worker_name, queue=settings.queue_name, burst=burst,
             worker_ttl=settings.worker_ttl, job_timeout=settings.job_timeout)
    redis_conn.check_at_start(first.connection, allow_volatile=settings.allow_volatile_redis, log=log)
    worker: MailWorker | None = first  # None: make another (the last one's Redis went away)
    timer = None
    try:
        ctx.notifier.drain()  # whatever a previous worker left behind
        timer = ctx.notifier.start_timer(NOTIFY_INTERVAL)
    except redis.exceptions.RedisError as exc:
        log.warning("notification drain failed at start; the timer retries", error=f"{type(exc).__name__}: {exc}")
        timer = timer or ctx.notifier.start_timer(NOTIFY_INTERVAL)
    try:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                worker = worker or make_worker(settings, name=worker_name)  # RQ's Worker() talks to Redis too
                worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level.upper())
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.ResponseError) as exc:
                # Redis restarting, away, or failing over (RQ's cleanup can meet a half-answered
                # pipeline then): wait and start again rather than exit, so a worker
                # not under supervisord still serves once Redis is back. Nothing is lost
                # meanwhile: a job taken but not finished is reclaimed by RQ's maintenance.
                if burst:
                    raise
                failures = 1 if time.monotonic() - started > 60 else failures + 1
                delay = backoff_delay(failures - 1, base=2.0, cap=30.0)  # 2 s, 4 s, ... 30 s, times U(0.5, 1)
                log.warning("redis unreachable; worker starts again after a pause", worker=worker_name,
                            error=f"{type(exc).__name__}: {exc}", retry_in_s=round(delay, 1))
                if _sleep_unless_stopped(delay):
                    break
                worker = None
    finally:
        if timer is not None:
            timer.stop()
        if burst:
            try:
                ctx.notifier.drain()
            except redis.exceptions.RedisError:
                pass
        ctx.close()
    log.info("worker stopped", worker=worker_name)
    return 0
