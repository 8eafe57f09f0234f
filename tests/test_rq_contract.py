"""What workers/worker.py (and the queue contract) take from RQ beyond its documented API.

setup.cfg pins rq to the range these tests were run against. Each test exercises one private or
undocumented RQ behaviour against a real redis-server and names, in its docstring, the code that
depends on it. A test that fails after an RQ upgrade means: read that code again before widening
the pin. Where our code copies an RQ method (``execute_job``, ``_start_scheduler``), a source
check makes sure RQ's original has not grown a step ours lacks.
"""
from __future__ import annotations

import ast
import datetime as dt
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest
import redis
from rq import Queue, Retry, SimpleWorker
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker, WorkerStatus

from emulators.services import wait_for
from exchange_listener import queueing
from exchange_listener.core import config
from exchange_listener.sources.base import NewMail
from workers import worker as mail_worker
from workers.worker import MailWorker, TakingQueue, make_worker

QUEUE = "contract"
ROOT = Path(__file__).resolve().parent.parent
SLEEP = "time.sleep"  # an importable job function with a JSON argument

# a worker thread dying on a closed socket (e.g. RQ's pubsub after an idle stop) is a failure here
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture
def settings(redis_server, redis_client):
    """worker_ttl 5 s: dequeue blocks 1 s, heartbeats every 1 s, maintenance every 5 s."""
    return config.load(env={}, overrides={"redis_url": redis_server.url, "worker_ttl": 5, "queue_name": QUEUE})


@pytest.fixture
def conn(redis_server):
    client = redis.Redis.from_url(redis_server.url)  # RQ adjusts the pool's socket timeout: not shared
    yield client
    client.close()


@pytest.fixture(autouse=True)
def clean_process_state():
    """work() installs RQ's signal handlers in this process; TakingQueue remembers a job per process."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    TakingQueue.taken = None
    yield
    TakingQueue.taken = None
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def queue_of(conn) -> Queue:
    return queueing.make_queue(conn, QUEUE)


def stop_when(worker, condition, timeout: float = 20.0) -> threading.Thread:
    """SIGTERM this process once ``condition()`` holds (or ``timeout`` passed), but only while
    ``worker.work()`` has RQ's handler installed: never kill pytest itself."""
    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            time.sleep(0.05)
        while time.monotonic() < deadline + 10:
            if signal.getsignal(signal.SIGTERM) == worker.request_stop:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def started_scores(conn, queue: Queue, job_id: str) -> list[float]:
    """Expiry times of ``job_id``'s entries in the StartedJobRegistry (members are job:execution)."""
    key = StartedJobRegistry(queue=queue).key
    return [score for member, score in conn.zrange(key, 0, -1, withscores=True)
            if member.decode().split(":")[0] == job_id]


def body_of(func) -> str:
    """``func``'s code without its docstring, normalized (formatting and comments do not count)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(func))).body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return "\n".join(ast.unparse(node) for node in body)


def python(code: str, *args: str, stderr=subprocess.PIPE, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=stderr, **kwargs)


def gone(pid: int) -> bool:
    """The process has exited (a zombie left to an init that does not reap counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


# -- dequeue and stop ----------------------------------------------------------------------------

def test_the_worker_dequeues_through_its_queue_class_and_the_job_waits_in_the_intermediate_list(settings, conn):
    """``TakingQueue.dequeue_any`` (and so ``MailWorker._shutdown``'s "job just taken" case) relies
    on: ``Worker.dequeue_job_and_maintain_ttl`` calls ``self.queue_class.dequeue_any`` as a class
    method and gets ``(job, queue)``; a dequeue (BLMOVE/LMOVE) leaves the job id in RQ's
    intermediate list until ``perform_job`` starts it."""
    queue = queue_of(conn)
    job = queue.enqueue(SLEEP, 0)
    worker = make_worker(settings, connection=conn)
    job_taken, from_queue = worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert (job_taken.id, from_queue.name) == (job.id, QUEUE)
    assert TakingQueue.taken == job.id
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == [job.id.encode()]  # taken, not started
    worker.execute_job(job_taken, from_queue)
    assert TakingQueue.taken is None
    assert job.get_status(refresh=True) == "finished"
    assert conn.llen(queue.intermediate_queue_key) == 0  # perform_job took it out


def _stopping_after_dequeue(base: type[Queue]) -> type[Queue]:
    """``base`` with a SIGTERM landing right after the dequeue took a job, before the worker starts it."""

    class StopAfterDequeue(base):
        @classmethod
        def dequeue_any(cls, *args, **kwargs):
            result = super().dequeue_any(*args, **kwargs)
            if result is not None:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

    return StopAfterDequeue


_StopAfterDequeue = _stopping_after_dequeue(TakingQueue)
_PlainStopAfterDequeue = _stopping_after_dequeue(Queue)


def test_a_stop_right_after_the_dequeue_runs_the_taken_job_then_stops(settings, conn):
    """``MailWorker._shutdown`` relies on: RQ's SIGTERM handler (``request_stop``) calls
    ``self._shutdown()``; RQ's own ``_shutdown`` raises ``StopRequested`` in a worker that is not
    BUSY, and the worker is not BUSY between the dequeue and ``prepare_execution`` (so without
    our override the taken job is stranded in the intermediate list, as the second half shows);
    ``work()`` checks ``_stop_requested`` before each dequeue, after the job it is running."""
    queue = queue_of(conn)
    first, second = queue.enqueue(SLEEP, 0), queue.enqueue(SLEEP, 0)
    worker = MailWorker([QUEUE], name="w-stop", connection=conn, serializer=JSONSerializer, worker_ttl=5,
                        queue_class=_StopAfterDequeue)
    worker.work(burst=True)
    assert first.get_status(refresh=True) == "finished"  # the job taken was run ...
    assert second.get_status(refresh=True) == "queued" and queue.job_ids == [second.id]  # ... and nothing after it
    assert conn.llen(queue.intermediate_queue_key) == 0

    # RQ alone: the same stop strands the taken job in the intermediate list (RQ's cleanup
    # fails it only a minute later). If this half fails, RQ changed how it stops an idle worker.
    conn.flushdb()
    stranded = queue.enqueue(SLEEP, 0)
    plain = SimpleWorker([QUEUE], name="w-plain", connection=conn, serializer=JSONSerializer, worker_ttl=5,
                         queue_class=_PlainStopAfterDequeue)
    plain.work(burst=True)
    assert stranded.get_status(refresh=True) == "queued"
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == [stranded.id.encode()]


def test_a_stop_while_the_worker_is_busy_waits_for_the_job(settings, conn):
    """``MailWorker.execute_job`` ("busy from here on") relies on: ``prepare_execution`` puts the
    worker in ``WorkerStatus.BUSY``, and RQ's ``_shutdown`` in a BUSY worker only sets
    ``_stop_requested`` instead of raising."""
    queue = queue_of(conn)
    job = queue.enqueue(SLEEP, 0)
    worker = make_worker(settings, connection=conn)
    taken, from_queue = worker.dequeue_job_and_maintain_ttl(timeout=1)
    worker.prepare_execution(taken)
    assert worker.get_state() == WorkerStatus.BUSY
    worker.request_stop(signal.SIGTERM, None)  # what RQ installs for SIGTERM; must not raise now
    assert worker._stop_requested
    worker.perform_job(taken, from_queue)
    assert job.get_status(refresh=True) == "finished"


def test_an_idle_stop_leaves_no_blocking_dequeue_behind(redis_server, redis_client, conn, caplog):
    """``MailWorker._shutdown``'s idle branch relies on: an idle worker waits in a blocking
    BLMOVE of ``dequeue_timeout`` (``worker_ttl - 15``, at least 1 s) on ``worker.connection``,
    and a stop ends it without leaving the server a pending BLMOVE that would move the next job
    to the intermediate list for nobody (the first lines show that trap with a raw connection)."""
    observer = redis.Redis.from_url(redis_server.url)
    queue = queue_of(observer)
    abandoned = redis.Connection(host="127.0.0.1", port=redis_server.port)
    abandoned.send_command("BLMOVE", queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT", 5)
    time.sleep(0.2)  # the server now waits on that socket; nobody will read the answer
    trapped = queue.enqueue(SLEEP, 0)
    wait_for(lambda: observer.lrange(queue.intermediate_queue_key, 0, -1) == [trapped.id.encode()],
             timeout=5, message="the pending BLMOVE took the job")
    abandoned.disconnect()
    observer.flushdb()

    settings = config.load(env={}, overrides={"redis_url": redis_server.url, "worker_ttl": 20, "queue_name": QUEUE})
    worker = make_worker(settings, connection=conn)
    assert worker.dequeue_timeout == 5

    def waiting_in_dequeue():
        if worker.get_state() != WorkerStatus.IDLE:
            return False
        time.sleep(0.5)  # into the BLMOVE, seconds before it would time out
        return True

    stop_when(worker, waiting_in_dequeue)
    started = time.monotonic()
    with caplog.at_level("INFO", logger="rq.worker"):
        worker.work()
    assert time.monotonic() - started < 4  # the stop ended the 5 s BLMOVE
    # a plain stop, not "found an unhandled exception" (closing the socket under the read must
    # end it as RQ's StopRequested, not as redis-py's ValueError on the closed buffer)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    job = queue.enqueue(SLEEP, 0)
    time.sleep(0.5)
    assert queue.job_ids == [job.id]
    assert observer.llen(queue.intermediate_queue_key) == 0


# -- liveness and reclaiming a killed worker's job -----------------------------------------------

def test_the_started_registry_entry_lives_worker_ttl_and_is_renewed_while_the_job_runs(settings, conn):
    """``MailWorker.get_heartbeat_ttl`` and ``_JobHeartbeat`` rely on: ``prepare_execution`` scores
    the job's StartedJobRegistry entry ``now + get_heartbeat_ttl(job)``; ``maintain_heartbeats(job)``
    (called from our thread while the job runs in the main thread) pushes it to
    ``now + get_heartbeat_ttl(job)`` again. RQ's SimpleWorker would register ``job_timeout + 60``
    once, so a killed worker's job would wait that long."""
    queue = queue_of(conn)
    job = queue.enqueue(SLEEP, 2.5, job_timeout=600)
    observer = redis.Redis.from_url(settings.redis_url)
    seen: list[tuple[float, float]] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            for score in started_scores(observer, queue, job.id):
                seen.append((time.time(), score))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        make_worker(settings, connection=conn).work(burst=True)
    finally:
        done.set()
        watcher.join()
    assert job.get_status(refresh=True) == "finished"
    assert seen, "the running job never showed up in the StartedJobRegistry"
    assert all(score - at <= settings.worker_ttl + 1.5 for at, score in seen), seen  # worker_ttl, not 660 s
    assert max(score for _, score in seen) - min(score for _, score in seen) >= 1, seen  # renewed while running
    assert started_scores(observer, queue, job.id) == []


@pytest.mark.slow
def test_a_dead_workers_job_is_retried_or_failed_by_a_live_workers_maintenance(settings, conn):
    """The module docstring's "how a kill -9'd worker's job runs again" relies on: an expired
    StartedJobRegistry entry is found by any worker's maintenance (``clean_registries``, run
    every ``maintenance_interval`` seconds between dequeues that block ``dequeue_timeout``
    seconds); a job with retries left is retried (``job.retry``), one without goes to the
    FailedJobRegistry as ``AbandonedJobError``."""
    queue = queue_of(conn)
    retried = queue.enqueue(SLEEP, 0, retry=Retry(max=1))
    abandoned = queue.enqueue(SLEEP, 0)
    dead = make_worker(settings, connection=conn, name="w-dead")
    for job in (retried, abandoned):  # taken and started by a worker that then died
        queue.remove(job)
        dead.prepare_execution(job)
    live = make_worker(settings, connection=conn, name="w-live")

    def reclaimed():
        return retried.get_status(refresh=True) == "finished" and abandoned.id in FailedJobRegistry(queue=queue)

    stop_when(live, reclaimed, timeout=25)
    started = time.monotonic()
    live.work()
    elapsed = time.monotonic() - started
    assert reclaimed(), "the dead worker's jobs were not reclaimed"
    assert elapsed < 20, elapsed  # worker_ttl (5) + maintenance_interval (5) + a dequeue (1), with room for load
    assert Job.fetch(retried.id, connection=conn, serializer=JSONSerializer).retries_left == 0  # spent its retry
    assert "AbandonedJobError" in Job.fetch(abandoned.id, connection=conn, serializer=JSONSerializer).latest_result().exc_string


def test_a_worker_restarted_under_a_killed_workers_name_takes_the_name_over(settings, conn):
    """``MailWorker.register_birth`` relies on: RQ refuses a name whose worker hash exists without
    a ``death`` field (a kill -9 leaves it for ``worker_ttl + 60`` s), and that hash holds the
    dead worker's ``hostname`` and ``pid``."""
    name = "w-restarted"
    killed = python("""
        import os, signal, sys, redis
        from exchange_listener.core import config
        from workers.worker import make_worker
        settings = config.load(env={}, overrides={"redis_url": sys.argv[1], "worker_ttl": 5, "queue_name": "contract"})
        make_worker(settings, connection=redis.Redis.from_url(sys.argv[1]), name=sys.argv[2]).register_birth()
        os.kill(os.getpid(), signal.SIGKILL)
        """, settings.redis_url, name)
    assert killed.wait(60) == -signal.SIGKILL, killed.stderr.read().decode()
    record = conn.hgetall(f"rq:worker:{name}")
    assert b"death" not in record and int(record[b"pid"]) == killed.pid
    with pytest.raises(ValueError, match="active worker"):  # what RQ alone does
        SimpleWorker([QUEUE], name=name, connection=conn, serializer=JSONSerializer).register_birth()
    restarted = make_worker(settings, connection=conn, name=name)
    restarted.register_birth()
    record = conn.hgetall(restarted.key)
    assert b"death" not in record and int(record[b"pid"]) == os.getpid()
    restarted.register_death()


# -- the scheduler -------------------------------------------------------------------------------

def test_the_scheduler_of_a_killed_worker_stops_and_frees_its_lock(settings, conn):
    """``ParentBoundScheduler`` and ``MailWorker._start_scheduler`` rely on: ``work(with_scheduler=
    True)`` calls ``self._start_scheduler``; ``RQScheduler.start()`` runs in the worker and forks
    the scheduler process; that process calls ``heartbeat()`` every ``interval`` and stops
    (releasing its lock) at the next loop once ``_stop_requested`` is set."""
    worker = python("""
        import sys, redis
        from exchange_listener.core import config
        from workers.worker import make_worker
        settings = config.load(env={}, overrides={"redis_url": sys.argv[1], "worker_ttl": 5, "queue_name": "contract"})
        make_worker(settings, connection=redis.Redis.from_url(sys.argv[1]), name="w-sched").work(with_scheduler=True)
        """, settings.redis_url, stderr=subprocess.DEVNULL, start_new_session=True)
    lock = f"rq:scheduler-lock:{QUEUE}"
    scheduler_pid = 0
    try:
        def scheduler_up():
            name = conn.get(lock)
            pid = name and conn.hget(f"rq:scheduler:{name.decode()}", "pid")
            return int(pid) if pid else 0

        scheduler_pid = wait_for(scheduler_up, timeout=60, message="the worker's scheduler running")
        assert scheduler_pid != worker.pid
        worker.kill()  # kill -9 of the worker alone: its scheduler process lives on, orphaned
        worker.wait(10)
        wait_for(lambda: conn.get(lock) is None, timeout=15, message="the orphaned scheduler released its lock")
        wait_for(lambda: gone(scheduler_pid), timeout=10, message="the orphaned scheduler exited")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        if scheduler_pid and not gone(scheduler_pid):
            os.kill(scheduler_pid, signal.SIGKILL)


def test_the_scheduler_outlives_a_redis_restart_and_keeps_moving_due_jobs(tmp_path):
    """``ParentBoundScheduler.work`` copies RQ's loop (``RQScheduler.work``: register_birth, then
    acquire_locks when ``should_reacquire_locks``, heartbeat, enqueue_scheduled_jobs, sleep
    ``interval``) and keeps it going through Redis errors. RQ's own dies on the first one, and its
    lock (kept by AOF across the restart) then holds every due retry back for a minute."""
    from emulators.services import RedisServer

    server = RedisServer(aof=True, workdir=str(tmp_path)).start()
    conn = redis.Redis.from_url(server.url)
    worker = python("""
        import sys, redis
        from exchange_listener.core import config
        from workers.worker import make_worker
        settings = config.load(env={}, overrides={"redis_url": sys.argv[1], "queue_name": "contract"})  # worker_ttl 30
        make_worker(settings, connection=redis.Redis.from_url(sys.argv[1]), name="w-restart").work(with_scheduler=True)
        """, server.url, stderr=subprocess.DEVNULL, start_new_session=True)
    lock = f"rq:scheduler-lock:{QUEUE}"
    try:
        holder = wait_for(lambda: conn.get(lock), timeout=60, message="the worker's scheduler holding its lock")
        time.sleep(1.5)  # the AOF (appendfsync everysec) has the lock
        server.stop()
        time.sleep(2.0)  # the scheduler meets the outage (RQ's would die here)
        server.start()
        queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
        job = queue.enqueue_in(dt.timedelta(seconds=1), SLEEP, 0)
        wait_for(lambda: job.id not in ScheduledJobRegistry(queue=queue).get_job_ids(), timeout=15,
                 message="the due job moved to the queue by the same scheduler")
        assert conn.get(lock) == holder
        wait_for(lambda: job.get_status(refresh=True) == "finished", timeout=15, message="the job ran")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        server.stop()


def test_a_burst_worker_moves_due_retries_to_the_queue_and_runs_them(settings, conn):
    """``MailWorker._start_scheduler``'s burst branch relies on: ``work(burst=True, with_scheduler=
    True)`` calls ``_start_scheduler`` before dequeuing, and the scheduler's ``acquire_locks``,
    ``acquired_locks``, ``register_birth``, ``enqueue_scheduled_jobs``, ``release_locks`` and
    ``register_death`` move due jobs of the ScheduledJobRegistry (where ``Retry`` intervals put
    failed jobs) to the queue."""
    queue = queue_of(conn)
    job = queue.enqueue_in(dt.timedelta(seconds=1), SLEEP, 0)
    assert job.id in ScheduledJobRegistry(queue=queue)
    time.sleep(1.1)
    make_worker(settings, connection=conn).work(burst=True, with_scheduler=True)
    assert job.get_status(refresh=True) == "finished"
    assert conn.get(f"rq:scheduler-lock:{QUEUE}") is None


def test_the_rq_methods_our_worker_copies_have_not_changed():
    """``MailWorker.execute_job`` and ``MailWorker._start_scheduler`` are copies of RQ's methods
    with one change each (the heartbeat thread; our scheduler class). If RQ's originals change at
    all (rq 3.0 passes an ``execution`` to ``perform_job``), copy them again. ``work()`` passes
    ``_start_scheduler`` four positional arguments."""
    assert body_of(SimpleWorker.execute_job) == textwrap.dedent("""\
        self.prepare_execution(job)
        self.perform_job(job, queue)
        self.set_state(WorkerStatus.IDLE)""")
    assert body_of(BaseWorker._start_scheduler) == textwrap.dedent("""\
        self.scheduler = RQScheduler(self.queues, connection=self.connection, logging_level=logging_level if logging_level is not None else self.log.level, date_format=date_format, log_format=log_format, serializer=self.serializer)
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
                self.scheduler.start()""")
    assert list(inspect.signature(MailWorker._start_scheduler).parameters) == \
        ["self", "burst", "logging_level", "date_format", "log_format"]
    assert "self._start_scheduler(burst, logging_level, date_format, log_format)" in inspect.getsource(BaseWorker.work)


# -- the queue contract (exchange_listener/queueing.py) ------------------------------------------

def test_job_ids_unique_and_json_storage(conn):
    """``queueing.job_id`` hashes EWS ItemIds because RQ accepts only ``[A-Za-z0-9_-]`` in ids;
    ``enqueue_new_mail`` relies on ``unique=True`` raising ``DuplicateJobError`` while the twin
    is queued; the JSON serializer stores the payload as (zlib-compressed) JSON, never pickle."""
    queue = queue_of(conn)
    with pytest.raises(ValueError, match="letters, numbers, underscores and dashes"):
        queue.enqueue(SLEEP, 0, job_id="AAMkAD+/=item")
    mails = [NewMail("rep@us.example", "AAMkAD+/=item", "inbox", 0.0)]
    first = queueing.enqueue_new_mail(queue, mails)
    assert first is not None and first.id == queueing.job_id("rep@us.example", ["AAMkAD+/=item"])
    assert queueing.enqueue_new_mail(queue, mails) is None and queue.count == 1
    with pytest.raises(DuplicateJobError):
        queue.enqueue(queueing.JOB_FUNC, {}, job_id=first.id, unique=True)
    func, _instance, args, _kwargs = json.loads(zlib.decompress(conn.hget(first.key, "data")))
    assert func == queueing.JOB_FUNC and args[0]["mails"][0]["item_id"] == "AAMkAD+/=item"
    fetched = Job.fetch(first.id, connection=conn, serializer=JSONSerializer)
    assert fetched.retries_left == 5 and fetched.retry_intervals == queueing.RETRY_INTERVALS


def test_the_worker_module_uses_only_what_this_file_checks():
    """A guard for the next change to workers/worker.py: a private (underscore) name used there
    and not listed here may be an RQ internal without a contract test yet."""
    checked = {"_shutdown", "_stop_requested", "_start_scheduler", "_parent_pid", "_alive",
               "_sleep_unless_stopped", "_warm_up", "_JobHeartbeat",
               "_install_signal_handlers"}  # the scheduler's loop: test_the_scheduler_outlives_a_redis_restart_...
    used = set()
    for node in ast.walk(ast.parse(inspect.getsource(mail_worker))):
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "name", None)
        if isinstance(name, str) and name.startswith("_") and not name.startswith("__"):
            used.add(name)
    assert used <= checked, f"private names without a contract test: {sorted(used - checked)}"
