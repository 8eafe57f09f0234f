"""A reply counts wherever it is when a worker gets to it (issue 9, point 1): real `listen` and
`work` processes, a real redis-server, the EWS emulator over HTTP.

Workers are drained (not running) while the rep moves replies to a folder, to Deleted Items, or
hard-deletes them (to Recoverable Items); each move gives the item a new id. When the worker
starts, every one of them must still stop its enrollment. Only a mail that exists nowhere is
reported gone: in the job's result and the log.
"""
from __future__ import annotations

import email
import functools
import json

import mail_samples as mail
import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from emulators.services import CliProcess, service_env, wait_for
from exchange_listener import queueing
from exchange_listener.listener import mailboxes
from exchange_listener.mail.message_ids import normalize
from exchange_listener.sources.ledger import Ledger, identity
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"
QUEUE = "exchange-listener"
wait_for = functools.partial(wait_for, timeout=60.0, interval=0.1)


@pytest.fixture
def system(redis_server, redis_client, emulator, tmp_path):
    env = service_env(redis_server.url, emulator.ews_url, heartbeat_seconds=1, lease_seconds=3, listener_id="l1")
    procs: list[CliProcess] = []

    def start(*args, name, **settings):
        proc = CliProcess(args, {**env, **{f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in settings.items()}},
                          tmp_path / f"{name}-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def streaming(conn) -> bool:
    raw = conn.hget("el:listener:l1", "groups")
    return bool(raw) and sum(g["subscribed"] for g in json.loads(raw) if g["connected"]) == 1


def queued_items(conn) -> set[str]:
    return {m["item_id"] for job in queueing.make_queue(conn, QUEUE).jobs for m in job.args[0]["mails"]}


def reply_to(sends: SendRegistry, enrollment: str) -> tuple[bytes, str]:
    message_id = mail.new_id("ours.example")
    sends.record([message_id], enrollment, "seq", MAILBOX, to=[PROSPECT])
    return mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=message_id, references=message_id), message_id


def finished_results(conn) -> list[dict]:
    ids = FinishedJobRegistry(queue=queueing.make_queue(conn, QUEUE)).get_job_ids()
    return [job.return_value() for job in Job.fetch_many(ids, connection=conn, serializer=JSONSerializer)
            if job is not None]


@pytest.mark.slow
def test_replies_moved_deleted_or_hard_deleted_before_a_worker_runs_still_stop(system, redis_client, emulator):
    sends, enrollments = SendRegistry(redis_client), EnrollmentStore(redis_client)
    mailboxes.add(redis_client, [MAILBOX])
    system("listen", name="listener")
    wait_for(lambda: streaming(redis_client), message="streaming")

    cases = {"e-moved": "Customers/Acme", "e-trashed": "deleteditems", "e-hard": "hard delete",
             "e-purged": "purge", "e-moved-twice": "Later then Deleted Items"}
    delivered = {}
    for enrollment in cases:
        raw, _ = reply_to(sends, enrollment)
        delivered[enrollment] = emulator.deliver(MAILBOX, raw)["item_id"]
    wait_for(lambda: set(delivered.values()) <= queued_items(redis_client), message="every reply enqueued")

    # the rep tidies up before any worker ran (workers drained for a deploy)
    emulator.move(delivered["e-moved"], "Customers/Acme")
    emulator.move(delivered["e-trashed"], "deleteditems")
    emulator.delete(delivered["e-hard"])
    emulator.delete(delivered["e-purged"], purge=True)
    later = emulator.move(delivered["e-moved-twice"], "Later")["item_id"]
    emulator.move(later, "deleteditems")

    worker = system("work", "--name", "reloc-worker", name="worker")
    stopped = {"e-moved", "e-trashed", "e-hard", "e-moved-twice"}
    wait_for(lambda: all((enrollments.get(e) or {}).get("status") == "stopped" for e in stopped),
             message="every moved or deleted reply stopped its enrollment")
    wait_for(lambda: any(line.get("event") == "mail exists nowhere" for line in worker.lines()),
             message="the purged reply reported as existing nowhere")
    assert (enrollments.get("e-purged") or {}).get("status", "active") == "active"
    # the log line comes during the job; its result is stored when the job finishes
    wait_for(lambda: any(i.get("gone") for r in finished_results(redis_client) for i in r["items"]),
             message="the purged reply's job finished")
    results = finished_results(redis_client)
    items = [i for r in results for i in r["items"]]
    # each reply's own job found it elsewhere; the listener may also have queued a moved copy
    # (the intermediate "Later" copy is relocated in turn), which must not stop anything twice
    relocated = {i["item_id"] for i in items if i.get("relocated")}
    assert {delivered[e] for e in stopped} <= relocated
    assert delivered["e-purged"] not in relocated
    assert all(len(enrollments.history(e)) == 1 for e in stopped)
    # only the purged reply exists nowhere (the listener's start-up catch-up, still reading the
    # inbox when the replies arrived, may have queued it in a second job, which reports it too)
    assert {i["item_id"] for i in items if i.get("gone")} == {delivered["e-purged"]}


def test_a_reply_moved_while_no_listener_ran_is_found_in_its_new_folder(system, redis_client, emulator):
    sends, enrollments = SendRegistry(redis_client), EnrollmentStore(redis_client)
    mailboxes.add(redis_client, [MAILBOX])
    first = system("listen", name="listener")
    wait_for(lambda: streaming(redis_client), message="streaming")
    raw, _ = reply_to(sends, "e-moved-unseen")
    item = emulator.deliver(MAILBOX, raw)["item_id"]
    wait_for(lambda: item in queued_items(redis_client), message="enqueued")
    assert first.terminate() == 0
    emulator.move(item, "Follow up/This week")  # no listener sees this MovedEvent
    system("listen", name="listener")
    system("work", "--name", "reloc-worker-2", name="worker")
    wait_for(lambda: (enrollments.get("e-moved-unseen") or {}).get("status") == "stopped",
             message="the reply, caught up in its new folder, stopped its enrollment")
    assert len(enrollments.history("e-moved-unseen")) == 1


@pytest.mark.slow
def test_mail_whose_job_failed_is_never_taken_as_done_by_a_catch_up(system, redis_client, emulator):
    """A job that failed (Exchange refused GetItem for the mailbox) stays in the failed registry
    across a listener restart and its catch-up; the ledger never counts it as processed; once
    requeued after the cause is gone, it stops its enrollment."""
    sends, enrollments = SendRegistry(redis_client), EnrollmentStore(redis_client)
    mailboxes.add(redis_client, [MAILBOX])
    listener = system("listen", name="listener", job_retries=0)  # the listener sets a job's retries
    wait_for(lambda: streaming(redis_client), message="streaming")
    emulator.fault(kind="mailbox_error", mailbox=MAILBOX, code="ErrorAccessDenied", operations=["GetItem"])
    raw, _ = reply_to(sends, "e-failed-first")
    item = emulator.deliver(MAILBOX, raw)["item_id"]
    failed = FailedJobRegistry(queue=queueing.make_queue(redis_client, QUEUE))
    job_id = queueing.job_id(MAILBOX, [item])
    worker = system("work", "--name", "fail-worker", name="worker")
    wait_for(lambda: job_id in failed.get_job_ids(), message="the job failed for good")
    assert worker.terminate() == 0

    assert listener.terminate() == 0
    system("listen", name="listener")  # its catch-up reads the inbox again
    wait_for(lambda: streaming(redis_client), message="streaming again")
    wait_for(lambda: redis_client.hget("el:listener:l1", "catchups_pending") == b"0", message="catch-up done")
    assert job_id in failed.get_job_ids()  # still visible in `make failed`
    reply_id = normalize(email.message_from_bytes(raw)["Message-ID"])
    assert not Ledger(redis_client).processed(MAILBOX, [identity(reply_id, item), identity(None, item)])
    assert (enrollments.get("e-failed-first") or {}).get("status", "active") == "active"

    emulator.fault(kind="clear_mailbox_error", mailbox=MAILBOX)
    failed.requeue(job_id)
    system("work", "--name", "fail-worker-2", name="worker")
    wait_for(lambda: (enrollments.get("e-failed-first") or {}).get("status") == "stopped",
             message="requeued job stopped the enrollment")


def test_a_move_recorded_after_the_job_looked_is_found_on_the_jobs_retry(system, redis_client, emulator):
    """The listener may record a move late (it lags, or is catching up after a failover): a job
    that finds its mail nowhere yet is retried before it reports the mail gone."""
    from exchange_listener.sources.base import NewMail

    sends, enrollments = SendRegistry(redis_client), EnrollmentStore(redis_client)
    raw, _ = reply_to(sends, "e-late-move")
    item = emulator.deliver(MAILBOX, raw)["item_id"]
    queueing.enqueue_new_mail(queueing.make_queue(redis_client, QUEUE),
                              [NewMail(MAILBOX, item, "inbox", seen_at=0.0)])  # as the stream would
    moved = emulator.move(item, "Later")["item_id"]  # no listener runs: nobody records this yet
    worker = system("work", "--name", "late-move-worker", name="worker")
    wait_for(lambda: any("not found anywhere yet" in line.get("event", "") for line in worker.lines()),
             message="the job found the mail nowhere yet and was retried")
    Ledger(redis_client).record_moves(MAILBOX, [(item, moved)])  # the listener catches up
    wait_for(lambda: (enrollments.get("e-late-move") or {}).get("status") == "stopped",
             message="the retried job found the moved reply and stopped its enrollment")
    assert not any(line.get("event") == "mail exists nowhere" for line in worker.lines())
