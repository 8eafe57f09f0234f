"""Under supervisord with the shipped configuration, restarting a process loses no reply.

deploy/demo/supervisord.conf (which includes the production deploy/programs.conf) runs Redis,
the emulator, one listener and two workers on free ports. While replies arrive steadily, the
listener and then the workers are restarted with ``supervisorctl restart``; every reply's
enrollment must end stopped (replied), exactly once.
"""
from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import demo
import demo_messages

from exchange_listener.core import redis_conn
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

# Replies arrive every INTERVAL seconds until TAIL more have arrived after the workers' restart
# returned: the stream outlasts both restarts however long they take on a loaded machine, and
# stops soon after instead of running a fixed ~16 s. MAX_REPLIES sends are recorded up front.
INTERVAL = 0.2
BEFORE_LISTENER, BETWEEN, TAIL = 8, 10, 6
MAX_REPLIES = 150


def _scenario(n: int) -> demo_messages.Scenario:
    return demo_messages.Scenario(f"enr-sup-{n:03d}", "prospect replies", (f"prospect{n}@acme-corp.example",), (),
                                  f"Close faster, part {n}", "stopped", "replied", demo_messages.prospect_reply)


def _restart(run: demo.Demo, name: str) -> dict:
    done = run.supervisorctl("restart", name, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    status = run.supervisorctl("status").stdout
    return {line.split()[0]: line.split()[1] for line in status.splitlines() if line.strip()}


def test_restarting_listener_and_workers_mid_stream_loses_no_reply(tmp_path):
    run = demo.Demo(tmp_path, timeout=60)
    run.prepare()
    try:
        run.start()
        conn = redis_conn.connect(f"redis://127.0.0.1:{run.redis_port}/0")
        run.el("mailboxes", "add", demo_messages.MAILBOX)
        run.wait_subscribed(conn)

        registry = SendRegistry(conn)
        scenarios = [_scenario(n) for n in range(MAX_REPLIES)]
        send_ids = {}
        for s in scenarios:
            send_ids[s.enrollment] = f"<sup-{s.enrollment}@northwind.example>"
            registry.record([send_ids[s.enrollment]], s.enrollment, demo_messages.SEQUENCE, demo_messages.MAILBOX, s.to)

        delivered: list[str] = []
        errors: list[BaseException] = []
        until: list[int] = []  # the count after which delivery ends, once the workers are back

        def deliver_steadily() -> None:
            try:
                for s in scenarios:
                    if until and len(delivered) >= until[0]:
                        return
                    run.deliver(s.build(s, send_ids[s.enrollment], dt.datetime.now(dt.UTC)))
                    delivered.append(s.enrollment)
                    time.sleep(INTERVAL)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        sender = threading.Thread(target=deliver_steadily, daemon=True)
        sender.start()
        while len(delivered) < BEFORE_LISTENER and sender.is_alive():
            time.sleep(0.05)
        states = _restart(run, "listener")
        assert states["listener"] == "RUNNING"
        at_listener_restart = len(delivered)
        while len(delivered) < at_listener_restart + BETWEEN and sender.is_alive():
            time.sleep(0.05)
        states = _restart(run, "worker:*")
        assert states["worker:worker-00"] == "RUNNING" and states["worker:worker-01"] == "RUNNING"
        at_worker_restart = len(delivered)
        until.append(at_worker_restart + TAIL)
        sender.join(120)
        assert not errors, errors
        assert not sender.is_alive()
        # both restarts happened while replies were still arriving, and more arrived after them
        assert 0 < at_listener_restart < at_worker_restart < len(delivered) == at_worker_restart + TAIL
        scenarios = [s for s in scenarios if s.enrollment in set(delivered)]

        store = EnrollmentStore(conn)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = store.get_many([s.enrollment for s in scenarios])
            if all(st and st["status"] == "stopped" for st in states):
                break
            time.sleep(0.5)
        missing = [s.enrollment for s, st in zip(scenarios, states) if not st or st["status"] != "stopped"]
        assert not missing, f"{len(missing)} replies lost: {missing} (logs: {run.log_dir})"
        assert all(st["reason"] == "replied" and st["version"] == 1 for st in states)  # exactly one transition each
    finally:
        run.shutdown()
