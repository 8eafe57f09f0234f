"""Classifier speed on the real corpus: messages/s and CPU µs per message, for the headers-only
hot path (``classify_headers`` + ``needs_body``) and the full-MIME path (``classify_message``).

    python bench/classify_bench.py [--quick] [--out bench-results/classify.json]

Each pass classifies every corpus message (tests/data/corpus: bounces, auto-replies, complaints,
receipts, human replies) plus the hand-written client fixtures; the best of several passes is
reported (CPU time via ``time.process_time``, wall time via ``perf_counter``), overall and for
the human replies alone (the hot path's real traffic).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workers.classify import (
    classify_headers,
    classify_message,
    first_text,
    headers_of,
    needs_body,
    settle_with_text,
)

CORPUS = ROOT / "tests" / "data" / "corpus"
CLIENTS = ROOT / "tests" / "data" / "replies-clients"


def load() -> list[tuple[str, str, bytes]]:
    """(file, label, raw bytes) for every labelled corpus message and client fixture."""
    rows = []
    with open(CORPUS / "labels.tsv", newline="") as fh:
        for r in csv.DictReader(fh, delimiter="\t"):
            rows.append((r["file"], r["label"]))
    rows += [(e["file"], e["label"]) for e in json.loads((CORPUS / "replies.json").read_text())]
    out = [(name, label, (CORPUS / name).read_bytes()) for name, label in rows]
    expected = json.loads((CLIENTS / "expected.json").read_text())
    out += [(f"replies-clients/{n}", e["kind"], (CLIENTS / n).read_bytes()) for n, e in expected.items()]
    return out


def load_text_fixtures() -> list[tuple[str, str, bytes]]:
    """Machine mail and text-only out-of-office fixtures (tests/data/machine, ooo_text)."""
    out = []
    for folder in ("machine", "ooo_text"):
        for d in sorted((ROOT / "tests" / "data" / folder).iterdir()):
            for n, e in json.loads((d / "expected.json").read_text()).items():
                out.append((f"{folder}/{d.name}/{n}", e["kind"], (d / n).read_bytes()))
    return out


def measure(fn, items, passes: int) -> dict:
    best_cpu = best_wall = float("inf")
    for _ in range(passes):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for item in items:
            fn(item)
        best_cpu = min(best_cpu, time.process_time() - cpu0)
        best_wall = min(best_wall, time.perf_counter() - wall0)
    n = len(items)
    return {"messages": n, "passes": passes,
            "messages_per_s": round(n / best_wall, 1) if best_wall else None,
            "cpu_us_per_message": round(best_cpu / n * 1e6, 1),
            "wall_us_per_message": round(best_wall / n * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer passes (for CI / make bench QUICK=1)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "classify.json"))
    args = parser.parse_args(argv)
    passes = 2 if args.quick else 7

    messages = load()
    raws = [raw for _n, _l, raw in messages]
    header_lists = [headers_of(raw) for raw in raws]
    human = [i for i, (_n, label, _r) in enumerate(messages) if label == "human_reply"]
    classify_message(raws[0])  # warm imports (flufl.bounce, dateparser) outside the timing

    def hot(headers):
        classify_headers(headers)
        needs_body(headers)

    extra = load_text_fixtures()
    extra_headers = [headers_of(raw) for _n, _l, raw in extra]
    texts = [(classify_headers(h), raw, dict(h).get("Subject", ""))
             for h, (_n, _l, raw) in zip(extra_headers, extra, strict=True)]

    def text_step(item):  # what the job adds for a matched mail: first text part + settle
        c, raw, subject = item
        settle_with_text(dataclasses.replace(c, reasons=list(c.reasons)), first_text(raw), subject)

    results = {
        "classify_headers": measure(hot, header_lists, passes),
        "classify_message": measure(classify_message, raws, passes),
        "classify_headers_human_replies": measure(hot, [header_lists[i] for i in human], passes * 3),
        "classify_message_human_replies": measure(classify_message, [raws[i] for i in human], passes * 3),
        "classify_headers_machine_and_ooo_fixtures": measure(hot, extra_headers, passes),
        "text_step_first_text_and_settle": measure(text_step, texts, passes),
        "needs_body_false_share_of_human_replies": round(
            sum(not needs_body(header_lists[i]) for i in human) / len(human), 3),
    }
    report = {"bench": "classify", "quick": args.quick, "python": platform.python_version(),
              "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "corpus_messages": len(messages), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:34s} {r['messages_per_s']:>10} msg/s  {r['cpu_us_per_message']:>9} CPU µs/msg"
                  f"  ({r['messages']} messages, best of {r['passes']})")
        else:
            print(f"{name:34s} {r}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
