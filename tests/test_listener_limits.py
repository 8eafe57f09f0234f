"""Listener processes against an emulator configured with Exchange's limits and failure modes:
streams closed by the server, connection and subscription limits, bad credentials."""
from __future__ import annotations

import datetime
import functools
import itertools
import json
import re
import time
import uuid

import pytest

from emulators.services import Emulator, wait_for
from exchange_listener import queueing
from exchange_listener.core import config
from exchange_listener.listener import mailboxes
from exchange_listener.sources.ews import account as ews_account

wait_for = functools.partial(wait_for, timeout=45.0)

SERVICE_ACCOUNT = ("svc", "svc-password")


def mail(subject: str) -> bytes:
    return (f"From: p@customer.example\r\nTo: rep@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@customer.example>\r\n\r\nhi\r\n").encode()


def queued(conn) -> set[str]:
    return {m["item_id"] for job in queueing.make_queue(conn, "exchange-listener").jobs for m in job.args[0]["mails"]}


def connected(conn, count: int) -> bool:
    raw = conn.hget("el:listener:l1", "groups")
    return bool(raw) and sum(g["subscribed"] for g in json.loads(raw) if g["connected"]) == count


@pytest.mark.slow
def test_streams_closed_by_the_server_are_reopened_without_losing_mail(redis_client, listeners):
    # a "minute" of ConnectionTimeout lasts 1.5 s here, so the server closes the stream every 1.5 s
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=0.5,
                  extra_args=["--connection-timeout-minute-seconds", "1.5"]) as emu:
        mailboxes.add(redis_client, ["olga@example.com"])
        listeners(emu, connection_timeout=1, heartbeat_seconds=0.5)
        wait_for(lambda: connected(redis_client, 1), message="streaming")
        delivered = set()
        for i in range(8):  # spread over several stream lifetimes
            delivered.add(emu.deliver("olga@example.com", mail(f"n{i}"))["item_id"])
            time.sleep(0.5)
        wait_for(lambda: delivered <= queued(redis_client), message="every mail enqueued across stream closes")


@pytest.mark.slow
def test_connection_limit_is_backed_off_not_looped_on(redis_client, listeners):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--max-streams-per-account", "1"]) as emu:
        mailboxes.add(redis_client, ["pia@example.com", "quinn@example.com"])
        proc = listeners(emu, group_size=1)  # two groups, two connections; the server allows one
        wait_for(lambda: connected(redis_client, 1), message="one group streaming")
        first = wait_for(lambda: limit_refusals(proc), message="the second connection refused")[0]
        assert "ErrorExceededConnectionCount" in first["event"]
        # the group that holds the one allowed connection keeps delivering meanwhile
        items = {emu.deliver(a, mail("still flowing"))["item_id"] for a in ("pia@example.com", "quinn@example.com")}
        wait_for(lambda: items & queued(redis_client), message="mail of the streaming group enqueued")
        # a loop would have tried again many times within seconds of the first refusal
        time.sleep(max(0.0, 4.0 - (time.time() - log_time(first))))
        refused = limit_refusals(proc)
        for line in refused:  # each refusal backs off >= 15 s (the floor; jitter only adds)
            assert int(re.search(r"backing off (\d+)s", line["event"]).group(1)) >= 15, line["event"]
        for group in {line["group"] for line in refused}:  # one refusal per group so far, not a loop
            times = [log_time(line) for line in refused if line["group"] == group]
            assert all(later - earlier >= 14 for earlier, later in itertools.pairwise(times)), times
        assert proc.alive()


def log_time(line: dict) -> float:
    """A JSON log line's timestamp as epoch seconds (the logs write UTC with a trailing Z)."""
    return datetime.datetime.fromisoformat(line["timestamp"].rstrip("Z")).replace(tzinfo=datetime.UTC).timestamp()


def limit_refusals(proc) -> list[dict]:
    return [line for line in proc.lines() if line.get("reason") == "limit"]


def test_subscription_limit_skips_the_mailbox_and_retries_later(redis_client, listeners):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--max-subscriptions-per-mailbox", "1"]) as emu:
        # someone else already holds the only subscription rhea's mailbox may have
        settings = config.load(env={}, overrides={"ews_url": emu.ews_url, "ews_username": SERVICE_ACCOUNT[0],
                                                  "ews_password": SERVICE_ACCOUNT[1]})
        other = ews_account.make_account(settings, "rhea@example.com",
                                         ews_account.make_configuration(settings, pool="someone-else"))
        other.subscribe_to_streaming()
        mailboxes.add(redis_client, ["rhea@example.com", "sven@example.com"])
        proc = listeners(emu)
        wait_for(lambda: connected(redis_client, 1), message="the other mailbox streaming")
        item = emu.deliver("sven@example.com", mail("for sven"))
        wait_for(lambda: item["item_id"] in queued(redis_client), message="sven's mail enqueued")
        # rhea is reported failing, with her next attempt scheduled (30 s +-25 %), not dropped
        # and not retried in a loop
        failing = wait_for(lambda: [m for g in json.loads(redis_client.hget("el:listener:l1", "groups") or "[]")
                                    for m in g.get("failing", []) if m["mailbox"] == "rhea@example.com"],
                           message="rhea reported failing")
        assert "ErrorExceededSubscriptionCount" in failing[0]["error"]
        assert failing[0]["retry_at"] - time.time() >= 15, failing
        errors = [line for line in proc.lines() if "too many subscriptions" in line.get("event", "")]
        assert len(errors) == 1 and errors[0]["mailbox"] == "rhea@example.com"
        assert errors[0]["retry_in"] >= 22  # 30 s less the jitter


@pytest.mark.slow
def test_bad_credentials_are_logged_clearly_retried_with_backoff_and_never_leaked(redis_client, listeners, emulator):
    mailboxes.add(redis_client, ["tina@example.com"])
    secret = "wrong-Pa55word-xyz"
    proc = listeners(emulator, password=secret)
    # retried: a second attempt comes, and only after the backoff (>= 5 s)
    def auth_failures():
        found = [line for line in proc.lines() if "authentication" in line.get("event", "")]
        return found if len(found) >= 2 else None

    failures = wait_for(auth_failures, timeout=30, message="the failed authentication retried")
    assert "UnauthorizedError" in failures[0]["event"] and "UnauthorizedError" in failures[1]["event"]
    assert log_time(failures[1]) - log_time(failures[0]) >= 4.9, failures
    assert proc.alive()
    assert secret not in proc.log_path.read_text()


def test_oauth2_client_credentials_listener(redis_client, listeners):
    with Emulator(accounts=[":".join(SERVICE_ACCOUNT)], heartbeat_seconds=1.0,
                  extra_args=["--oauth-client", "app-id:app-secret"]) as emu:
        mailboxes.add(redis_client, ["uma@example.com"])
        proc = listeners(emu, auth_type="oauth2", client_id="app-id", client_secret="app-secret",
                            token_url=f"{emu.base_url}/oauth2/v2.0/token", ews_username="", password="",
                            extra_env={"OAUTHLIB_INSECURE_TRANSPORT": "1"})  # the emulator speaks plain HTTP
        wait_for(lambda: connected(redis_client, 1), message="streaming with an OAuth2 token")
        item = emu.deliver("uma@example.com", mail("via oauth"))
        wait_for(lambda: item["item_id"] in queued(redis_client), message="enqueued")
        assert "app-secret" not in proc.log_path.read_text()
