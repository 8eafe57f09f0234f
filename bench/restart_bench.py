"""Restart benchmark: after a listener restart, only the gap is read (issue 9, point 3).

    python bench/restart_bench.py [--quick] [--out bench-results/restart.json]

One listener holds N mailboxes (1,000; quick: 20) of the EWS emulator; M mails (10,000; quick:
100) are delivered while it streams and processed by `exchange-listener work --burst`
processes (the ledger then remembers them). The listener is stopped with SIGTERM, G mails
(100; quick: 10) arrive while none runs, and a new listener starts. Measured after the restart,
until every mailbox is streamed and caught up and the queue is drained by another burst
worker: jobs enqueued, GetItem calls (the emulator counts its operations), SyncFolderItems and
SyncFolderHierarchy calls, and the seconds to caught up. The goal: jobs and GetItem calls after
the restart ~= G. RQ's own memory of finished jobs is dropped before the restart (as if
``result_ttl`` had run out), so nothing here leans on it.

A real redis-server (AOF) and the emulator run as child processes on free ports. Prints the
JSON object as its last line and writes it to the file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis

from emulators import services as local_services
from emulators.services import Emulator, RedisServer
from exchange_listener import queueing
from exchange_listener.core import keys
from exchange_listener.listener import mailboxes

ACCOUNT = ("svc", "svc-password")
QUEUE = "bench-restart"


def env_for(redis_url: str, emulator: Emulator, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    env.update(EXCHANGE_LISTENER_REDIS_URL=redis_url, EXCHANGE_LISTENER_EWS_URL=emulator.ews_url,
               EXCHANGE_LISTENER_EWS_USERNAME=ACCOUNT[0], EXCHANGE_LISTENER_EWS_PASSWORD=ACCOUNT[1],
               EXCHANGE_LISTENER_QUEUE_NAME=QUEUE, EXCHANGE_LISTENER_LOG_LEVEL="warning",
               EXCHANGE_LISTENER_LOG_FORMAT="json", EXCHANGE_LISTENER_ALLOW_VOLATILE_REDIS="true")
    env.update({f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def wait_for(condition, timeout: float, what: str):
    return local_services.wait_for(condition, timeout=timeout, interval=0.1, message=what)


def listener_state(conn: redis.Redis, listener_id: str) -> tuple[int, int]:
    """(mailboxes subscribed on connected streams, catch-ups pending) as the listener publishes them."""
    info = conn.hgetall(keys.listener(listener_id))
    groups = json.loads(info.get(b"groups", b"[]"))
    return (sum(g["subscribed"] for g in groups if g["connected"]), int(info.get(b"catchups_pending", b"-1")))


def caught_up(conn: redis.Redis, listener_id: str, count: int) -> bool:
    streamed, pending = listener_state(conn, listener_id)
    return streamed == count and pending == 0


def listen(env: dict, listener_id: str, workdir: Path) -> subprocess.Popen:
    with open(workdir / f"restart-{listener_id}.log", "w") as out:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", "exchange_listener.cli", "listen"], cwd=ROOT,
                                env={**env, "EXCHANGE_LISTENER_LISTENER_ID": listener_id}, stdout=out,
                                stderr=subprocess.STDOUT)


def drain(env: dict, workers: int) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "exchange_listener.cli", "work", "--burst", "--name",
                               f"restart-bench-{i}-{time.time_ns()}"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(workers)]
    for proc in procs:
        proc.wait(3600)


def deliver(emu: Emulator, names: list[str], count: int, tag: str) -> None:
    for i in range(count):
        raw = (f"From: someone{i}@elsewhere.example\r\nTo: {names[i % len(names)]}\r\nSubject: {tag} {i}\r\n"
               f"Message-ID: <{uuid.uuid4()}@elsewhere.example>\r\n\r\nnot a reply\r\n").encode()
        emu.deliver(names[i % len(names)], raw)


def run(mailbox_count: int, mails: int, gap: int, workdir: Path) -> dict:
    with RedisServer(aof=True) as rs, Emulator(accounts=[":".join(ACCOUNT)], heartbeat_seconds=5.0) as emu:
        conn = redis.Redis.from_url(rs.url)
        names = [f"restart{i}@bench.example" for i in range(mailbox_count)]
        mailboxes.add(conn, names)
        settings = {"heartbeat_seconds": 5, "checkpoint_seconds": 30}
        env = env_for(rs.url, emu, **settings)
        first = listen(env, "first", workdir)
        queue = queueing.make_queue(conn, QUEUE)
        try:
            wait_for(lambda: caught_up(conn, "first", mailbox_count), 600, "first listener streaming and caught up")
            deliver(emu, names, mails, "before")
            wait_for(lambda: mails_queued(queue) >= mails, 600, "every mail enqueued")
            drain(env, 2)
            first.terminate()
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
        remembered = sum(conn.zcard(keys.done(n)) for n in names)
        queue.empty()
        for key in conn.scan_iter("rq:job:*"):  # as if result_ttl had long run out
            conn.delete(key)
        for registry in (queue.finished_job_registry, queue.failed_job_registry):
            conn.delete(registry.key)

        deliver(emu, names, gap, "gap")
        before_ops = emu.stats()["operations"]
        started = time.monotonic()
        second = listen(env, "second", workdir)
        try:
            wait_for(lambda: caught_up(conn, "second", mailbox_count), 600, "second listener streaming and caught up")
            seconds = time.monotonic() - started
            jobs, enqueued = queue.count, mails_queued(queue)
            drain(env, 2)
            after_ops = emu.stats()["operations"]
        finally:
            second.terminate()
            second.wait(30)
        delta = {op: after_ops.get(op, 0) - before_ops.get(op, 0) for op in after_ops}
        return {"mailboxes": mailbox_count, "mails_processed_before": mails, "remembered_in_ledger": remembered,
                "gap_mails": gap, "jobs_after_restart": jobs, "mails_after_restart": enqueued, "getitem_after_restart": delta.get("GetItem", 0),
                "sync_folder_items_after_restart": delta.get("SyncFolderItems", 0),
                "sync_folder_hierarchy_after_restart": delta.get("SyncFolderHierarchy", 0),
                "seconds_to_caught_up": round(seconds, 1), "checkpoint_seconds": settings["checkpoint_seconds"]}


def mails_queued(queue) -> int:
    """Mails in the queued jobs (the listener puts up to 50 of a mailbox in one job)."""
    return sum(len(job.args[0]["mails"]) for job in queue.jobs if job.args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "restart.json"))
    args = parser.parse_args(argv)
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="el-restart-bench-"))
    sizes = (20, 100, 10) if args.quick else (1000, 10_000, 100)
    result = {"quick": args.quick, **run(*sizes, workdir), "logs": str(workdir)}
    result["goal"] = "mails enqueued and GetItem calls after the restart ~= gap mails"
    result["goal_met"] = (result["mails_after_restart"] <= result["gap_mails"] * 1.05
                          and result["getitem_after_restart"] <= result["gap_mails"] * 1.05)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
