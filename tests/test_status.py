"""``exchange-listener status`` exits 0 when healthy and 1 when not, so a monitor can call it.

Every state is made by the real parts: listener and worker processes, the emulator, RQ's own
suspension, and the mailbox and queue modules; nothing writes the keys status reads by hand.
"""
from __future__ import annotations

import email.utils
import json
import subprocess
import sys
import time

import pytest
from rq import suspension

from emulators.services import CliProcess, service_env, wait_for
from exchange_listener.listener import mailboxes
from exchange_listener.queueing import enqueue_new_mail, make_queue
from exchange_listener.sources.base import NewMail
from workers.state.sends import SendRegistry

QUEUE = "el-status-test"


def settings_env(redis_server, emulator=None) -> dict:
    # The session's redis-server keeps nothing on disk: accepted here, judged in test_redis_policy.py.
    return service_env(redis_server.url, emulator.ews_url if emulator else "", queue_name=QUEUE, lease_seconds=5,
                       heartbeat_seconds=1, worker_ttl=15, allow_volatile_redis="true")


def status(env: dict, *flags: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "status", "--json", *flags],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.fixture
def spawn(tmp_path):
    """Start ``exchange-listener ARGS`` processes; every one is stopped after the test."""
    procs: list[CliProcess] = []

    def start(env: dict, *args: str) -> CliProcess:
        procs.append(CliProcess(args, env, tmp_path / f"{args[0]}-{len(procs)}.log"))
        return procs[-1]

    yield start
    for proc in procs:
        try:
            proc.terminate(20)
        finally:
            proc.stop()


def test_empty_system_is_healthy(redis_client, redis_server):
    code, snap = status(settings_env(redis_server))
    assert code == 0
    assert snap["healthy"] is True and snap["problems"] == []
    assert snap["queue"]["depth"] == 0 and snap["workers"] == [] and snap["listeners"] == []
    # every earlier field is still there, and the Redis facts joined them
    assert {"checked_at", "listeners", "mailboxes", "queue", "workers", "last_hour", "notifications_failed",
            "redis"} <= set(snap)
    assert snap["redis"]["allow_volatile_redis"] is True and snap["redis"]["appendonly"] == "no"
    assert snap["redis"]["problems"]  # seen, and accepted by the setting


@pytest.mark.slow
def test_running_listener_and_worker_are_healthy_and_shown(redis_client, redis_server, emulator, spawn):
    env = settings_env(redis_server, emulator)
    mailboxes.add(redis_client, ["rep.one@example.com", "rep.two@example.com"])
    code, snap = status(env)
    assert code == 1  # watched, but nobody streams them yet
    assert sorted(snap["mailboxes"]["unowned"]) == ["rep.one@example.com", "rep.two@example.com"]

    spawn(env, "listen")
    spawn(env, "work", "--name", "status-worker")

    def healthy():
        code, snap = status(env)
        streaming = [g for item in snap["listeners"] for g in item["groups"] if g["connected"]]
        return snap if code == 0 and snap["workers"] and sum(g["mailboxes"] for g in streaming) == 2 else None

    snap = wait_for(healthy, timeout=60, message="a healthy status")
    assert snap["mailboxes"] == {"watched": 2, "held": 2, "unowned": []}
    (listener,) = snap["listeners"]
    assert listener["mailboxes"] == 2
    assert listener["last_heartbeat_age_s"] < 5
    assert sum(g["mailboxes"] for g in listener["groups"]) == 2
    assert all(g["connected"] for g in listener["groups"])
    (worker,) = snap["workers"]
    assert worker["name"] == "status-worker" and worker["state"] in ("idle", "busy")

    # A reply stops an enrollment: counted under the last hour's stops.
    send = SendRegistry(redis_client).record(["<s-1@seller.example>"], "enr-1", "seq-1", "rep.one@example.com",
                                             ["dana@prospect.example"])
    emulator.deliver("rep.one@example.com", (
        "From: Dana <dana@prospect.example>\r\nTo: rep.one@example.com\r\nSubject: RE: hello\r\n"
        f"Message-ID: <r-1@prospect.example>\r\nDate: {email.utils.formatdate(usegmt=True)}\r\n"
        f"In-Reply-To: {send.message_ids[0]}\r\nReferences: {send.message_ids[0]}\r\n\r\nLet's talk.\r\n").encode())
    def stopped():
        snap = status(env)[1]
        return snap if snap["last_hour"]["stops"] else None

    snap = wait_for(stopped, timeout=60, message="the stop")
    assert snap["last_hour"]["stops_by_reason"] == {"replied": 1} and snap["last_hour"]["pauses"] == 0

    text = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "status"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "HEALTHY" in text.stdout and listener["id"] in text.stdout and "status-worker" in text.stdout
    assert "Last hour: 1 stopped (replied 1), 0 paused" in text.stdout


@pytest.mark.slow
def test_killed_listener_is_stale_and_its_mailboxes_unowned(redis_client, redis_server, emulator, spawn):
    env = settings_env(redis_server, emulator)
    mailboxes.add(redis_client, ["rep.one@example.com"])
    listener = spawn(env, "listen")
    wait_for(lambda: status(env)[1]["mailboxes"]["held"] == 1, timeout=60, message="the listener to hold the mailbox")
    listener.kill9()  # no lease released, no goodbye

    def unhealthy():
        code, snap = status(env, "--stale-listener", "2")
        stale = [p for p in snap["problems"] if "stale" in p]
        return (code, snap) if code == 1 and stale and snap["mailboxes"]["unowned"] else None

    _, snap = wait_for(unhealthy, timeout=30, message="stale listener and unowned mailbox")
    assert snap["mailboxes"]["unowned"] == ["rep.one@example.com"]
    assert snap["healthy"] is False


def test_jobs_with_no_worker_then_a_stuck_queue_then_healthy(redis_client, redis_server, spawn):
    env = settings_env(redis_server)
    queue = make_queue(redis_client, QUEUE)
    enqueue_new_mail(queue, [NewMail("rep.one@example.com", "AAMkAD-item-1", "inbox", time.time())], retries=0)
    code, snap = status(env)
    assert code == 1
    assert snap["queue"]["depth"] == 1 and any("no worker" in p for p in snap["problems"])

    # A worker that exists but takes nothing (RQ suspended): the job ages past the limit.
    suspension.suspend(redis_client)
    spawn(env, "work", "--name", "suspended-worker")
    wait_for(lambda: status(env)[1]["workers"], timeout=60, message="the worker to register")

    def stuck():  # once the job is a second old
        code, snap = status(env, "--stuck-queue", "1")
        return (code, snap) if any("stuck" in p for p in snap["problems"]) else None

    code, snap = wait_for(stuck, timeout=30, message="the queue reported stuck")
    assert code == 1, snap
    assert any("stuck" in p for p in snap["problems"])
    assert snap["queue"]["oldest_job_age_s"] >= 1
    assert status(env, "--stuck-queue", "600")[0] == 0  # same facts, a more patient limit

    suspension.resume(redis_client)  # the worker takes the job (it fails: no EWS configured)
    def settled():
        code, snap = status(env, "--stuck-queue", "1")
        return (code, snap) if snap["queue"]["depth"] == 0 and snap["queue"]["running"] == 0 else None

    code, snap = wait_for(settled, timeout=60, message="the queue to drain")
    assert code == 0, snap
    assert snap["queue"]["failed"] == 1  # shown, not a health problem by itself
