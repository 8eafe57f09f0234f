"""The IMAP source, for ``bench/run_all.py`` (issue 12): delivery -> stop latency through a real
Dovecot, and what one listener costs at 1,000 watched mailboxes.

1. ``latency``: a real Dovecot (default config), a redis-server (AOF), one ``exchange-listener
   listen`` with ``source = imap`` (an IDLE connection per folder: INBOX and \\Junk) and 2
   ``exchange-listener work``. Replies are APPENDed to the reps' inboxes at a steady rate (one
   harness connection per mailbox, logged in beforehand, so a delivery is the APPEND alone);
   latency is from just before the APPEND to the enrollment's entry in ``el:transitions`` (Redis
   server time, same clock). Then a burst: replies APPENDed as fast as 4 threads can, replies/s
   from the first APPEND to the last stop.
2. ``footprint``: one listener watching N mailboxes (2 N IDLE connections) on a Dovecot sized for
   them (``Dovecot(scale_connections=...)``: multi-client imap processes, high-performance login
   processes): seconds from the process start until the heartbeat says every folder is connected,
   then its RSS (VmRSS, VmHWM), threads and established TCP connections. N = 1,000 (quick: 50,
   named in the row).

    python bench/imap_bench.py [--quick] [--mailboxes N]   # writes bench-results/imap.json
"""
from __future__ import annotations

import argparse
import imaplib
import json
import os
import pathlib
import re
import resource
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
for _path in (ROOT, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import chaos
import redis
from listener_bench import proc_status, tcp_connections
from rq.job import Job
from rq.serializers import JSONSerializer

from emulators.dovecot import Dovecot
from emulators.services import CliProcess, RedisServer
from exchange_listener.core import keys
from exchange_listener.listener import mailboxes as mailbox_registry
from exchange_listener.sources.imap import scan as scan_ids
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

FULL: dict[str, float] = {"mailboxes": 10, "workers": 2, "rate": 20.0, "seconds": 15.0, "burst": 300, "footprint": 1000}
QUICK: dict[str, float] = {"mailboxes": 4, "workers": 2, "rate": 20.0, "seconds": 1.0, "burst": 20, "footprint": 50}
FOLDERS = 2  # imap_folders' default, INBOX and \Junk: one IDLE connection each
QUEUE = "bench-imap"


def settings_env(redis_url: str, dovecot: Dovecot, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    base = {"redis_url": redis_url, "log_format": "json", "log_level": "warning", "queue_name": QUEUE,
            "source": "imap", "imap_host": dovecot.host, "imap_port": dovecot.port, "imap_security": "none",
            "imap_auth": "master", "imap_username": dovecot.master_user, "imap_password": dovecot.master_password,
            "pause_days": chaos.PAUSE_DAYS, **settings}
    env.update({f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in base.items()})
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def imap_info(conn: redis.Redis, listener_id: str) -> dict:
    raw = conn.hget(keys.listener(listener_id), "imap")
    return json.loads(raw) if raw else {}


def wait_connected(conn: redis.Redis, listener_id: str, folders: int, proc: CliProcess, timeout: float) -> float:
    """Seconds until the listener's heartbeat says all ``folders`` are connected; raises with what
    it last said when it does not get there within ``timeout`` or the process exits."""
    t0, info = time.monotonic(), {}
    while time.monotonic() - t0 < timeout:
        if not proc.alive():
            raise RuntimeError(f"listener exited ({proc.proc.returncode}): {log_tail(proc.log_path)}")
        info = imap_info(conn, listener_id)
        if info.get("folders") == folders and info.get("connected") == folders:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"{info.get('connected')} of {folders} folders connected after {timeout:.0f} s "
                       f"(failing {info.get('failing_count')}: {json.dumps((info.get('failing') or [])[:3])})")


def log_tail(path: str | os.PathLike[str], lines: int = 5) -> str:
    try:
        return " | ".join(pathlib.Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))], 1)


class Appender:
    """One harness IMAP connection per mailbox (the master user acting as the rep), logged in
    beforehand, so a delivery's time is its APPEND alone."""

    def __init__(self, dovecot: Dovecot, mailboxes: list[str]):
        self.conns: dict[str, imaplib.IMAP4] = {}
        self.locks = {m: threading.Lock() for m in mailboxes}
        for mailbox in mailboxes:
            conn = imaplib.IMAP4(dovecot.host, dovecot.port, timeout=30)
            conn.login(f"{mailbox}*{dovecot.master_user}", dovecot.master_password)
            self.conns[mailbox] = conn

    def append(self, mailbox: str, raw: bytes) -> tuple[float, int]:
        """APPEND ``raw`` to the inbox; returns the epoch time just before it was sent and its UID."""
        with self.locks[mailbox]:
            sent = time.time()
            typ, data = self.conns[mailbox].append("INBOX", None, imaplib.Time2Internaldate(sent), raw)
        found = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"") if typ == "OK" else None
        if not found:
            raise RuntimeError(f"APPEND to {mailbox} failed: {typ} {data!r}")
        return sent, int(found.group(1))

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.logout()
            except (imaplib.IMAP4.error, OSError):
                pass


class LatencyRun:
    """Dovecot + Redis + one IMAP listener + workers, for the latency and burst figures."""

    def __init__(self, sizes: dict[str, float], log_dir: str):
        self.sizes, self.log_dir = sizes, log_dir
        self.mailboxes = [f"rep{i:04d}@sales.example" for i in range(int(sizes["mailboxes"]))]
        self.counter = 0
        self.uids: dict[str, tuple[str, int]] = {}  # enrollment id -> (mailbox, UID of its reply)
        self.procs: list[CliProcess] = []
        self.appender: Appender | None = None

    def enrollments(self, count: int) -> list[chaos.Enrollment]:
        out = []
        for _ in range(count):
            n = self.counter
            self.counter += 1
            domain = f"p{n}.example"
            out.append(chaos.Enrollment(id=f"i-{n:07d}", mailbox=self.mailboxes[n % len(self.mailboxes)],
                                        prospect=f"pat{n}@{domain}", colleague=f"sam{n}@{domain}", cc=f"lee{n}@{domain}",
                                        send_ids=[f"<send{n}.{time.time_ns()}@sales.example>"],
                                        scenario="reply_prospect"))
        chaos.record_sends(SendRegistry(self.redis), out)
        return out

    def deliver(self, batch: list[chaos.Enrollment], rate: float | None, threads: int = 1) -> dict[str, float]:
        """One reply per enrollment, mail i due at start + i / rate (or as fast as APPEND goes);
        returns enrollment id -> epoch time just before its APPEND."""
        raws = [(e, chaos.human_reply(e.mailbox, e.prospect, e.send_ids[0])) for e in batch]
        sent: dict[str, float] = {}
        start = time.monotonic()
        appender = self.appender
        assert appender is not None, "deliver before the run started"

        def worker(offset: int) -> None:
            for i in range(offset, len(raws), threads):
                e, raw = raws[i]
                if rate:
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                sent[e.id], uid = appender.append(e.mailbox, raw)
                self.uids[e.id] = (e.mailbox, uid)

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return sent

    def wait_stopped(self, ids: list[str], bound: float) -> dict[str, float]:
        """Enrollment id -> epoch time of its stop (``el:transitions``), once all stopped or after ``bound`` s."""
        store, pending, t0 = EnrollmentStore(self.redis), set(ids), time.monotonic()
        while pending and time.monotonic() - t0 < bound:
            chunk = list(pending)[:2000]
            done = [eid for eid, state in zip(chunk, store.get_many(chunk)) if state and state["status"] == "stopped"]
            pending.difference_update(done)
            if pending:
                time.sleep(0.05)
        times = chaos.transition_times(self.redis)
        return {eid: times[eid][0][0] for eid in ids if times.get(eid)}

    def measure(self, rate: float | None, count: int, threads: int, bound: float) -> dict:
        batch = self.enrollments(count)
        sent = self.deliver(batch, rate, threads)
        stops = self.wait_stopped(list(sent), bound)
        lat = [(stops[eid] - sent[eid]) * 1000 for eid in sent if eid in stops]
        span = max(sent.values()) - min(sent.values()) if len(sent) > 1 else 0
        elapsed = max(stops.values()) - min(sent.values()) if stops else None
        return {"rate": rate, "replies": len(sent), "completed": len(lat), "threads": threads,
                "offered_per_s": round((len(sent) - 1) / span, 1) if span > 0 else None,
                "replies_per_s": round(len(stops) / elapsed, 1) if elapsed else None,
                "p50_ms": percentile(lat, 50) if len(lat) == len(sent) else None,
                "p95_ms": percentile(lat, 95) if len(lat) >= 0.95 * len(sent) else None,
                "p99_ms": percentile(lat, 99) if len(lat) >= 0.99 * len(sent) else None,
                "max_ms": round(max(lat), 1) if lat else None,
                "stages": self.stages(sent, stops)}

    def stages(self, sent: dict[str, float], stops: dict[str, float]) -> dict:
        """Where the delivery -> stop time goes, p50/p99 ms per stage, from the RQ jobs (kept after
        they finish): ``seen`` APPEND -> the listener FETCHed it (the mail's ``seen_at``: Dovecot's
        IDLE notice and the listener's read), ``enqueued`` -> queued, ``queued`` -> a worker
        started the job, ``job`` -> it finished (the stop is written inside). Replies not stopped
        are listed with their job's status, if any."""
        jobs: dict[tuple[str, int], tuple[Job, float]] = {}
        names = [k.decode() for k in self.redis.scan_iter("rq:job:*", count=1000) if k.count(b":") == 2]
        for job in Job.fetch_many([n.split(":", 2)[2] for n in names], connection=self.redis,
                                  serializer=JSONSerializer):
            if job is None or not job.args:
                continue
            for m in job.args[0].get("mails", []):
                folder, _, uid = scan_ids.parse_item_id(m["item_id"])
                if folder == "INBOX":
                    jobs[(m["mailbox"], uid)] = (job, float(m.get("seen_at") or 0.0))
        spans: dict[str, list[float]] = {k: [] for k in ("seen", "enqueued", "queued", "job")}
        missing = []
        for eid, posted in sent.items():
            found = jobs.get(self.uids[eid])
            if eid not in stops:
                missing.append({"enrollment": eid, "uid": self.uids[eid][1],
                                "job": found[0].get_status(refresh=False) if found else None})
            if not found or not found[0].enqueued_at or not found[0].started_at or not found[0].ended_at:
                continue
            job, seen = found
            enqueued, started = job.enqueued_at.timestamp(), job.started_at.timestamp()  # type: ignore[union-attr]
            ended = job.ended_at.timestamp()  # type: ignore[union-attr]
            for name, span in (("seen", seen - posted), ("enqueued", enqueued - seen), ("queued", started - enqueued),
                               ("job", ended - started)):
                spans[name].append(span * 1000)
        out: dict = {"matched_jobs": len(spans["job"])}
        for name, values in spans.items():
            out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = percentile(values, 50), percentile(values, 99)
        if missing:
            out["not_stopped"] = missing[:10]
        return out

    def run(self) -> dict:
        s = self.sizes
        out: dict = {"mailboxes": len(self.mailboxes), "workers": s["workers"], "folders_per_mailbox": FOLDERS}
        t0 = time.monotonic()
        self.redis_server = RedisServer(aof=True).start()
        self.dovecot = Dovecot()
        try:
            self.dovecot.add_users(self.mailboxes)  # before the start: no wait for a reload
            self.dovecot.start()
            self.redis = redis.Redis.from_url(self.redis_server.url)
            mailbox_registry.add(self.redis, self.mailboxes, source="imap")
            env = settings_env(self.redis_server.url, self.dovecot, listener_id="imap-latency")
            listener = CliProcess(["listen"], env, os.path.join(self.log_dir, "imap-listener.log"))
            self.procs.append(listener)
            self.procs += [CliProcess(["work", "--name", f"imap-bench-{i}"], env,
                                      os.path.join(self.log_dir, f"imap-worker-{i}.log"))
                           for i in range(int(s["workers"]))]
            wait_connected(self.redis, "imap-latency", FOLDERS * len(self.mailboxes), listener, 60)
            self.appender = Appender(self.dovecot, self.mailboxes)
            warm = self.measure(None, len(self.mailboxes), 1, 30)  # one reply per mailbox: workers warm
            if warm["completed"] != warm["replies"]:
                raise RuntimeError(f"warm-up: {warm['completed']} of {warm['replies']} replies stopped")
            out["ready_s"] = round(time.monotonic() - t0, 1)
            out["latency"] = self.measure(s["rate"], max(2, int(s["rate"] * s["seconds"])), 1, s["seconds"] + 15)
            out["burst"] = self.measure(None, int(s["burst"]), 4, 30)
            # a reply the latency run never saw: was it read once later mail reached its folder?
            late = [m["enrollment"] for m in out["latency"]["stages"].get("not_stopped", [])]
            if late:
                store = EnrollmentStore(self.redis)
                out["latency"]["not_stopped_then_stopped_in_burst"] = [
                    eid for eid, state in zip(late, store.get_many(late)) if state and state["status"] == "stopped"]
            out["listener_cpu_s"] = round(chaos.cpu_seconds(listener.pid), 2)
        except Exception as exc:  # noqa: BLE001 - recorded in the report, never fatal
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if self.appender:
                self.appender.close()
            for proc in self.procs:
                proc.stop()
            self.dovecot.__exit__()
            self.redis_server.__exit__()
        return out


def group_footprint(pgid: int) -> dict:
    """Processes and summed RSS (MB) of a process group (Dovecot's)."""
    rss_kb = 0.0
    pids = Dovecot.group_pids(pgid)
    for pid in pids:
        try:
            rss_kb += proc_status(pid).get("VmRSS", 0.0)
        except OSError:
            continue
    return {"processes": len(pids), "rss_mb": round(rss_kb / 1024, 1)}


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit (children inherit it) toward ``wanted``, up
    to the hard limit; returns the limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def footprint(n: int, log_dir: str, timeout: float | None = None, settle: float = 2.0) -> dict:
    """One listener watching ``n`` mailboxes (``FOLDERS`` IDLE connections each): seconds until all
    are connected, then its RSS, threads and connections."""
    connections = FOLDERS * n
    out: dict = {"mailboxes": n, "connections_wanted": connections}
    nofile = raise_nofile(connections * 2 + 1024)
    out["rlimit_nofile"] = list(nofile)
    names = [f"fp{i:05d}@sales.example" for i in range(n)]
    rs = RedisServer(aof=True).start()  # as in production (the listener warns about anything less)
    dovecot = Dovecot(scale_connections=connections + 200)
    listener = None
    try:
        dovecot.add_users(names)
        dovecot.start()
        conn = redis.Redis.from_url(rs.url)
        mailbox_registry.add(conn, names, source="imap")
        env = settings_env(rs.url, dovecot, listener_id="imap-footprint")
        listener = CliProcess(["listen"], env, os.path.join(log_dir, f"imap-footprint-{n}.log"))
        try:
            out["connected_s"] = round(wait_connected(conn, "imap-footprint", connections, listener,
                                                      timeout or max(60.0, n * 0.3)), 1)
        except (RuntimeError, TimeoutError) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["listener_log"] = log_tail(listener.log_path)
            out["dovecot_log"] = dovecot.log_tail(5)
        time.sleep(settle)  # settled: every watch in IDLE
        if listener.alive():
            status = proc_status(listener.pid)
            out.update(rss_mb=round(status["VmRSS"] / 1024, 1), peak_rss_mb=round(status["VmHWM"] / 1024, 1),
                       threads=int(status["Threads"]), tcp_connections=tcp_connections(listener.pid),
                       fds=len(os.listdir(f"/proc/{listener.pid}/fd")))
            out["rss_kb_per_connection"] = round(status["VmRSS"] / max(1, out["tcp_connections"]), 1)
        if dovecot.proc is not None:
            out["dovecot"] = group_footprint(dovecot.proc.pid)
        t1 = time.monotonic()
        code = listener.terminate(timeout=30)
        out.update(stop_s=round(time.monotonic() - t1, 1), exit_code=code)
    except Exception as exc:  # noqa: BLE001 - recorded in the report, never fatal
        out["error"] = out.get("error") or f"{type(exc).__name__}: {exc}"
    finally:
        if listener is not None:
            listener.stop()
        dovecot.__exit__()
        rs.__exit__()
    return out


def run(quick: bool, log_dir: str, mailboxes: int | None = None) -> dict:
    """Both figures: ``latency`` (and ``burst``) and ``footprint`` (``mailboxes`` or the size's)."""
    sizes = QUICK if quick else FULL
    started = time.monotonic()
    out: dict = {"plumbing": "imap", "quick": quick, "sizes": sizes}
    out.update(LatencyRun(sizes, log_dir).run())
    out["footprint"] = footprint(mailboxes or int(sizes["footprint"]), log_dir, settle=1.0 if quick else 3.0)
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 10 s: 50 mailboxes for the footprint")
    parser.add_argument("--mailboxes", type=int, help="mailboxes for the footprint (default 1,000; quick 50)")
    args = parser.parse_args(argv)
    log_dir = tempfile.mkdtemp(prefix="el-imap-bench-")
    result = run(args.quick, log_dir, args.mailboxes)
    result.update(logs=log_dir, load_avg_at_end=os.getloadavg()[0])
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results", "imap.json"), "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(json.dumps(result, default=str))
    return 0 if "error" not in result and "error" not in result["footprint"] else 1


if __name__ == "__main__":
    sys.exit(main())
