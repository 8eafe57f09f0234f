"""The small chaos drill, as CI runs it: real emulator, Redis as a Sentinel group (primary, replica,
three Sentinels; AOF), two listener and two worker processes, every fault injected including a
kill -9 of the primary mid-stream, and the mailbox-behaviour phase (queued replies moved, deleted,
hard-deleted and purged while workers are drained; rule-filed into new folders while both
listeners are down); the ground truth must hold exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_KINDS = ("reset_streams", "stall_streams", "expire_subscriptions", "server_busy", "http_503", "restart",
               "kill_listener", "kill_worker", "restart_redis")


def test_small_drill_loses_nothing_and_stops_each_enrollment_once():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "chaos.py"), "--size", "small"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no report; stderr:\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert "error" not in report, f"drill crashed: {report['error']}\n{proc.stderr[-3000:]}"
    summary = {k: report[k] for k in ("lost", "duplicated", "false_stops", "wrong", "unexplained")}
    # the whole report as text (pytest shortens a dict): which mail, which phase, where the logs are
    assert summary == {"lost": 0, "duplicated": 0, "false_stops": 0, "wrong": 0, "unexplained": 0}, \
        json.dumps(report)[:6000]
    assert all(report["faults"][kind] >= 1 for kind in FAULT_KINDS), report["faults"]
    assert report["injected"] >= len(FAULT_KINDS)
    assert report["replies"] >= 500
    # the drill really made the transitions it expected, not just "nothing went wrong"
    assert report["transitions"].get("stopped:replied", 0) >= report["expected_final"]["stopped"] * 0.5
    assert report["transitions"].get("stopped:bounced", 0) > 0
    assert any(key.startswith("paused:") for key in report["transitions"])
    assert report["max_recovery_s"] is not None
    # Sentinel: the primary was killed mid-stream and transitions flowed again afterwards
    assert report["redis"] == "sentinel"
    assert report["faults"]["failover"] >= 1
    assert report["failover_recovery_s"] is not None and report["failover_recovery_s"] > 0
    # mailbox behaviour: every reply that still exists stopped its enrollment; a purged one cannot
    phase = report["mailbox_phase"]
    by_fate = phase["by_fate"]
    assert set(by_fate) == {"moved_nested", "moved_new", "deleted", "hard_deleted", "moved_twice", "purged", "kept",
                            "rule_filed"}, by_fate
    for fate, counts in by_fate.items():
        assert counts["replies"] > 0, (fate, counts)
        assert counts["stopped"] == (0 if fate == "purged" else counts["replies"]), (fate, counts)
    assert report["purged_expected_active"] == by_fate["purged"]["replies"]
    assert phase["resume_to_last_stop_s"] is not None
    assert phase["unstopped_after_jobs"] == 0, phase  # relocation did it, not a later catch-up
    assert phase["replayed_after_restart"] == 0, phase  # the ledger kept processed mail from a re-fetch
    assert proc.returncode == 0, report
