"""``exchange-listener jobs failed`` (``make failed``): failed RQ jobs exactly as before, then the
notifications the outbox gave up on, against a real redis-server, a real worker and a real HTTP
receiver."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rq import SimpleWorker
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from emulators.services import wait_for
from exchange_listener import queueing
from workers.sinks.webhooks import Notifier
from workers.state.enrollments import EnrollmentStore

QUEUE = "exchange-listener"  # the default queue_name: the command reads it from the settings
SECRET = "jobs-command-secret"


def cli(redis_server, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
    env["EXCHANGE_LISTENER_REDIS_URL"] = redis_server.url
    done = subprocess.run([sys.executable, "-m", "exchange_listener.cli", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def failing_receiver():
    """A webhook receiver that answers every POST with HTTP 500."""
    posts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks", posts
    server.shutdown()
    server.server_close()


def fail_a_job(redis_client):
    """A job of the mailbox that fails under a real worker (no retries): the failed registry's row."""
    queue = queueing.make_queue(redis_client, QUEUE)
    job = queue.enqueue("json.loads", {"mailbox": "rep@us.example", "mails": []}, failure_ttl=3600)
    SimpleWorker([queue], connection=redis_client, serializer=JSONSerializer).work(burst=True)
    assert job.id in FailedJobRegistry(queue=queue)
    return job


def give_up_a_notification(redis_client, url):
    """A transition whose webhook answers 500 until the outbox gives up (2 attempts), and one
    that is merely pending: only the first is a failure."""
    store = EnrollmentStore(redis_client)
    failed = store.transition("e-hook", "stopped", "replied", event_key="reply:1", by="pat@prospect.example",
                              mailbox="rep@us.example")
    notifier = Notifier(redis_client, webhook_url=url, webhook_secret=SECRET, max_attempts=2, backoff_base=0.05)

    def given_up():
        notifier.drain()
        return notifier.failed()

    wait_for(given_up, timeout=30, interval=0.05, message="the outbox gave the transition up")
    pending = store.transition("e-later", "paused", "auto_reply", event_key="ooo:1")
    return failed, pending


def test_with_nothing_failed_the_output_is_as_before(redis_server, redis_client):
    assert cli(redis_server, "jobs", "failed") == "0 failed job(s)\n"
    assert cli(redis_server, "jobs", "failed", "--json") == ""


def test_failed_jobs_are_listed_as_before_and_given_up_notifications_after_them(redis_server, redis_client,
                                                                               failing_receiver):
    url, posts = failing_receiver
    job = fail_a_job(redis_client)
    failed, pending = give_up_a_notification(redis_client, url)
    assert [p["id"] for p in posts] == [failed.id, failed.id]  # really tried, twice

    lines = cli(redis_server, "jobs", "failed").splitlines()
    # the failed-job part, unchanged: "id  mailbox  ended_at  last error line", then the count
    job_id, mailbox, ended_at, error = lines[0].split("  ", 3)
    assert (job_id, mailbox) == (job.id, "rep@us.example") and ended_at.startswith("20")
    assert error.startswith("TypeError: the JSON object must be str")
    assert lines[1] == "1 failed job(s)"
    # then the notifications, under their own heading that says how to send them again
    assert lines[2].startswith("1 failed notification(s)")
    assert "exchange-listener enrollments outbox --retry-failed" in lines[2]
    assert lines[3].startswith(f"{failed.id}  rep@us.example  20")
    assert "enrollment e-hook v1 stopped  2 attempt(s): " in lines[3] and "HTTP 500" in lines[3]
    assert len(lines) == 4 and pending.id not in "\n".join(lines)  # pending is not failed

    rows = [json.loads(line) for line in cli(redis_server, "jobs", "failed", "--json").splitlines()]
    assert rows[0] == {"id": job.id, "mailbox": "rep@us.example", "ended_at": rows[0]["ended_at"],
                       "error": error}  # the job row: the same four fields as before, no "kind"
    assert len(rows) == 2 and rows[1]["kind"] == "notification"
    assert (rows[1]["id"], rows[1]["enrollment_id"], rows[1]["version"], rows[1]["status"], rows[1]["attempts"]) \
        == (failed.id, "e-hook", 1, "stopped", 2)
    assert rows[1]["mailbox"] == "rep@us.example" and "HTTP 500" in rows[1]["error"] and rows[1]["ended_at"]

    # the command it names really sends them again; requeue-failed leaves them to it
    assert "requeued 1 of 1 failed job(s)" in cli(redis_server, "jobs", "requeue-failed")
    assert Notifier(redis_client).failed() != []
    retried = json.loads(cli(redis_server, "enrollments", "outbox", "--retry-failed"))
    assert retried["retried"] == 1 and retried["failed"] == []
    assert cli(redis_server, "jobs", "failed", "--json") == ""


def test_the_limit_applies_to_each_part(redis_server, redis_client, failing_receiver):
    url, _ = failing_receiver
    fail_a_job(redis_client)
    give_up_a_notification(redis_client, url)
    EnrollmentStore(redis_client).transition("e-hook-2", "stopped", "replied", event_key="reply:2")
    notifier = Notifier(redis_client, webhook_url=url, webhook_secret=SECRET, max_attempts=1)
    wait_for(lambda: (notifier.drain(), len(notifier.failed()) == 2)[1], timeout=30, message="a second given up")
    lines = cli(redis_server, "jobs", "failed", "--limit", "1").splitlines()
    assert lines[1] == "1 failed job(s)" and lines[2].startswith("2 failed notification(s)")
    assert len(lines) == 4  # one job row, one notification row
