"""All benchmarks in one invocation: the component benches and the end-to-end figures, ours beside
the afternoon baseline (``bench/baseline.py``), into ``bench-results/bench.json`` plus a table.

    python bench/run_all.py            # full sizes (several minutes)
    python bench/run_all.py --quick    # under a minute; same fields, smaller sizes

End-to-end figures, each for ours and for the baseline, on one emulator + redis-server (AOF) +
one listener + N workers per system (run one after the other, never at the same time):

1. delivery -> stop latency p50/p95/p99 at a steady rate (50 replies/s): from the delivery POST
   to the enrollment transition's entry in the ``el:transitions`` stream (Redis server time);
2. highest end-to-end replies/s: replies delivered as fast as the emulator takes them, divided by
   the time from the first delivery to the last stop, for each worker count tried (a run is cut
   off after ``throughput_bound`` seconds; what a previous phase left queued is dropped first);
3. mailboxes per listener process: RSS and open connections (ours from bench/listener_bench.py;
   the baseline measured here);
4. catch-up: every listener stopped, N replies delivered, one listener started: time to the last
   stop, with the best worker count of (2) (the baseline has no catch-up: it never sees them);
5. worker CPU seconds per processed reply (user + system of the worker processes and any children
   they forked and reaped), from the throughput run;
6. a listener restart after many processed mails (``bench/restart_bench.py``): jobs and GetItem
   calls after the restart beside the mail that arrived in the gap (``restart_*`` rows).

Goals are printed next to the figures, never asserted. A component bench that is missing or
fails is recorded with its error; the rest still runs. The last line printed is the JSON object.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
RESULTS = os.path.join(ROOT, "bench-results")
for path in (ROOT, BENCH):
    if path not in sys.path:
        sys.path.insert(0, path)

import chaos
from rq import Worker
from rq.serializers import JSONSerializer

from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

COMPONENTS = ("emulator_bench", "listener_bench", "worker_bench", "classify_bench", "restart_bench")
GOALS = {
    "latency_p99_ms": ("p99 < 250 ms at 50 replies/s", lambda v: v is not None and v < 250),
    "replies_per_s": (">= 500 replies/s sustained", lambda v: v is not None and v >= 500),
    "listener_rss_mb_5000": ("5,000 mailboxes per listener in < 500 MB RSS", lambda v: v is not None and v < 500),
    "catchup_s": ("10,000-mail catch-up < 60 s", lambda v: v is not None and v < 60),
    "restart_extra_jobs": ("jobs after a restart ~= mail of the gap (<= 5% extra)", lambda v: v is not None and v <= 0.05),
    "restart_extra_getitem": ("GetItem calls after a restart ~= mail of the gap (<= 5% extra)",
                              lambda v: v is not None and v <= 0.05),
}


@dataclasses.dataclass
class Sizes:
    mailboxes: int
    latency_rate: float
    latency_seconds: float
    throughput_replies: int
    worker_counts: tuple[int, ...]
    catchup_replies: int
    drain_bound: float  # seconds to wait for a phase's last stops before calling the rest unfinished
    throughput_bound: float  # seconds one throughput run may take (the baseline is cut off, not waited for)
    baseline_listener_mailboxes: int
    component_timeout: float


FULL = Sizes(mailboxes=50, latency_rate=50.0, latency_seconds=20.0, throughput_replies=1500, worker_counts=(1, 2, 4),
             catchup_replies=10_000, drain_bound=90.0, throughput_bound=60.0, baseline_listener_mailboxes=1000,
             component_timeout=900.0)
QUICK = Sizes(mailboxes=6, latency_rate=50.0, latency_seconds=1.2, throughput_replies=150, worker_counts=(2,),
              catchup_replies=200, drain_bound=3.0, throughput_bound=5.0, baseline_listener_mailboxes=200,
              component_timeout=25.0)


# --- component benches ------------------------------------------------------------------------

def run_component(name: str, quick: bool, timeout: float) -> dict:
    """Run ``bench/<name>.py`` and collect the JSON it wrote; errors are recorded, not raised."""
    script = os.path.join(BENCH, f"{name}.py")
    if not os.path.exists(script):
        return {"ok": False, "error": f"bench/{name}.py is missing"}
    started = time.time()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    try:
        proc = subprocess.run([sys.executable, script, *(["--quick"] if quick else [])], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": round(time.time() - started, 1)}
    seconds = round(time.time() - started, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": f"exit {proc.returncode}: " + " | ".join(tail), "seconds": seconds}
    short = name.removesuffix("_bench")
    for candidate in (f"{name}.json", f"{short}.json"):
        path = os.path.join(RESULTS, candidate)
        if os.path.exists(path) and os.path.getmtime(path) >= started - 1:
            try:
                with open(path) as fh:
                    return {"ok": True, "seconds": seconds, "file": f"bench-results/{candidate}", "result": json.load(fh)}
            except ValueError as exc:
                return {"ok": False, "error": f"{candidate}: not JSON ({exc})", "seconds": seconds}
    lines = proc.stdout.strip().splitlines()
    try:
        return {"ok": True, "seconds": seconds, "result": json.loads(lines[-1])}
    except (IndexError, ValueError):
        return {"ok": False, "error": "no bench-results file written and no JSON on the last line", "seconds": seconds}


# --- end to end -------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class EndToEnd:
    """One system (ours or the baseline) on its own emulator, Redis, listener and workers."""

    def __init__(self, plumbing: str, sizes: Sizes, log_dir: str):
        self.plumbing, self.sizes = plumbing, sizes
        self.mailboxes = [f"rep{i:04d}@sales.example" for i in range(sizes.mailboxes)]
        commands = chaos.baseline_commands(self.mailboxes, log_dir) if plumbing == "baseline" else {}
        self.stack = chaos.Stack(self.mailboxes, listeners=1, workers=sizes.worker_counts[0], log_dir=log_dir,
                                 settings={"queue_name": "bench"}, **commands)
        self.counter = 0

    def enrollments(self, count: int) -> list[chaos.Enrollment]:
        """``count`` fresh enrollments with their sends recorded, spread over the mailboxes."""
        out = []
        for _ in range(count):
            n = self.counter
            self.counter += 1
            domain = f"p{n}.example"
            out.append(chaos.Enrollment(id=f"b-{n:07d}", mailbox=self.mailboxes[n % len(self.mailboxes)],
                                        prospect=f"pat{n}@{domain}", colleague=f"sam{n}@{domain}", cc=f"lee{n}@{domain}",
                                        send_ids=[f"<send{n}.{time.time_ns()}@sales.example>"],
                                        scenario="reply_prospect"))
        registry = SendRegistry(self.stack.redis)
        pipe_size = 500
        for start in range(0, len(out), pipe_size):
            chaos.record_sends(registry, out[start:start + pipe_size])
        return out

    def deliver(self, batch: list[chaos.Enrollment], threads: int = 4, rate: float | None = None) -> dict[str, float]:
        """Deliver one human reply per enrollment; returns enrollment id -> epoch time of the POST."""
        sent: dict[str, float] = {}
        raws = [(e, chaos.human_reply(e.mailbox, e.prospect, e.send_ids[0])) for e in batch]
        deliverer = chaos.Deliverer(self.stack.emulator)
        if rate:
            start = time.monotonic()
            for i, (e, raw) in enumerate(raws):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent[e.id] = time.time()
                deliverer.deliver(e.mailbox, raw)
            return sent

        def worker(part):
            for e, raw in part:
                sent[e.id] = time.time()
                deliverer.deliver(e.mailbox, raw)

        pool = [threading.Thread(target=worker, args=(raws[i::threads],)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return sent

    def wait_stopped(self, ids: list[str], bound: float, stall: float | None = None) -> dict[str, float]:
        """Wait until every id is stopped (or ``bound`` s, or ``stall`` s without progress); returns
        enrollment id -> epoch time of its stop transition."""
        store = EnrollmentStore(self.stack.redis)
        pending = set(ids)
        t0 = last_progress = time.monotonic()
        while pending and time.monotonic() - t0 < bound:
            if stall and time.monotonic() - last_progress > stall:
                break
            chunk = list(pending)[:2000]
            states = store.get_many(chunk)
            done = [eid for eid, state in zip(chunk, states) if state and state["status"] == "stopped"]
            if done:
                pending.difference_update(done)
                last_progress = time.monotonic()
            elif len(chunk) == len(pending):
                time.sleep(0.05)
        times = chaos.transition_times(self.stack.redis)
        wanted = set(ids)
        return {eid: entries[0][0] for eid, entries in times.items() if eid in wanted and entries}

    def workers_registered(self, count: int, timeout: float = 30.0) -> None:
        pids = {p.pid for p in self.stack.workers}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [w for w in Worker.all(connection=self.stack.redis, serializer=JSONSerializer) if w.pid in pids]
            if len(live) >= count:
                return
            time.sleep(0.1)

    def set_workers(self, count: int) -> None:
        if count == len(self.stack.workers) and all(p.alive() for p in self.stack.workers):
            return
        for proc in self.stack.workers:
            proc.terminate(timeout=15)
        env = self.stack.env()
        self.stack.workers = [chaos.Proc(f"worker-{count}-{i}", self.stack.worker_cmd, env, self.stack.log_dir).start()
                              for i in range(count)]
        self.workers_registered(count)

    def discard_backlog(self) -> int:
        """Drop jobs a previous phase left queued (the baseline falls behind), so each phase
        measures its own replies. Returns how many were dropped."""
        queue = self.stack.queue()
        left = queue.count
        if left:
            queue.empty()
        return left

    # -- the figures ---------------------------------------------------------------------------
    def latency(self) -> dict:
        s = self.sizes
        batch = self.enrollments(int(s.latency_rate * s.latency_seconds))
        sent = self.deliver(batch, rate=s.latency_rate)
        stops = self.wait_stopped(list(sent), bound=s.drain_bound + s.latency_seconds)
        lat = [(stops[eid] - sent[eid]) * 1000 for eid in sent if eid in stops]
        return {"rate": s.latency_rate, "replies": len(sent), "completed": len(lat),
                "p50_ms": _r(percentile(lat, 50)) if len(lat) == len(sent) else None,
                "p95_ms": _r(percentile(lat, 95)) if len(lat) >= 0.95 * len(sent) else None,
                "p99_ms": _r(percentile(lat, 99)) if len(lat) >= 0.99 * len(sent) else None,
                "max_ms": _r(max(lat)) if lat else None}

    def throughput(self, workers: int) -> dict:
        s = self.sizes
        self.set_workers(workers)
        dropped = self.discard_backlog()
        batch = self.enrollments(s.throughput_replies)
        cpu0 = sum(p.cpu_seconds() for p in self.stack.workers)
        listener_cpu0 = sum(p.cpu_seconds() for p in self.stack.listeners)
        services_cpu0 = self.services_cpu()
        t0 = time.time()
        sent = self.deliver(batch)
        offered = len(sent) / max(1e-6, time.time() - t0)
        stops = self.wait_stopped(list(sent), bound=s.throughput_bound, stall=max(5.0, s.drain_bound / 4))
        cpu = sum(p.cpu_seconds() for p in self.stack.workers) - cpu0
        listener_cpu = sum(p.cpu_seconds() for p in self.stack.listeners) - listener_cpu0
        services_cpu = self.services_cpu() - services_cpu0
        done = len(stops)
        elapsed = (max(stops.values()) - min(sent.values())) if stops else None
        return {"workers": workers, "replies": len(sent), "completed": done, "delivered_per_s": round(offered),
                "backlog_dropped_before": dropped,
                "replies_per_s": round(done / elapsed, 1) if elapsed else 0.0,
                "worker_cpu_ms_per_reply": _r(cpu * 1000 / done) if done else None,
                "listener_cpu_ms_per_reply": _r(listener_cpu * 1000 / done) if done else None,
                "emulator_redis_cpu_ms_per_reply": _r(services_cpu * 1000 / done) if done else None}

    def services_cpu(self) -> float:
        """CPU seconds of the emulator and redis-server so far (they share the machine's 2 cores)."""
        total = 0.0
        for popen in (self.stack.emulator.proc, self.stack.redis_server.proc):
            if popen is not None:
                total += chaos.cpu_seconds(popen.pid)
        return total

    def catch_up(self, workers: int) -> dict:
        s = self.sizes
        self.set_workers(workers)
        dropped = self.discard_backlog()
        batch = self.enrollments(s.catchup_replies)
        self.stack.stop_listeners()
        self.deliver(batch)
        t0 = time.time()
        self.stack.start_listeners(1)
        stops = self.wait_stopped([e.id for e in batch], bound=s.drain_bound + len(batch) / 25,
                                  stall=max(3.0, s.drain_bound / 6))
        done = len(stops)
        return {"replies": len(batch), "completed": done, "workers": workers, "backlog_dropped_before": dropped,
                "first_stop_s": round(min(stops.values()) - t0, 2) if done else None,
                "seconds": round(max(stops.values()) - t0, 2) if done == len(batch) else None,
                "seconds_to_last_completed": round(max(stops.values()) - t0, 2) if done else None}

    def run(self) -> dict:
        out: dict = {"plumbing": self.plumbing}
        try:
            self.stack.start_services()
            if self.plumbing == "ours":  # the baseline reads its mailboxes from a file
                self.stack.add_mailboxes()
            self.stack.start_processes()
            warm = self.enrollments(len(self.mailboxes))
            out["ready_s"] = round(chaos.warm_up(self.stack, warm, timeout=60), 1)
            out["latency"] = self.latency()
            out["throughput"] = [self.throughput(w) for w in self.sizes.worker_counts]
            best = max(out["throughput"], key=lambda r: r["replies_per_s"])["workers"]
            out["catchup"] = self.catch_up(best)
        except Exception as exc:  # record what was measured and why the rest was not  # noqa: BLE001 - recorded in the report, never fatal
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            self.stack.stop()
        return out


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def baseline_listener_footprint(mailboxes: int, log_dir: str, timeout: float = 120.0) -> dict:
    """RSS and open sockets of one baseline listener process streaming ``mailboxes`` mailboxes."""
    names = [f"fp{i:05d}@sales.example" for i in range(mailboxes)]
    stack = chaos.Stack(names, listeners=1, workers=0, log_dir=log_dir, settings={"queue_name": "footprint"},
                        **chaos.baseline_commands(names, log_dir))
    try:
        stack.start_services()
        t0 = time.monotonic()
        stack.start_processes()
        proc = stack.listeners[0]
        sockets = 0
        while time.monotonic() - t0 < timeout and proc.alive():
            sockets = open_sockets(proc.pid)
            if sockets >= mailboxes:
                break
            time.sleep(0.5)
        time.sleep(1.0)
        return {"mailboxes": mailboxes, "rss_mb": round(proc.rss_mb(), 1), "open_connections": open_sockets(proc.pid),
                "threads": thread_count(proc.pid), "startup_s": round(time.monotonic() - t0, 1)}
    except Exception as exc:  # noqa: BLE001 - recorded in the report, never fatal
        return {"mailboxes": mailboxes, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        stack.stop()


def open_sockets(pid: int) -> int:
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    count += 1
            except OSError:
                pass
    except OSError:
        pass
    return count


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


# --- report -----------------------------------------------------------------------------------

def _find(data, *words):
    """The first number in nested ``data`` whose key path contains every word (case-insensitive)."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop(0)
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}".lower(), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and all(w in path for w in words):
            return value
    return None


HIGHLIGHT_WORDS = ("per_s", "p50", "p99", "rss", "cpu_ms", "cpu_us", "streams_open", "connections", "startup",
                   "seconds_to", "mailboxes")


def highlights(result, limit: int = 10) -> dict:
    """The headline numbers of a component bench's JSON (rates, percentiles, RSS, CPU), flattened."""
    found: dict = {}
    stack = [("", result)]
    while stack and len(found) < limit:
        path, value = stack.pop(0)
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items() if k not in ("machine", "goals"))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value[:4]))
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)
              and any(word in path.lower() for word in HIGHLIGHT_WORDS)):
            found[path] = value
    return found


def listener_footprint(component: dict) -> dict:
    """RSS / open connections at 1,000 and 5,000 mailboxes from bench/listener_bench.py's JSON."""
    result = component.get("result") if component.get("ok") else None
    if not result:
        return {"error": component.get("error", "no result")}
    out = {}
    for entry in _entries_with(result, "mailboxes"):
        n = entry.get("mailboxes")
        if isinstance(n, int):
            out[str(n)] = {"rss_mb": _find(entry, "rss"), "open_connections": _find(entry, "conn"),
                           "startup_s": _find(entry, "start")}
    return out or {"raw": result}


def _entries_with(data, key: str) -> list[dict]:
    found, stack = [], [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if key in value and isinstance(value[key], int):
                found.append(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return sorted(found, key=lambda d: d[key])


def ratio(ours, theirs, higher_is_better: bool) -> float | None:
    if ours in (None, 0) or theirs in (None, 0):
        return None
    return round(ours / theirs if higher_is_better else theirs / ours, 1)


def summarize(results: dict) -> dict:
    ours, base = results["e2e"]["ours"], results["e2e"]["baseline"]

    def best(side):
        runs = side.get("throughput") or []
        return max(runs, key=lambda r: r["replies_per_s"], default={})

    def at(side, workers):
        return next((r for r in side.get("throughput") or [] if r["workers"] == workers), best(side))

    fp = results["listener_footprint"]
    ours_fp = results["listener_footprint"]["ours"]
    big = ours_fp.get("5000") or {}
    rows = {
        "latency_p50_ms": (ours.get("latency", {}).get("p50_ms"), base.get("latency", {}).get("p50_ms"), False),
        "latency_p95_ms": (ours.get("latency", {}).get("p95_ms"), base.get("latency", {}).get("p95_ms"), False),
        "latency_p99_ms": (ours.get("latency", {}).get("p99_ms"), base.get("latency", {}).get("p99_ms"), False),
        "replies_per_s": (best(ours).get("replies_per_s"), best(base).get("replies_per_s"), True),
        "replies_per_s_workers": (best(ours).get("workers"), best(base).get("workers"), None),
        "catchup_s": (ours.get("catchup", {}).get("seconds"), base.get("catchup", {}).get("seconds"), False),
        "catchup_completed": (ours.get("catchup", {}).get("completed"), base.get("catchup", {}).get("completed"), True),
        "worker_cpu_ms_per_reply": (at(ours, 2).get("worker_cpu_ms_per_reply"),
                                    at(base, 2).get("worker_cpu_ms_per_reply"), False),
        "listener_rss_mb": (_first(ours_fp, fp["baseline"].get("mailboxes"), "rss_mb"), fp["baseline"].get("rss_mb"), False),
        "listener_open_connections": (_first(ours_fp, fp["baseline"].get("mailboxes"), "open_connections"),
                                      fp["baseline"].get("open_connections"), False),
        "listener_rss_mb_5000": (big.get("rss_mb"), None, False),
        **restart_rows(results["components"].get("restart_bench", {})),
    }
    table = {}
    for name, (a, b, higher) in rows.items():
        goal = GOALS.get(name)
        judged = not results["quick"] or name in ("latency_p99_ms",)
        table[name] = {"ours": a, "baseline": b,
                       "ratio": ratio(a, b, higher) if higher is not None else None,
                       **({"goal": goal[0], "goal_met": goal[1](a) if judged else None} if goal else {})}
    return table


def restart_rows(component: dict) -> dict:
    """bench/restart_bench.py: what a listener restart costs beyond the mail of the gap."""
    r = component.get("result") or {}
    gap = r.get("gap_mails")

    def extra(key):
        return round((r[key] - gap) / gap, 3) if gap and r.get(key) is not None else None

    return {"restart_gap_mails": (gap, None, None), "restart_jobs": (r.get("jobs_after_restart"), None, None),
            "restart_getitem": (r.get("getitem_after_restart"), None, None),
            "restart_extra_jobs": (extra("jobs_after_restart"), None, None),
            "restart_extra_getitem": (extra("getitem_after_restart"), None, None),
            "restart_seconds_to_caught_up": (r.get("seconds_to_caught_up"), None, None)}


def _first(footprints: dict, mailboxes, key):
    if mailboxes is not None and str(mailboxes) in footprints:
        return footprints[str(mailboxes)].get(key)
    return None


def print_table(table: dict, results: dict) -> None:
    machine = results["machine"]
    print(f"\nexchange-listener benchmarks ({'quick' if results['quick'] else 'full'}; {machine['cpus']} CPUs; "
          f"load average {machine['load_avg_at_start']:.1f} at start, {machine['load_avg_at_end']:.1f} at end)")
    print(f"{'figure':28} {'ours':>12} {'baseline':>12} {'ratio':>8}  goal")
    for name, row in table.items():
        verdict = {True: "met", False: "NOT met", None: "not judged at quick size"}[row.get("goal_met")]
        goal = f"{row['goal']} ({verdict})" if "goal" in row else ""
        print(f"{name:28} {_fmt(row['ours']):>12} {_fmt(row['baseline']):>12} {_fmt(row['ratio'], 'x'):>8}  {goal}")
    fp = results["listener_footprint"]["ours"]
    for n, entry in sorted(fp.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        if isinstance(entry, dict) and "rss_mb" in entry:
            print(f"  listener @ {n} mailboxes: {_fmt(entry['rss_mb'])} MB RSS, {_fmt(entry['open_connections'])} connections")
    for name, comp in results["components"].items():
        status = f"ok ({comp.get('seconds')} s, {comp.get('file', 'stdout')})" if comp["ok"] else f"ERROR: {comp['error']}"
        print(f"  {name}: {status}")
        if comp["ok"]:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in highlights(comp["result"]).items())
            print(f"      {shown}")
    print("ratio: how many times better ours is (latency, CPU, RSS, connections: baseline / ours; rates: ours / baseline)")


def _fmt(value, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{suffix}"
    return f"{value:,}{suffix}" if isinstance(value, int) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; finishes in under a minute")
    parser.add_argument("--skip-components", action="store_true", help="only the end-to-end figures")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    os.makedirs(RESULTS, exist_ok=True)
    started = time.time()
    import tempfile

    log_dir = tempfile.mkdtemp(prefix="el-bench-")
    results: dict = {"quick": args.quick, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform(), "load_avg_at_start": os.getloadavg()[0]},
                     "sizes": dataclasses.asdict(sizes), "components": {}, "e2e": {}}
    names = () if args.skip_components else COMPONENTS
    print(f"component benches: {', '.join(names) or 'skipped'} ...", file=sys.stderr, flush=True)
    # --quick runs two at a time to stay under a minute: its rates are indicative only.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 if args.quick else 1) as pool:
        futures = {name: pool.submit(run_component, name, args.quick, sizes.component_timeout) for name in names}
    results["components"] = {name: future.result() for name, future in futures.items()}
    for plumbing in ("ours", "baseline"):
        print(f"end to end: {plumbing} ...", file=sys.stderr, flush=True)
        os.makedirs(os.path.join(log_dir, plumbing), exist_ok=True)
        results["e2e"][plumbing] = EndToEnd(plumbing, sizes, os.path.join(log_dir, plumbing)).run()
    ours_fp = listener_footprint(results["components"].get("listener_bench", {"ok": False, "error": "skipped"}))
    # the baseline at the largest size ours reports up to the cap (a thread and a connection per mailbox)
    counts = [int(n) for n in ours_fp if n.isdigit() and int(n) <= sizes.baseline_listener_mailboxes]
    n_baseline = max(counts, default=sizes.baseline_listener_mailboxes)
    print(f"listener footprint: baseline at {n_baseline} mailboxes ...", file=sys.stderr, flush=True)
    os.makedirs(os.path.join(log_dir, "footprint"), exist_ok=True)
    results["listener_footprint"] = {
        "ours": ours_fp,
        "baseline": baseline_listener_footprint(n_baseline, os.path.join(log_dir, "footprint")),
    }
    results["table"] = summarize(results)
    results["seconds"] = round(time.time() - started, 1)
    results["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    results["logs"] = log_dir
    with open(os.path.join(RESULTS, "bench.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    print_table(results["table"], results)
    print(f"total {results['seconds']} s; written bench-results/bench.json")
    print(json.dumps(results, separators=(",", ":"), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
