"""Worker cost of one mail inside a job, by job shape: CPU and Redis commands per mail.

    python bench/job_cost.py [--jobs N] [--out bench-results/job_cost.json]

Runs ``workers.jobs.handle_mail`` in this process (no RQ: its own cost per job is what
``worker_bench`` adds) against an EWS emulator and a redis-server started here, for replies to
recorded sends and for unrelated mail, in jobs of 1 mail, of 50 mails of 50 mailboxes (one each)
and of 50 mails of 5 mailboxes (ten each). Per mail: process CPU, wall time and Redis commands
(``INFO commandstats`` before and after). docs/scaling.md reads its figures from here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (str(ROOT), str(ROOT / "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import mail_samples as mail

from emulators.services import Emulator, RedisServer
from exchange_listener import queueing
from exchange_listener.core import config, logs
from exchange_listener.sources.base import NewMail
from workers import context, jobs

SHAPES = ((1, 1), (50, 50), (50, 5))  # (mails per job, mailboxes per job)


def commands(client) -> int:
    return sum(v["calls"] for v in client.info("commandstats").values())


def run(kind: str, per_job: int, mailboxes: int, count: int) -> dict:
    with RedisServer() as rs, Emulator(accounts=["svc:svc-password"]) as emu:
        settings = config.load(env={}, overrides={"redis_url": rs.url, "ews_url": emu.ews_url, "ews_username": "svc",
                                                  "ews_password": "svc-password"})
        ctx = context.configure(settings)
        boxes = [f"rep{i}@ours.example" for i in range(mailboxes)]
        payloads = []
        for j in range(count + 1):  # the first is a warm-up
            mails = []
            for k in range(per_job):
                box = boxes[k % mailboxes]
                sent = mail.new_id("ours.example")
                ctx.sends.record([sent], f"e-{j}-{k}", "seq", box, to=["pat@prospect.example"])
                raw = (mail.reply(sender="pat@prospect.example", to=box, in_reply_to=sent, references=sent)
                       if kind == "reply" else mail.reply(sender="x@else.example", to=box, in_reply_to=None,
                                                          references=None))
                mails.append(NewMail(box, emu.deliver(box, raw)["item_id"], "inbox", time.time()))
            payloads.append(queueing.payload(mails))
        jobs.handle_mail(payloads[0])
        calls = commands(ctx.redis)
        before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for payload in payloads[1:]:
            jobs.handle_mail(payload)
        wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
        calls = commands(ctx.redis) - calls - 1  # the INFO itself
        ctx.close()
    n = count * per_job
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"kind": kind, "mails_per_job": per_job, "mailboxes_per_job": min(mailboxes, per_job), "mails": n,
            "worker_cpu_ms_per_mail": round(1000 * cpu / n, 2), "wall_ms_per_mail": round(1000 * wall / n, 2),
            "redis_commands_per_mail": round(calls / n, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="jobs measured per shape (after one warm-up job)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "job_cost.json"))
    args = parser.parse_args()
    logs.configure("warning")
    rows = [run(kind, per_job, boxes, args.jobs) for kind in ("reply", "unrelated") for per_job, boxes in SHAPES]
    report = {"bench": "job_cost", "rows": rows, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_avg": round(os.getloadavg()[0], 2), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row['kind']:9s} {row['mails_per_job']:>2} mails / {row['mailboxes_per_job']:>2} mailboxes per job: "
              f"{row['worker_cpu_ms_per_mail']:>5} ms CPU, {row['redis_commands_per_mail']:>5} Redis commands per mail")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
