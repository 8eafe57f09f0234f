"""``exchange-listener sends import`` throughput: records/s through the real CLI (a child
process, interpreter start-up included) into a local redis-server.

    python bench/sends_import_bench.py [--quick] [--records N] [--out bench-results/sends_import.json]

The file is what a sending platform exports: one send per line, each for its own enrollment (the
costly case: every line creates an enrollment), a fifth of them with the id the mail server
assigned as a second Message-ID and a cc, recipients spread over 2,000 domains, sent within the
last 30 days. The same file is then imported again (every line meets its stored send and
merges into the same values), and the stored sends are counted and spot-checked. The contract
is >= 20,000 records/s (issue 13).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis

from emulators.services import RedisServer
from workers.state.sends import SendRegistry

GOAL = 20_000


def write_file(path: Path, records: int, seed: int = 13) -> None:
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    with open(path, "w") as fh:
        for i in range(records):
            sent = now - dt.timedelta(seconds=rng.randrange(30 * 86400))
            line = {"message_id": f"<{i:08d}.{rng.getrandbits(64):016x}@us.example>", "enrollment": f"enr-{i}",
                    "sequence": f"seq-{i % 50}", "mailbox": f"rep{i % 200}@us.example",
                    "to": [f"p{i}@prospect{rng.randrange(2000)}.example"],
                    "sent_at": sent.isoformat(timespec="seconds").replace("+00:00", "Z")}
            if i % 5 == 0:
                line["message_ids"] = [f"0100018c{i:08x}@email.amazonses.com"]
                line["cc"] = [f"Boss {i} <boss{i}@prospect.example>"]
            fh.write(json.dumps(line) + "\n")


def run_import(url: str, path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    env["EXCHANGE_LISTENER_REDIS_URL"] = url
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "sends", "import", str(path)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - wall0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"sends import exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"recorded": out["recorded"], "rejected": len(out["rejected"]), "seconds": round(wall, 3),
            "records_per_s": round(out["recorded"] / wall), "cli_cpu_s": round(cpu, 3)}


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 records instead of 100,000")
    parser.add_argument("--records", type=int, help="how many records (overrides --quick)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "sends_import.json"))
    args = parser.parse_args(argv)
    records = args.records or (20_000 if args.quick else 100_000)
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="el-import-bench-") as tmp, RedisServer() as server:
        path = Path(tmp) / "sends.jsonl"
        write_file(path, records)
        client = redis.Redis.from_url(server.url)
        cpu0 = redis_cpu(client)
        first = run_import(server.url, path)
        first["redis_cpu_s"] = round(redis_cpu(client) - cpu0, 3)
        keys_after_first = client.dbsize()
        cpu0 = redis_cpu(client)
        again = run_import(server.url, path)
        again["redis_cpu_s"] = round(redis_cpu(client) - cpu0, 3)
        registry = SendRegistry(client)
        last = json.loads(path.read_text().splitlines()[-1])
        found = registry.get(last["message_id"])
        checks = {"all_recorded": first["recorded"] == records and again["recorded"] == records,
                  "reimport_changed_no_key_count": client.dbsize() == keys_after_first,
                  "last_line_findable": found is not None and found.enrollment_id == last["enrollment"]}
        client.close()

    report = {"bench": "sends_import", "quick": args.quick, "records": records, "goal_records_per_s": GOAL,
              "records_per_s": first["records_per_s"], "meets_goal": first["records_per_s"] >= GOAL,
              "import": first, "reimport": again, "checks": checks,
              "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_avg_at_start": round(load_start, 2), "load_avg_at_end": round(os.getloadavg()[0], 2),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, r in (("import", first), ("re-import", again)):
        print(f"{name:10s} {r['records_per_s']:>8} records/s  ({r['recorded']} in {r['seconds']} s; CLI CPU "
              f"{r['cli_cpu_s']} s, Redis CPU {r['redis_cpu_s']} s)")
    print(f"goal >= {GOAL} records/s: {'met' if report['meets_goal'] else 'MISSED'}; checks {checks}; "
          f"load {report['load_avg_at_start']} -> {report['load_avg_at_end']}")
    print(f"-> {args.out}")
    # a missed speed goal is reported (meets_goal), not an error: make bench prints goals, never asserts them
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
