"""The member a stream group impersonates on GetStreamingEvents (``stream_as``) can be moved: when
that mailbox breaks (gone, no impersonation right, mid-move) or its budget has no streaming
connection left, the group streams as another member and every other member's mail is still
enqueued. Real `exchange-listener listen` processes, a real redis-server, the EWS emulator over
HTTP; a mail counts when its job is on the RQ queue."""
from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests

from emulators.services import Emulator, wait_for
from exchange_listener import queueing
from exchange_listener.listener import leases, mailboxes

SERVICE = ("svc", "svc-password")
QUEUE = "exchange-listener"
wait_for = functools.partial(wait_for, timeout=10.0)
SOAP = """<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
 xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
<s:Header><t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation><t:ConnectingSID>
<t:PrimarySmtpAddress>{mailbox}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></s:Header>
<s:Body>{body}</s:Body></s:Envelope>"""
SUBSCRIBE = '<m:Subscribe><m:StreamingSubscriptionRequest SubscribeToAllFolders="true"><t:EventTypes>' \
            '<t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>'
STREAM = '<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{id}</t:SubscriptionId></m:SubscriptionIds>' \
         '<m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>'


def mail() -> bytes:
    return (f"From: Prospect <p@customer.example>\r\nTo: rep@example.com\r\nSubject: re: proposal\r\n"
            f"Message-ID: <{uuid.uuid4()}@customer.example>\r\n\r\nThanks!\r\n").encode()


def queued(conn: redis.Redis) -> set[tuple[str, str]]:
    """(mailbox, item id) of every mail carried by a job on the RQ queue."""
    return {(m["mailbox"], m["item_id"]) for job in queueing.make_queue(conn, QUEUE).jobs for m in job.args[0]["mails"]}


def group(conn: redis.Redis, listener_id: str = "l1") -> dict | None:
    """The listener's one stream group as it reports it in Redis."""
    raw = conn.hget(leases.LISTENER_PREFIX + listener_id, "groups")
    groups = json.loads(raw) if raw else []
    return groups[0] if len(groups) == 1 else None


def streaming(conn: redis.Redis, count: int) -> dict | None:
    found = group(conn)
    return found if found and found["connected"] and found["subscribed"] == count else None


def raw(url: str, mailbox: str, body: str, **kwargs: Any) -> requests.Response:
    """One EWS request as the service account impersonating ``mailbox``."""
    return requests.post(url, data=SOAP.format(mailbox=mailbox, body=body).encode(), auth=SERVICE,
                         headers={"Content-Type": "text/xml; charset=utf-8"}, timeout=10, **kwargs)


def test_group_streams_on_when_its_stream_as_mailbox_breaks(redis_client: redis.Redis, emulator: Emulator,
                                                             listeners: Callable[..., Any]) -> None:
    members = ["sa-ann@example.com", "sa-bob@example.com", "sa-cat@example.com"]
    mailboxes.add(redis_client, members)
    proc = listeners(emulator)
    broken = wait_for(lambda: streaming(redis_client, 3), message="three mailboxes streaming")["stream_as"]
    assert broken in members
    # the mailbox is deleted: GetStreamingEvents impersonating it fails as a whole, naming no subscription
    emulator.fault(kind="mailbox_error", mailbox=broken, code="ErrorNonExistentMailbox",
                   operations=["GetStreamingEvents"])
    emulator.fault(kind="reset_streams")  # the group reconnects, as the broken mailbox first

    def moved() -> dict | None:
        found = group(redis_client)
        if not found or not found["connected"] or found["stream_as"] in (None, broken):
            return None
        return found if any(f["mailbox"] == broken for f in found["failing"]) else None
    status = wait_for(moved, timeout=4.0, message="the group streaming as another member, the broken one failing")
    failing = next(f for f in status["failing"] if f["mailbox"] == broken)
    assert "ErrorNonExistentMailbox" in failing["error"]
    assert status["subscribed"] == 2 and status["failing_count"] == 1

    others = [m for m in members if m != broken]
    expected = {(m, emulator.deliver(m, mail())["item_id"]) for m in others}
    wait_for(lambda: expected <= queued(redis_client), timeout=3.0, message="the other members' mail enqueued")
    log = proc.log_path.read_text()
    assert "ews_username" not in log  # not blamed on the credentials
    assert [line for line in proc.lines() if line.get("reason") == "stream_as" and line.get("mailbox") == broken]


@pytest.fixture(scope="module")
def onprem() -> Iterator[Emulator]:
    """An emulator enforcing Exchange Server's default throttling: 3 streams per impersonated mailbox."""
    with Emulator(accounts=[":".join(SERVICE)], heartbeat_seconds=1.0, extra_args=["--throttling", "default"]) as emu:
        yield emu


def test_group_streams_as_another_member_when_the_budget_has_no_connection_left(
        onprem: Emulator, redis_client: redis.Redis, listeners: Callable[..., Any]) -> None:
    onprem.reset()
    members = ["sb-ann@example.com", "sb-bob@example.com"]
    anchor = min(members)  # the group's anchor, so the member it streams as first
    held = []
    try:
        for _ in range(3):  # another application holds all 3 of the anchor's streaming connections
            answer = raw(onprem.ews_url, anchor, SUBSCRIBE)
            found = re.search(r"<(?:\w+:)?SubscriptionId>([^<]+)<", answer.text)
            assert found, answer.text
            sub_id = found.group(1)
            held.append(raw(onprem.ews_url, anchor, STREAM.format(id=sub_id), stream=True))
            assert held[-1].status_code == 200
        wait_for(lambda: onprem.stats()["streams"] == 3, message="the anchor's three connections open")

        mailboxes.add(redis_client, members)
        proc = listeners(onprem)
        status = wait_for(lambda: streaming(redis_client, 2), message="both mailboxes streaming")
        assert status["anchor"] == anchor and status["stream_as"] != anchor, status
        assert onprem.stats()["streams"] == 4

        expected = {(m, onprem.deliver(m, mail())["item_id"]) for m in members}
        wait_for(lambda: expected <= queued(redis_client), timeout=3.0, message="both members' mail enqueued")
        assert [line for line in proc.lines() if line.get("reason") == "limit"
                and "ErrorExceededConnectionCount" in line.get("event", "")]
    finally:
        for response in held:
            response.close()
