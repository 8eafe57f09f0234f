"""Worker cost and throughput: CPU time per processed reply, and replies/s one worker sustains.

    python bench/worker_bench.py [--quick] [--replies N] [--out bench-results/worker.json]

One emulator and one redis-server as child processes. N sends are recorded and N human replies
delivered to the emulator (spread over a few mailboxes); N jobs are enqueued the way the listener
does (one item each). Then one `exchange-listener work --burst` process drains the queue:

- replies/s  = N / (last job's ended_at - first job's started_at), from RQ's own job records;
- CPU/reply  = (user + system CPU of the worker process) / N, minus the CPU of an idle
  `work --burst` run on an empty queue (imports and start-up), measured the same way.

Every enrollment must end stopped, or the run is reported as failed. Notifications have no
webhook or callable configured, so the figure is the worker's own work (fetch over HTTP,
classify, match, transition, outbox drain).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (str(ROOT), str(ROOT / "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import mail_samples as mail
from rq.job import Job
from rq.serializers import JSONSerializer

from emulators.services import Emulator, RedisServer
from exchange_listener import queueing
from exchange_listener.core import redis_conn
from exchange_listener.sources.base import NewMail
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

QUEUE = "bench-worker"
MAILBOXES = [f"rep{i}@sales.example" for i in range(10)]


def run_worker(env: dict) -> tuple[float, float]:
    """Run one burst worker to completion; (wall seconds, CPU seconds of that process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "work", "--burst", "--name",
                           f"bench-{os.getpid()}-{time.time_ns()}"], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=3600, check=False)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def bench(replies: int) -> dict:
    with RedisServer() as redis_server, Emulator(accounts=["svc:svc-password"]) as emulator:
        conn = redis_conn.connect(redis_server.url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
        env.update(EXCHANGE_LISTENER_REDIS_URL=redis_server.url, EXCHANGE_LISTENER_EWS_URL=emulator.ews_url,
                   EXCHANGE_LISTENER_EWS_USERNAME="svc", EXCHANGE_LISTENER_EWS_PASSWORD="svc-password",
                   EXCHANGE_LISTENER_QUEUE_NAME=QUEUE, EXCHANGE_LISTENER_LOG_LEVEL="warning",
                   EXCHANGE_LISTENER_LOG_FORMAT="json")
        _, idle_cpu = run_worker(env)  # start-up and shutdown cost, nothing queued

        registry, queue = SendRegistry(conn), queueing.make_queue(conn, QUEUE)
        t0 = time.monotonic()
        jobs = []
        for n in range(replies):
            mailbox = MAILBOXES[n % len(MAILBOXES)]
            send_id = f"<bench{n}.{time.time_ns()}@sales.example>"
            registry.record([send_id], f"w-{n}", "seq", mailbox, to=[f"pat{n}@p{n}.example"])
            raw = mail.reply(sender=f"pat{n}@p{n}.example", to=mailbox, in_reply_to=send_id,
                             references=f"<older{n}@p{n}.example> {send_id}")
            item_id = emulator.deliver(mailbox, raw)["item_id"]
            jobs.append(queueing.enqueue_new_mail(queue, [NewMail(mailbox, item_id, "inbox", time.time())]).id)
        prepare_s = time.monotonic() - t0

        wall, cpu = run_worker(env)
        records = [j for j in Job.fetch_many(jobs, connection=conn, serializer=JSONSerializer) if j]
        finished = [j for j in records if j.get_status() == "finished"]
        first = min(j.started_at for j in finished)
        last = max(j.ended_at for j in finished)
        busy = (last - first).total_seconds()
        states = EnrollmentStore(conn).get_many([f"w-{n}" for n in range(replies)])
        stopped = sum(1 for s in states if s and s["status"] == "stopped")
        work_cpu = max(0.0, cpu - idle_cpu)
        return {
            "replies": replies,
            "jobs_finished": len(finished),
            "enrollments_stopped": stopped,
            "ok": len(finished) == replies and stopped == replies,
            "replies_per_s": round(len(finished) / busy, 1) if busy > 0 else None,
            "worker_cpu_ms_per_reply": round(work_cpu * 1000 / replies, 3),
            "worker_cpu_s": round(cpu, 3),
            "worker_startup_cpu_s": round(idle_cpu, 3),
            "worker_wall_s": round(wall, 3),
            "jobs_busy_s": round(busy, 3),
            "cpu_share_of_busy_time": round(work_cpu / busy, 2) if busy > 0 else None,
            "prepare_s": round(prepare_s, 2),
        }


def table(result: dict) -> str:
    rows = [
        ("replies processed", f"{result['jobs_finished']:,} / {result['replies']:,} (stopped: {result['enrollments_stopped']:,})"),
        ("replies/s (one worker)", f"{result['replies_per_s']}"),
        ("worker CPU per reply", f"{result['worker_cpu_ms_per_reply']} ms"),
        ("worker CPU / busy time", f"{result['cpu_share_of_busy_time']}"),
        ("worker start-up CPU", f"{result['worker_startup_cpu_s']} s (subtracted)"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(["worker benchmark (one in-process RQ worker, emulator + redis on this machine)"]
                     + [f"  {name:<{width}}  {value}" for name, value in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (well under 30 s)")
    parser.add_argument("--replies", type=int, help="replies to process (default 2000; 50 with --quick)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "worker.json"))
    args = parser.parse_args()
    replies = args.replies or (50 if args.quick else 2000)
    result = bench(replies)
    result.update(quick=args.quick, machine={"cpus": os.cpu_count(), "python": platform.python_version()},
                  measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"results: {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
