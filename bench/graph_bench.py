"""The Microsoft Graph source end to end, for ``bench/run_all.py``: the same figures as the EWS
rows, measured the same way (``run_all.EndToEnd``'s latency and throughput runs), on the Graph
emulator instead of the EWS one.

One Graph emulator (``emulators.services.GraphEmulator``: Graph on http, its token host on
https), one redis-server (AOF), one ``exchange-listener listen`` with ``source = graph`` whose
notification receiver listens on ``notification_listen`` (the emulator POSTs the change
notifications to ``notification_url``), and as many ``exchange-listener work`` as the EWS rows.
Mail is delivered to the emulator's test hook (``POST /emulator/mailboxes/{addr}/messages``, the
same path as the EWS emulator's, so ``chaos.Deliverer`` serves both).

Figures (``results["e2e"]["graph"]``):

1. ``latency``: delivery -> stop p50/p95/p99 at the EWS rate (50 replies/s): from the delivery
   POST to the transition's entry in ``el:transitions`` (Redis server time);
2. ``throughput``: replies/s from the first delivery to the last stop, replies delivered as fast
   as the emulator takes them, over every mailbox, for each worker count tried;
3. ``poll_latency``: delta-only mode (no ``notification_url``, ``graph_poll_seconds``): the same
   listener restarted without its receiver; delivery -> stop at a low rate. Its floor is the
   polling period (a mail waits for the next sweep: on average half a period).

    python bench/graph_bench.py [--quick]   # these figures alone, printed as JSON
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
for _path in (ROOT, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import chaos
from rq.job import Job
from rq.serializers import JSONSerializer

from emulators.services import GraphEmulator, free_port
from exchange_listener import queueing
from exchange_listener.listener import mailboxes as mailbox_registry

POLL_SECONDS = 1.0  # delta-only mode's period in the poll_latency run
POLL_RATE = 10.0  # replies/s in the poll_latency run: the mail waits for the sweep, not for the workers


def sizes_for(sizes, quick: bool):
    """``run_all``'s sizes for the Graph rows: the quick run's as they are; the full run's rate,
    mailboxes and worker counts with fewer replies (10 s at the steady rate, 600 per throughput
    run), which keeps the Graph rows under two minutes."""
    if quick:
        return sizes
    return dataclasses.replace(sizes, latency_seconds=10.0, throughput_replies=600, throughput_bound=20.0,
                               drain_bound=15.0)


class GraphStack(chaos.Stack):
    """``chaos.Stack`` with the Graph emulator in place of the EWS one, and ``source = graph``
    settings for the children: one listener whose receiver the emulator POSTs to directly
    (``graph_chaos.GraphStack`` puts a forwarding proxy in front of several listeners' receivers,
    a hop the latency here should not include)."""

    def __init__(self, mailboxes: list[str], *, workers: int, log_dir: str, settings: dict | None = None):
        super().__init__(mailboxes, listeners=1, workers=workers, log_dir=log_dir, settings=settings)
        self.receiver_port = free_port()

    def _make_emulator(self) -> GraphEmulator:
        return GraphEmulator(mailboxes=self.mailboxes)

    def graph_settings(self) -> dict[str, str | float]:
        """Notification mode: the receiver on ``receiver_port``; ``extra`` may override (poll mode)."""
        return {"notification_url": f"http://127.0.0.1:{self.receiver_port}/graph/notify",
                "notification_listen": f"127.0.0.1:{self.receiver_port}", "graph_poll_seconds": 0}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
        env.update(self.emulator.settings_env())
        settings = {"redis_url": self.redis_url, "log_format": "json", "heartbeat_seconds": self.heartbeat_seconds,
                    "log_level": os.environ.get("CHAOS_LOG_LEVEL", "warning"), "pause_days": chaos.PAUSE_DAYS,
                    **self.graph_settings(), **self.extra}
        env.update({f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in settings.items()})
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, BENCH, env.get("PYTHONPATH")) if p)
        return env

    def add_mailboxes(self, mailboxes: list[str] | None = None) -> None:
        mailbox_registry.add(self.redis, mailboxes or self.mailboxes, source="graph")

    def stop(self) -> None:
        """SIGTERM to every child at once (each shuts down on its own), then ``Stack.stop``, which
        waits for them (and kills any still there), the emulator and Redis."""
        for proc in self.listeners + self.workers:
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8.0
        for proc in self.listeners + self.workers:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        super().stop()
        shutil.rmtree(self.emulator.workdir, ignore_errors=True)


def graph_counters(stack: GraphStack) -> dict[str, int]:
    """The emulator's counters (Graph requests, $batch calls, notification POSTs, 429s); {} if it cannot say."""
    try:
        stats = stack.emulator.stats()
    except Exception:  # noqa: BLE001 - a figure for the report, never fatal
        return {}
    notes = stats.get("notifications") or {}
    return {"requests": stats.get("requests", 0), "batches": stats.get("batches", 0),
            "batch_requests": stats.get("batch_requests", 0), "throttled": stats.get("throttled", 0),
            "concurrency_throttled": stats.get("concurrency_throttled", 0),
            "notifications": notes.get("notifications", 0), "notification_posts": notes.get("posts", 0),
            "notifications_retried": notes.get("retried", 0)}


def per_reply(before: dict[str, int], after: dict[str, int], replies: int) -> dict[str, float]:
    """Emulator counters over a run, per completed reply (``graph_requests_per_reply``, ...)."""
    if not replies or not before or not after:
        return {}
    return {f"graph_{k}_per_reply": round((after[k] - before[k]) / replies, 2) for k in after if k in before}


def stages(e2e, ids: list[str]) -> dict:
    """Where the delivery -> stop time of ``ids`` (enrollment ids delivered by ``e2e.deliver``)
    goes, p50/p99 in ms per stage, from each reply's job (its id is the mailbox and the immutable
    item id, as the receiver enqueues it): ``notified`` POST -> the receiver saw the notification
    (its ``seen_at``), ``enqueued`` -> the job was queued, ``queued`` -> a worker started it,
    ``job`` -> the worker finished it (the stop is written inside), ``total`` POST -> stop."""
    stops = chaos.transition_times(e2e.stack.redis)
    wanted = [(eid, *e2e.delivered[eid]) for eid in ids if eid in e2e.delivered and e2e.delivered[eid][1]]
    jobs = Job.fetch_many([queueing.job_id(mailbox, [item]) for _, mailbox, item, _ in wanted],
                          connection=e2e.stack.redis, serializer=JSONSerializer)
    spans: dict[str, list[float]] = {k: [] for k in ("notified", "enqueued", "queued", "job", "total")}
    found = 0
    for (eid, _, _, posted), job in zip(wanted, jobs):
        if job is None or not job.enqueued_at or not job.started_at or not job.ended_at or eid not in stops:
            continue
        found += 1
        seen = float(job.args[0]["mails"][0].get("seen_at") or 0.0)
        enqueued, started, ended = job.enqueued_at.timestamp(), job.started_at.timestamp(), job.ended_at.timestamp()
        for name, span in (("notified", seen - posted), ("enqueued", enqueued - seen), ("queued", started - enqueued),
                           ("job", ended - started), ("total", stops[eid][0][0] - posted)):
            spans[name].append(span * 1000)
    out: dict = {"replies": len(ids), "matched_jobs": found}
    for name, values in spans.items():
        out[f"{name}_p50_ms"] = _pct(values, 50)
        out[f"{name}_p99_ms"] = _pct(values, 99)
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 1)


def poll_latency(e2e, rate: float, seconds: float, poll_seconds: float) -> dict:
    """Restart the listener in delta-only mode (no receiver) and measure delivery -> stop at ``rate``."""
    stack = e2e.stack
    stack.stop_listeners()
    stack.extra.update(notification_url="", graph_poll_seconds=poll_seconds)
    stack.start_listeners(1)
    warm = e2e.enrollments(len(e2e.mailboxes))
    ready = chaos.warm_up(stack, warm, timeout=60)
    before, counters, t0 = set(e2e.delivered), graph_counters(stack), time.monotonic()
    out = e2e.latency(rate=rate, seconds=seconds)
    elapsed, after = time.monotonic() - t0, graph_counters(stack)
    out["stages"] = stages(e2e, [eid for eid in e2e.delivered if eid not in before])
    if counters and after:  # every sweep reads every folder of every mailbox, mail or not
        out["graph_requests_per_s"] = round((after["requests"] - counters["requests"]) / elapsed, 1)
    return {**out, "graph_poll_seconds": poll_seconds, "ready_s": round(ready, 1)}


def run(e2e) -> dict:
    """The Graph figures on ``e2e`` (a ``run_all.EndToEnd`` whose stack is a ``GraphStack``)."""
    sizes = e2e.sizes
    out: dict = {"plumbing": "graph", "mailboxes": len(e2e.mailboxes)}
    phases = out["phase_seconds"] = {}
    last = [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        phases[name], last[0] = round(now - last[0], 1), now

    try:
        e2e.stack.start_services()
        e2e.stack.add_mailboxes()
        e2e.stack.start_processes()
        warm = e2e.enrollments(len(e2e.mailboxes))
        out["ready_s"] = round(chaos.warm_up(e2e.stack, warm, timeout=60), 1)
        lap("start")
        before = set(e2e.delivered)
        out["latency"] = e2e.latency()
        out["latency"]["stages"] = stages(e2e, [eid for eid in e2e.delivered if eid not in before])
        lap("latency")
        out["throughput"] = []
        for workers in sizes.worker_counts:
            before = graph_counters(e2e.stack)
            measured = e2e.throughput(workers)
            measured.update(per_reply(before, graph_counters(e2e.stack), measured["completed"]))
            out["throughput"].append(measured)
        lap("throughput")
        out["emulator"] = graph_counters(e2e.stack)
        e2e.set_workers(min(sizes.worker_counts))
        e2e.discard_backlog()
        out["poll_latency"] = poll_latency(e2e, POLL_RATE, min(5.0, max(sizes.latency_seconds, 1.5)), POLL_SECONDS)
        lap("poll_latency")
    except Exception as exc:  # noqa: BLE001 - recorded in the report, never fatal
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        e2e.stack.stop()
        lap("stop")
    return out


def main(argv: list[str] | None = None) -> int:
    import run_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    log_dir = tempfile.mkdtemp(prefix="el-graph-bench-")
    sizes = sizes_for(run_all.QUICK if args.quick else run_all.FULL, args.quick)
    result = run_all.EndToEnd("graph", sizes, log_dir).run()
    result.update(quick=args.quick, sizes=dataclasses.asdict(sizes), logs=log_dir,
                  load_avg_at_end=os.getloadavg()[0])
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results", "graph.json"), "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
