"""Listener processes against an emulator configured with Exchange's limits and failure modes:
streams closed by the server, connection and subscription limits, bad credentials."""
from __future__ import annotations

import datetime
import functools
import itertools
import json
import time
import uuid

import pytest

from exchange_listener import config, mailboxes, queueing
from exchange_listener.local_services import CliProcess, Emulator, service_env, wait_for
from exchange_listener.sources import ews_account

wait_for = functools.partial(wait_for, timeout=45.0)

SERVICE_ACCOUNT = ("svc", "svc-password")


def mail(subject: str) -> bytes:
    return (f"From: p@customer.example\r\nTo: rep@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@customer.example>\r\n\r\nhi\r\n").encode()


def queued(conn) -> set[str]:
    return {m["item_id"] for job in queueing.make_queue(conn, "exchange-listener").jobs for m in job.args[0]["mails"]}


@pytest.fixture
def run_listener(redis_server, tmp_path):
    procs = []

    def start(emulator, password=SERVICE_ACCOUNT[1], extra_env=None, **settings):
        env = service_env(redis_server.url, emulator.ews_url, password=password,
                          **{"heartbeat_seconds": 1, "lease_seconds": 3, "listener_id": "l1", **settings})
        env.update(extra_env or {})
        proc = CliProcess(["listen"], env, tmp_path / f"listener-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def connected(conn, count: int) -> bool:
    raw = conn.hget("el:listener:l1", "groups")
    return bool(raw) and sum(g["subscribed"] for g in json.loads(raw) if g["connected"]) == count


def test_streams_closed_by_the_server_are_reopened_without_losing_mail(redis_client, run_listener):
    # a "minute" of ConnectionTimeout lasts 1.5 s here, so the server closes the stream every 1.5 s
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=0.5,
                  extra_args=["--connection-timeout-minute-seconds", "1.5"]) as emu:
        mailboxes.add(redis_client, ["olga@example.com"])
        run_listener(emu, connection_timeout=1, heartbeat_seconds=0.5)
        wait_for(lambda: connected(redis_client, 1), message="streaming")
        delivered = set()
        for i in range(8):  # spread over several stream lifetimes
            delivered.add(emu.deliver("olga@example.com", mail(f"n{i}"))["item_id"])
            time.sleep(0.5)
        wait_for(lambda: delivered <= queued(redis_client), message="every mail enqueued across stream closes")


def test_connection_limit_is_backed_off_not_looped_on(redis_client, run_listener):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--max-streams-per-account", "1"]) as emu:
        mailboxes.add(redis_client, ["pia@example.com", "quinn@example.com"])
        proc = run_listener(emu, group_size=1)  # two groups, two connections; the server allows one
        wait_for(lambda: connected(redis_client, 1), message="one group streaming")
        time.sleep(4)
        refused = [line for line in proc.lines() if line.get("reason") == "limit"]
        assert refused and "ErrorExceededConnectionCount" in refused[0]["event"]
        for group in {line["group"] for line in refused}:  # backed off (>= 15 s with jitter), not retried in a loop
            times = [datetime.datetime.fromisoformat(line["timestamp"].rstrip("Z")).timestamp()
                     for line in refused if line["group"] == group]
            assert all(later - earlier >= 7 for earlier, later in itertools.pairwise(times)), times
        # the group that holds the one allowed connection keeps delivering meanwhile
        items = {emu.deliver(a, mail("still flowing"))["item_id"] for a in ("pia@example.com", "quinn@example.com")}
        wait_for(lambda: items & queued(redis_client), message="mail of the streaming group enqueued")
        assert proc.alive()


def test_subscription_limit_skips_the_mailbox_and_retries_later(redis_client, run_listener):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--max-subscriptions-per-mailbox", "1"]) as emu:
        # someone else already holds the only subscription rhea's mailbox may have
        settings = config.load(env={}, overrides={"ews_url": emu.ews_url, "ews_username": SERVICE_ACCOUNT[0],
                                                  "ews_password": SERVICE_ACCOUNT[1]})
        other = ews_account.make_account(settings, "rhea@example.com",
                                         ews_account.make_configuration(settings, pool="someone-else"))
        other.subscribe_to_streaming()
        mailboxes.add(redis_client, ["rhea@example.com", "sven@example.com"])
        proc = run_listener(emu)
        wait_for(lambda: connected(redis_client, 1), message="the other mailbox streaming")
        item = emu.deliver("sven@example.com", mail("for sven"))
        wait_for(lambda: item["item_id"] in queued(redis_client), message="sven's mail enqueued")
        time.sleep(2)
        errors = [line for line in proc.lines() if "too many subscriptions" in line.get("event", "")]
        assert len(errors) == 1 and errors[0]["mailbox"] == "rhea@example.com"


def test_bad_credentials_are_logged_clearly_retried_with_backoff_and_never_leaked(redis_client, run_listener, emulator):
    mailboxes.add(redis_client, ["tina@example.com"])
    secret = "wrong-Pa55word-xyz"
    proc = run_listener(emulator, password=secret)
    wait_for(lambda: any("authentication" in line.get("event", "") for line in proc.lines()), timeout=20,
             message="authentication failure logged")
    time.sleep(3)
    failures = [line for line in proc.lines() if "authentication" in line.get("event", "")]
    assert 1 <= len(failures) <= 2  # backoff of >= 5 s between attempts
    assert "UnauthorizedError" in failures[0]["event"]
    assert proc.alive()
    assert secret not in proc.log_path.read_text()


def test_oauth2_client_credentials_listener(redis_client, run_listener):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--oauth-client", "app-id:app-secret"]) as emu:
        mailboxes.add(redis_client, ["uma@example.com"])
        proc = run_listener(emu, auth_type="oauth2", client_id="app-id", client_secret="app-secret",
                            token_url=f"{emu.base_url}/oauth2/v2.0/token", ews_username="", password="",
                            extra_env={"OAUTHLIB_INSECURE_TRANSPORT": "1"})  # the emulator speaks plain HTTP
        wait_for(lambda: connected(redis_client, 1), message="streaming with an OAuth2 token")
        item = emu.deliver("uma@example.com", mail("via oauth"))
        wait_for(lambda: item["item_id"] in queued(redis_client), message="enqueued")
        assert "app-secret" not in proc.log_path.read_text()
