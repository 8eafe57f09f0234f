"""Prometheus metrics: scraped from a running listener and a running worker, they move with a reply."""
from __future__ import annotations

import email.utils
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulators.services import (
    CliProcess,
    free_port,
    service_env,
    wait_for,
    wait_for_port,
)
from exchange_listener import health
from exchange_listener.listener import mailboxes
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

MAILBOX = "rep@seller.example"
QUEUE = "el-metrics-test"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample on ``/metrics`` as (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    """Sum of ``name`` over every sample whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def reply(send_id: str) -> bytes:
    return (
        "From: Dana Whitfield <dana@prospect.example>\r\n"
        f"To: Rep <{MAILBOX}>\r\n"
        "Subject: RE: Quick question\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"  # written after the send it answers
        "Message-ID: <reply-1@prospect.example>\r\n"
        f"In-Reply-To: {send_id}\r\nReferences: {send_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Sounds interesting - call me Tuesday.\r\n"
    ).encode()


@pytest.mark.slow
def test_listener_and_worker_counters_move_after_a_reply(redis_client, redis_server, emulator, tmp_path):
    base = service_env(redis_server.url, emulator.ews_url, queue_name=QUEUE, heartbeat_seconds=1)
    listener_port, worker_port = free_port(), free_port()
    procs = []
    try:
        for args, port in ((["listen"], listener_port), (["work", "--name", "metrics-worker"], worker_port)):
            env = {**base, "EXCHANGE_LISTENER_METRICS_PORT": str(port)}
            procs.append(CliProcess(args, env, tmp_path / f"{args[0]}.log"))
            wait_for_port(port, timeout=60, proc=procs[-1].proc)

        mailboxes.add(redis_client, [MAILBOX])
        send = SendRegistry(redis_client).record(["<send-1@seller.example>"], "enr-1", "seq-1", MAILBOX,
                                                 ["dana@prospect.example"])
        wait_for(lambda: any(g["connected"] and g["mailboxes"] for item in health.snapshot(redis_client, QUEUE)["listeners"]
                             for g in item["groups"]), timeout=60, message="the listener's stream to be open")
        listener_before, worker_before = scrape(listener_port), scrape(worker_port)
        assert total(worker_before, "el_transitions_total") == 0

        emulator.deliver(MAILBOX, reply(send.message_ids[0]))
        store = EnrollmentStore(redis_client)
        wait_for(lambda: (store.get("enr-1") or {}).get("status") == "stopped", timeout=60, message="the enrollment to stop")

        listener_after = scrape(listener_port)
        assert total(listener_after, "el_events_received_total", kind="NewMailEvent") \
            > total(listener_before, "el_events_received_total", kind="NewMailEvent")
        assert total(listener_after, "el_jobs_enqueued_total") >= total(listener_before, "el_jobs_enqueued_total") + 1

        def worker_counted():
            samples = scrape(worker_port)
            return samples if total(samples, "el_jobs_processed_total", outcome="ok") >= 1 else None

        worker_after = wait_for(worker_counted, message="the worker to count the job")
        assert total(worker_after, "el_classified_total", kind="human_reply") == 1
        assert total(worker_after, "el_transitions_total", status="stopped", reason="replied") == 1
        assert total(worker_after, "el_delivery_to_stop_seconds_count") == 1
        latency = total(worker_after, "el_delivery_to_stop_seconds_sum")
        assert 0 <= latency < 60
        # the observation landed in a bucket no larger than the measured time allows
        assert total(worker_after, "el_delivery_to_stop_seconds_bucket", le="60.0") == 1
    finally:
        for proc in procs:
            try:
                proc.terminate(20)
            finally:
                proc.stop()
