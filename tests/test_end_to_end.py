"""Issue 4's "done when": the emulator, a real redis-server, a real `exchange-listener listen`
process and real `exchange-listener work` processes, and a webhook receiver on a local port.

Mail is delivered to the emulator over HTTP; the listener sees it on its stream and enqueues
it; the worker fetches, classifies, matches and acts; the receiver counts signed webhooks.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import threading
import time

import mail_samples as mail
import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from emulators.services import CliProcess, service_env, wait_for
from exchange_listener import queueing
from exchange_listener.listener import mailboxes
from exchange_listener.sources.base import NewMail
from workers.sinks.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    state_key,
    verify,
)
from workers.state.enrollments import OUTBOX_KEY, EnrollmentStore
from workers.state.sends import SendRegistry

MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"
SECRET = "e2e-webhook-secret"
SLOW = 60.0
QUEUE = "exchange-listener"


wait_for = functools.partial(wait_for, timeout=SLOW, interval=0.1)


class Receiver(http.server.ThreadingHTTPServer):
    """The sending platform's webhook endpoint: records every POST, answers 204."""

    def __init__(self):
        self.posts: list[tuple[dict, bytes]] = []  # accepted ones
        self.refuse = 0  # answer this many POSTs with 503 first
        self.refused = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if outer.refused < outer.refuse:
                    outer.refused += 1
                    self.send_response(503)
                else:
                    outer.posts.append(({k: v for k, v in self.headers.items()}, body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()  # quick shutdown()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/exchange-listener"


@pytest.fixture
def system(redis_server, redis_client, emulator, tmp_path):
    receiver = Receiver()
    env = service_env(redis_server.url, emulator.ews_url, heartbeat_seconds=1, lease_seconds=3, listener_id="l1",
                      webhook_url=receiver.url, webhook_secret=SECRET)
    procs: list[CliProcess] = []

    class System:
        pass

    s = System()
    s.redis, s.emulator, s.receiver, s.env, s.procs = redis_client, emulator, receiver, env, procs
    s.redis_server = redis_server
    s.sends, s.enrollments = SendRegistry(redis_client), EnrollmentStore(redis_client)

    def start(*args, name):
        proc = CliProcess(args, env, tmp_path / f"{name}.log")
        procs.append(proc)
        return proc

    s.start = start
    yield s
    for proc in procs:
        proc.stop()
    receiver.shutdown()


def jobs_of(conn, registry_class) -> set[str]:
    return set(registry_class(queue=queueing.make_queue(conn, QUEUE)).get_job_ids())


def items_of(conn, registry_class) -> set[str]:
    """Item ids carried by the jobs in one of RQ's registries (a job may carry several)."""
    found = set()
    for job in Job.fetch_many(sorted(jobs_of(conn, registry_class)), connection=conn, serializer=JSONSerializer):
        if job is not None:
            found.update(m["item_id"] for m in job.args[0]["mails"])
    return found


def send(s, enrollment: str, to=PROSPECT, cc=()) -> str:
    message_id = mail.new_id("ours.example")
    s.sends.record([message_id], enrollment, "seq-e2e", MAILBOX, to=[to], cc=list(cc))
    return message_id


def streaming(conn, count: int) -> bool:
    raw = conn.hget("el:listener:l1", "groups")
    return bool(raw) and sum(g["mailboxes"] for g in json.loads(raw) if g["connected"]) == count


def test_replies_out_of_office_bounces_receipts_through_listener_and_worker(system):
    s = system
    mailboxes.add(s.redis, [MAILBOX])
    listener = s.start("listen", name="listener")
    worker = s.start("work", "--name", "e2e-worker-1", name="worker")
    wait_for(lambda: streaming(s.redis, 1), message="the mailbox streaming")

    direct, colleague, ccd = send(s, "e-direct"), send(s, "e-colleague"), send(s, "e-cc", cc=["cam@prospect.example"])
    ooo, bounced, receipt, dup = send(s, "e-ooo"), send(s, "e-bounce"), send(s, "e-receipt"), send(s, "e-dup")
    send(s, "e-untouched")
    twice = mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=dup, references=dup)
    for raw in (
        mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=direct, references=direct),
        mail.reply(sender="chris@prospect.example", to=MAILBOX, in_reply_to=None,
                   references=f"<first@prospect.example>, {colleague}"),
        mail.reply(sender="cam@prospect.example", to=MAILBOX, in_reply_to=ccd, references=ccd),
        mail.out_of_office(sender=PROSPECT, to=MAILBOX, in_reply_to=ooo,
                           return_text="I am back in the office on 14 December 2026."),
        mail.dsn(to=MAILBOX, failed=PROSPECT, original_id=bounced),
        mail.read_receipt(sender=PROSPECT, to=MAILBOX, original_id=receipt),
        mail.unrelated(to=MAILBOX),
        twice,
        twice,
    ):
        s.emulator.deliver(MAILBOX, raw)

    expected = {"e-direct": ("stopped", "replied"), "e-colleague": ("stopped", "replied"),
                "e-cc": ("stopped", "replied"), "e-ooo": ("paused", "auto_reply"),
                "e-bounce": ("stopped", "bounced"), "e-dup": ("stopped", "replied")}

    def states():
        return {e: (g["status"], g["reason"]) for e in expected if (g := s.enrollments.get(e))}

    wait_for(lambda: states() == expected, message=f"transitions {expected}")
    assert s.enrollments.get("e-ooo")["paused_until"].startswith("2026-12-14")
    # every mail processed (the receipt, the unrelated mail and both copies of the duplicate
    # included) before anything is said about what they did not change
    wait_for(lambda: sum(line.get("items", 0) for line in worker.lines() if line.get("event") == "job done") >= 9,
             message="all nine mails processed")
    assert states() == expected
    for enrollment in ("e-receipt", "e-untouched"):
        got = s.enrollments.get(enrollment)
        assert (got["status"], got["version"]) == ("active", 0), enrollment
    assert len(s.enrollments.history("e-dup")) == 1

    # the webhook: exactly one correctly signed POST per transition. An outbox entry leaves
    # only after its POST was answered, so once the outbox is empty every POST the worker will
    # ever make for these transitions has reached the receiver; a redelivery (an entry left
    # behind, or a second transition) keeps the outbox from emptying or adds a POST.
    transitions = {h["id"] for e in expected for h in s.enrollments.history(e)}
    assert len(transitions) == len(expected)
    wait_for(lambda: s.redis.zcard(OUTBOX_KEY) == 0, message="the outbox delivered and emptied")
    assert len(s.receiver.posts) == len(expected)
    seen = {}
    for headers, body in s.receiver.posts:
        assert verify(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        data = json.loads(body)
        assert headers[DELIVERY_HEADER] == data["id"]
        seen[data["enrollment_id"]] = (data["status"], data["reason"])
    assert seen == expected
    assert {headers[DELIVERY_HEADER] for headers, _ in s.receiver.posts} == transitions
    assert listener.alive() and worker.alive()


def test_hostile_mail_never_takes_the_worker_down(system):
    s = system
    mailboxes.add(s.redis, [MAILBOX])
    s.start("listen", name="listener")
    worker = s.start("work", name="worker")
    wait_for(lambda: streaming(s.redis, 1), message="the mailbox streaming")
    sent = send(s, "e-after")

    no_id = b"\r\n".join(l for l in mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to="<x@y.example>",
                                               references=None).split(b"\r\n") if not l.startswith(b"Message-ID:"))
    hostile = [
        (b"From: x@prospect.example\r\nTo: rep@ours.example\r\nSubject: Re: hi\r\nMessage-ID: <b@prospect.example>\r\n"
         b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"nope\r\n\r\n--nope\r\n"
         b"Content-Type: message/delivery-status\r\n\r\nStatus: 5.\xff\r\n"),  # broken MIME
        (b"From: R <r@prospect.example>\r\nTo: rep@ours.example\r\nSubject: Re: cafe\r\nMessage-ID: <l@prospect.example>\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n\r\ncaf\xe9 \xff\xfe\r\n"),  # non-UTF-8 body
        no_id,  # missing Message-ID
        mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to="<a@b.example>\r\nBcc: victim@x.example",
                   references=None, subject="Re: x\r\nX-Injected: 1"),  # header injection attempt
        mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=None,
                   references=" ".join(f"<r{n}@thread.example>" for n in range(10_000))),  # 10,000-id References
    ]
    items = {s.emulator.deliver(MAILBOX, raw)["item_id"] for raw in hostile}
    wait_for(lambda: items <= items_of(s.redis, FinishedJobRegistry) | items_of(s.redis, FailedJobRegistry),
             message="every hostile mail's job finished or failed")
    logged = {line.get("job_id") for line in worker.lines() if line.get("event") in ("job done", "job failed")}
    assert jobs_of(s.redis, FinishedJobRegistry) <= logged  # each with its log line
    assert worker.alive()
    # and the worker still does its work afterwards
    s.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent))
    wait_for(lambda: (s.enrollments.get("e-after") or {}).get("status") == "stopped", message="later reply processed")
    failed = [line for line in worker.lines() if line.get("event") == "job failed"]
    assert failed == [] and not items_of(s.redis, FailedJobRegistry), failed


@pytest.mark.slow
def test_a_killed_workers_job_runs_again_within_two_minutes(system):
    """kill -9 a worker in the middle of a job (its GetItem stuck on a slow server); the worker
    restarted under the same name (as supervisord does) completes the job within 2 minutes,
    with default settings."""
    s = system
    sent = send(s, "e-killed")
    item_id = s.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                     references=sent))["item_id"]
    s.emulator.fault(kind="latency", ms=30_000)
    queue = queueing.make_queue(s.redis, QUEUE)
    job = queueing.enqueue_new_mail(queue, [NewMail(MAILBOX, item_id, "inbox", time.time())])
    first = s.start("work", "--name", "e2e-doomed", name="worker-1")
    wait_for(lambda: job.get_status(refresh=True) == "started", message="the job running")
    time.sleep(1.0)  # well inside the stuck GetItem
    first.kill9()
    killed_at = time.monotonic()
    s.emulator.fault(kind="latency", ms=0)
    second = s.start("work", "--name", "e2e-doomed", name="worker-2")
    wait_for(lambda: (s.enrollments.get("e-killed") or {}).get("status") == "stopped", timeout=150,
             interval=0.5, message="the killed worker's job completed by the other worker")
    elapsed = time.monotonic() - killed_at
    print(f"killed worker's job completed {elapsed:.1f}s after the kill")
    assert elapsed < 120, f"took {elapsed:.0f}s"
    # the stop is written inside the job; RQ marks the job finished just after it returns
    wait_for(lambda: job.get_status(refresh=True) == "finished", timeout=30, message="the job marked finished")
    assert second.alive()
    assert any(line.get("event", "").startswith("previous worker with this name is dead") for line in second.lines())
    # the killed worker's scheduler noticed and went away instead of lingering as an orphan
    wait_for(lambda: not _has_children_named(first.proc.pid), timeout=10, message="no orphaned scheduler")


def _has_children_named(pgid: int) -> bool:
    """Any live process still in the killed worker's process group."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.mark.slow
def test_sigterm_is_a_warm_shutdown(system):
    """SIGTERM while a job runs: the job finishes, then the worker exits 0."""
    s = system
    sent = send(s, "e-warm")
    item_id = s.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                     references=sent))["item_id"]
    s.emulator.fault(kind="latency", ms=3_000)
    queue = queueing.make_queue(s.redis, QUEUE)
    job = queueing.enqueue_new_mail(queue, [NewMail(MAILBOX, item_id, "inbox", time.time())])
    worker = s.start("work", name="worker")
    wait_for(lambda: job.get_status(refresh=True) == "started", message="the job running")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    s.emulator.fault(kind="latency", ms=0)
    assert job.get_status(refresh=True) == "finished"
    assert s.enrollments.get("e-warm")["status"] == "stopped"


@pytest.mark.slow
def test_a_worker_outlives_a_redis_restart_mid_job_and_then_does_its_work(system):
    """Redis goes away while a job runs and comes back empty (no persistence here). The worker
    waits for it instead of exiting, and processes the next reply."""
    s = system
    sent = send(s, "e-during")
    item_id = s.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                     references=sent))["item_id"]
    s.emulator.fault(kind="latency", ms=3_000)
    job = queueing.enqueue_new_mail(queueing.make_queue(s.redis, QUEUE), [NewMail(MAILBOX, item_id, "inbox", time.time())])
    worker = s.start("work", "--name", "e2e-redis-restart", name="worker")
    wait_for(lambda: job.get_status(refresh=True) == "started", message="the job running")
    s.redis_server.stop()
    # the job ends (its GetItem answered) while Redis is away: the worker meets the outage
    # and says it will start again, instead of exiting
    wait_for(lambda: any(line.get("event") == "redis unreachable; worker starts again after a pause"
                         for line in worker.lines()) or not worker.alive(),
             message="the worker meeting the outage")
    assert worker.alive(), worker.lines()[-5:]
    s.emulator.fault(kind="latency", ms=0)
    s.redis_server.start()
    sent = send(s, "e-after-restart")
    item_id = s.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                     references=sent))["item_id"]
    queueing.enqueue_new_mail(queueing.make_queue(s.redis, QUEUE), [NewMail(MAILBOX, item_id, "inbox", time.time())])
    wait_for(lambda: (s.enrollments.get("e-after-restart") or {}).get("status") == "stopped",
             message="the reply processed after the restart")
    assert worker.alive()
    assert worker.terminate(30) == 0


@pytest.mark.slow
def test_a_webhook_that_fails_at_first_gets_the_transition_once_later(system):
    """The receiver answers 503 twice: the worker's outbox drain retries with backoff and the
    platform gets the transition exactly once, without another mail arriving."""
    s = system
    s.receiver.refuse = 2
    sent = send(s, "e-hook")
    item_id = s.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                     references=sent))["item_id"]
    queueing.enqueue_new_mail(queueing.make_queue(s.redis, QUEUE), [NewMail(MAILBOX, item_id, "inbox", time.time())])
    worker = s.start("work", name="worker")
    wait_for(lambda: s.enrollments.get("e-hook")["status"] == "stopped", message="the reply processed")
    # two refusals, each retried after its backoff (2 s, then 4 s) by the worker's drain timer;
    # the entry leaves the outbox only once a POST was accepted, so an empty outbox means the
    # platform has every POST it will ever get for this transition
    wait_for(lambda: s.receiver.posts and s.redis.zcard(OUTBOX_KEY) == 0, timeout=45,
             message="the webhook delivered after the receiver recovered, and the outbox emptied")
    assert s.receiver.refused == 2 and len(s.receiver.posts) == 1
    assert not s.redis.exists(state_key(json.loads(s.receiver.posts[0][1])["id"]))  # no retry left scheduled
    headers, body = s.receiver.posts[0]
    assert verify(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert json.loads(body)["enrollment_id"] == "e-hook"
    assert any(line.get("event") == "transition notification failed, will retry" for line in worker.lines())
