"""``redis_url = redis+sentinel://...``: every part follows the primary through a failover.

Real processes only: a primary, a replica and three ``redis-server --sentinel`` on loopback
ports (``local_services.SentinelGroup``), the EWS emulator, and ``exchange-listener`` commands,
a listener and a worker as child processes. The primary is killed with SIGKILL, as a crash
would; the Sentinels promote the replica on their own.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import mail_samples as mail
import pytest
import redis
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from emulators.services import (
    CliProcess,
    SentinelGroup,
    service_env,
    wait_for,
)
from exchange_listener.core import redis_conn
from exchange_listener.core.config import ConfigError
from exchange_listener.listener import mailboxes
from exchange_listener.queueing import make_queue
from workers.state.enrollments import STREAM_KEY, EnrollmentStore
from workers.state.sends import SendRegistry

MAILBOX = "rep@ours.example"
PROSPECT_DOMAIN = "prospect.example"


@pytest.fixture
def group():
    with SentinelGroup() as started:
        yield started


def cli(url: str, *args: str, ews_url: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exchange_listener.cli", *args], env=service_env(url, ews_url),
                          capture_output=True, text=True, timeout=60, check=False)


def direct(port: int) -> redis.Redis:
    """A plain connection to one data server, to see where a write really landed."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def kill_primary(group: SentinelGroup) -> tuple[int, float]:
    """SIGKILL the current primary; its port and the wall-clock time of the kill."""
    port = group.primary_port()
    group.server(port).kill()
    return port, time.time()


@pytest.mark.parametrize(("url", "sentinels", "master", "db", "password", "sentinel_password"), [
    ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster/3", [("10.0.0.1", 26379), ("10.0.0.2", 26380)],
     "mymaster", 3, None, None),
    ("redis+sentinel://:p%40ss@sentinel-a,[::1]:26381/mymaster", [("sentinel-a", 26379), ("::1", 26381)],
     "mymaster", 0, "p@ss", None),
    ("redis+sentinel://s1:26379/mymaster/0?sentinel_password=other", [("s1", 26379)], "mymaster", 0, None, "other"),
])
def test_sentinel_urls_parse(url, sentinels, master, db, password, sentinel_password):
    target = redis_conn.parse_sentinel_url(url)
    assert (list(target.sentinels), target.master, target.db) == (sentinels, master, db)
    assert (target.password, target.sentinel_password) == (password, sentinel_password)
    assert "p@ss" not in repr(target) and "other" not in repr(target)


@pytest.mark.parametrize(("url", "names"), [
    ("redis+sentinel://:s3cret@127.0.0.1:26379", "no MASTER_NAME"),
    ("redis+sentinel://:s3cret@127.0.0.1:26379/mymaster/zero", "DB must be a number"),
    ("redis+sentinel://:s3cret@127.0.0.1:notaport/mymaster", "no valid port"),
    ("redis+sentinel://127.0.0.1:26379/mymaster?sentinel_password=s3cret&colour=blue", "unknown query parameter"),
])
def test_a_bad_sentinel_url_is_a_configuration_error_without_the_password(url, names):
    with pytest.raises(ConfigError) as caught:
        redis_conn.connect(url)
    assert str(caught.value).startswith("redis_url: ") and names in str(caught.value)
    assert "s3cret" not in str(caught.value)
    done = cli(url, "status")  # the operator's view: exit 2, one line naming the key
    assert done.returncode == 2 and "redis_url: " in done.stderr and names in done.stderr
    assert "s3cret" not in done.stderr + done.stdout


@pytest.mark.slow
def test_every_cli_command_works_over_sentinel_and_follows_a_failover(group):
    url = group.url
    done = cli(url, "status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    snap = json.loads(done.stdout)
    assert snap["redis"]["server"].startswith(f"127.0.0.1:{group.primary.port} ")
    assert snap["redis"]["appendonly"] == "yes" and snap["redis"]["problems"] == []
    assert cli(url, "mailboxes", "add", MAILBOX).stdout.strip() == f"added: {MAILBOX}"
    recorded = cli(url, "sends", "record", "--message-id", "<s-1@ours.example>", "--enrollment", "e-1",
                   "--sequence", "seq", "--mailbox", MAILBOX, "--to", f"pat@{PROSPECT_DOMAIN}")
    assert recorded.returncode == 0, recorded.stderr
    assert json.loads(cli(url, "sends", "show", "<s-1@ours.example>").stdout)["enrollment_id"] == "e-1"
    assert cli(url, "enrollments", "show", "e-unknown").returncode == 1  # reached Redis, found nothing
    assert cli(url, "jobs", "queue").returncode == 0
    assert MAILBOX in mailboxes.list_all(direct(group.primary.port))  # written on the primary itself

    conn = redis_conn.connect(url)
    run_id = redis_conn.server_run_id(conn)
    old, _ = kill_primary(group)
    wait_for(lambda: group.primary_port() not in (None, old), timeout=30, message="the Sentinels' failover")
    new = group.primary_port()

    def listed():
        done = cli(url, "mailboxes", "list")
        return done if done.returncode == 0 else None

    assert MAILBOX in wait_for(listed, timeout=30, message="mailboxes list after the failover").stdout
    assert cli(url, "mailboxes", "add", "second@ours.example").returncode == 0
    assert "second@ours.example" in mailboxes.list_all(direct(new))
    assert redis_conn.server_run_id(conn) not in (None, run_id)  # how a process can tell a failover happened
    snap = json.loads(cli(url, "status", "--json").stdout)
    assert snap["redis"]["server"].startswith(f"127.0.0.1:{new} ")
    assert json.loads(cli(url, "sends", "show", "<s-1@ours.example>").stdout)["enrollment_id"] == "e-1"


@pytest.mark.slow
def test_failover_during_a_reply_stream_loses_nothing_and_duplicates_nothing(group, emulator, tmp_path, capsys):
    count, interval, kill_after = 40, 0.15, 15
    conn = redis_conn.connect(group.url)
    mailboxes.add(conn, [MAILBOX])
    sends = SendRegistry(conn)
    message_ids = {}
    for n in range(count):
        message_ids[f"e-{n:02d}"] = mail.new_id("ours.example")
        sends.record([message_ids[f"e-{n:02d}"]], f"e-{n:02d}", "seq-failover", MAILBOX, [f"p{n}@{PROSPECT_DOMAIN}"])

    env = service_env(group.url, emulator.ews_url, heartbeat_seconds=1, lease_seconds=5, listener_id="l1",
                      worker_ttl=10)
    commands = {"listener": ["listen"], "worker": ["work", "--name", "failover-worker"]}
    procs = {name: CliProcess(args, env, tmp_path / f"{name}-0.log") for name, args in commands.items()}
    exits: list[str] = []

    def supervise() -> None:
        """Restart an exited process as supervisord would in production, and remember the exit."""
        for name, proc in procs.items():
            if not proc.alive():
                last = [line.get("event") for line in proc.lines()][-1:]
                exits.append(f"{name} exited with {proc.proc.returncode}: {last}")
                procs[name] = CliProcess(commands[name], env, tmp_path / f"{name}-{len(exits)}.log")

    try:
        def streaming():
            raw = conn.hget("el:listener:l1", "groups")
            return raw and sum(g["mailboxes"] for g in json.loads(raw) if g["connected"]) == 1

        wait_for(streaming, timeout=30, message="the mailbox streaming")
        wait_for(lambda: conn.hget("rq:worker:failover-worker", "state") == b"idle", timeout=30,
                 message="the worker idle")

        switched: list[float] = []
        killed: list[tuple[int, float]] = []

        def watch_sentinels():  # when did the Sentinels name a new primary?
            while not switched:
                if killed and group.primary_port() not in (None, killed[0][0]):
                    switched.append(time.time())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch_sentinels, daemon=True)
        watcher.start()
        for n, (enrollment, message_id) in enumerate(message_ids.items()):
            emulator.deliver(MAILBOX, mail.reply(sender=f"p{n}@{PROSPECT_DOMAIN}", to=MAILBOX,
                                                 in_reply_to=message_id, references=message_id))
            if n == kill_after:
                killed.append(kill_primary(group))
            time.sleep(interval)

        store = EnrollmentStore(conn)

        def all_stopped():
            supervise()
            try:
                states = store.get_many(list(message_ids))
            except redis.exceptions.RedisError:
                return False
            return all(s and s["status"] == "stopped" for s in states)

        try:
            # Usually all are stopped within seconds of the failover. A job RQ had just moved to its
            # intermediate list when the primary died is run again by RQ's own cleanup, which waits
            # a fixed minute plus up to two maintenance intervals (worker_ttl): hence the bound.
            # (A job that failed at the failover no longer waits a minute for its retry: our
            # scheduler process keeps its loop and its lock through the failover; see
            # tests/test_rq_contract.py::test_the_scheduler_outlives_a_redis_restart_...)
            wait_for(all_stopped, timeout=100, interval=0.2, message=f"all {count} enrollments stopped")
        except AssertionError:
            states = dict(zip(message_ids, store.get_many(list(message_ids))))
            missing = sorted(e for e, s in states.items() if not s or s["status"] != "stopped")
            noisy = [line for proc in procs.values() for line in proc.lines() if line.get("level") in ("warning", "error")]
            raise AssertionError(f"not stopped after the failover: {missing}; process exits: {exits}; "
                                 f"warnings: {noisy[-30:]}") from None
        finally:
            watcher.join(5)
        # a duplicate transition would come from a job run again: wait until RQ holds none anywhere
        # (queued, started, in its intermediate list or waiting to retry), then count
        queue = make_queue(conn, "exchange-listener")

        def settled():
            supervise()
            try:
                return (queue.count == 0 and StartedJobRegistry(queue=queue).count == 0
                        and ScheduledJobRegistry(queue=queue).count == 0
                        and conn.llen(queue.intermediate_queue_key) == 0)
            except redis.exceptions.RedisError:
                return False

        wait_for(settled, timeout=100, interval=0.2, message="no job left queued, running or to retry")

        per_enrollment: dict[str, int] = {}
        entries = conn.xrange(STREAM_KEY, "-", "+")
        for _entry_id, fields in entries:
            data = json.loads(fields[b"data"])
            per_enrollment[data["enrollment_id"]] = per_enrollment.get(data["enrollment_id"], 0) + 1
        assert per_enrollment == {e: 1 for e in message_ids}, "one transition per enrollment, no more"
        for enrollment in message_ids:
            (only,) = store.history(enrollment)
            assert (only["status"], only["reason"]) == ("stopped", "replied")

        _, killed_at = killed[0]
        after = [int(entry_id.split(b"-")[0]) / 1000 for entry_id, _ in entries
                 if int(entry_id.split(b"-")[0]) / 1000 > killed_at]
        assert after, "replies delivered after the kill were processed on the new primary"
        figures = {"process_exits": len(exits), "failover_s": round(switched[0] - killed_at, 2) if switched else None,
                   "first_transition_after_kill_s": round(min(after) - killed_at, 2),
                   "last_transition_after_kill_s": round(max(after) - killed_at, 2),
                   "jobs_retried": sum("scheduled for retry" in (line.get("event") or "")
                                       for proc in procs.values() for line in proc.lines()),
                   "transitions_before_kill": len(entries) - len(after), "transitions_after_kill": len(after)}
        with capsys.disabled():
            print(f"\nsentinel failover during a reply stream: {json.dumps(figures)}")
        # Nothing was lost even with restarts; but listener and worker promise to wait out a Redis
        # outage themselves (workers/worker.py), so an exit is a failure of its own.
        supervise()
        assert exits == [], f"a process exited during the failover instead of waiting for the new primary: {exits}"
    finally:
        for proc in procs.values():
            proc.stop()
