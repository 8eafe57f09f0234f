"""``make demo`` is the README's first command: it must pass end to end and leave nothing running."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import demo_messages

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out


def _pids_with_env(entry: str) -> list[int]:
    """Processes whose environment holds ``entry`` (every process supervisord started for this run)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _play_and_check(tmp_path: Path, *args: str) -> str:
    """Run the demo; assert its seven outcomes, its Salesforce table and a full teardown; return its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--workdir", str(tmp_path), *args],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    rows, salesforce = {}, {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0].startswith("enr-"):
            rows[cells[0]] = cells
        elif len(cells) == 5 and cells[3].startswith("enr-"):
            salesforce[cells[3]] = cells
    assert set(rows) == {s.enrollment for s in demo_messages.SCENARIOS}
    for scenario in demo_messages.SCENARIOS:
        _, label, status, reason, latency, ok = rows[scenario.enrollment]
        assert label == scenario.label and ok == "yes"
        assert status == scenario.expect_status
        if scenario.expect_reason:
            assert reason == scenario.expect_reason
        if scenario.expect_status == "active":
            assert latency == "unchanged"
        else:
            assert re.fullmatch(r"\d+ ms", latency), latency
    assert "all 7 outcomes as expected" in out
    assert set(salesforce) == set(rows)
    for scenario in demo_messages.SCENARIOS:
        prospect, _record, activity, _, ok = salesforce[scenario.enrollment]
        assert prospect == scenario.to[0] and ok == "yes"
        assert (activity == "none") == (scenario.expect_status == "active"), activity
    assert "salesforce: 5 activities as expected" in out

    # Torn down: supervisord and every child it started are gone.
    assert not (tmp_path / "run" / "supervisord.pid").exists()
    leftovers = [pid for pid in _pids_with_env(f"EL_RUN_DIR={tmp_path / 'run'}")]
    assert not leftovers, leftovers
    return out


def _logs(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "log").glob("*.log")}


def test_demo_plays_every_scenario_and_tears_down(tmp_path):
    out = _play_and_check(tmp_path)
    assert "source: ews" in "".join(out.splitlines(keepends=True)[:2])
    logs = _logs(tmp_path)
    assert logs >= {"redis.log", "emulator.log", "listener.log", "worker-00.log", "worker-01.log"}
    assert "graph-emulator.log" not in logs  # the Graph emulator is not started


def test_ctrl_c_mid_demo_still_tears_everything_down(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "demo.py"), "--workdir", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # interrupt once the whole system is up and the mailbox is watched
        seen.append(line)
        if "watching" in line:
            break
    assert _pids_with_env(f"EL_RUN_DIR={tmp_path / 'run'}"), "".join(seen)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(seen) + rest
    assert "shutting down supervisord" in rest
    assert not _pids_with_env(f"EL_RUN_DIR={tmp_path / 'run'}")
