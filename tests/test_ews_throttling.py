"""Exchange's default throttling policy (``emulator --throttling default``, emulators/ews/throttling.py):
the emulator enforces each limit, charged to the budget Microsoft's pages name, and a listener
with many mailboxes in many groups streams them all without ever being refused a connection,
and says in ``status`` how close it is."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
import time
import uuid

import ews_client
import pytest
import requests
from aiohttp import web

from emulators.ews import throttling
from emulators.ews.server import Emulator as InProcessEmulator
from emulators.ews.server import Options
from emulators.services import Emulator, free_port, wait_for
from exchange_listener import health
from exchange_listener.commands import status
from exchange_listener.listener import mailboxes
from exchange_listener.queueing import make_queue

SERVICE = ("svc", "svc-password")
SOAP = """<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
 xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
<s:Header><t:RequestServerVersion Version="Exchange2016"/>{impersonation}</s:Header>
<s:Body>{body}</s:Body></s:Envelope>"""
GET_INBOX = '<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>' \
            '<m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds></m:GetFolder>'
SUBSCRIBE = '<m:Subscribe><m:StreamingSubscriptionRequest SubscribeToAllFolders="true"><t:EventTypes>' \
            '<t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>'


def soap(url: str, body: str, as_mailbox: str | None, session: requests.Session | None = None) -> requests.Response:
    """One raw EWS request as the service account, impersonating ``as_mailbox``."""
    impersonation = (f"<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{as_mailbox}"
                     "</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>") if as_mailbox else ""
    return (session or requests).post(url, data=SOAP.format(impersonation=impersonation, body=body).encode(),
                                      auth=SERVICE, headers={"Content-Type": "text/xml; charset=utf-8"}, timeout=10)


def code_of(response: requests.Response) -> str:
    found = re.search(r"<(?:\w+:)?ResponseCode\b[^>]*>(\w+)<", response.text)
    return found.group(1) if found else "?"


class InProcess:
    """The emulator's aiohttp app on a loop thread of this process, over real HTTP on a free port,
    so a test can shrink the policy's values (``throttle.policy``) to reach them in milliseconds."""

    def __init__(self, **options):
        self.emulator = InProcessEmulator(Options(accounts=dict([SERVICE]), throttling="default", **options))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/EWS/Exchange.asmx"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.emulator.app(), handler_cancellation=True)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def throttle(self) -> throttling.Throttle:
        found = throttling.of(self.emulator)
        assert found is not None
        return found

    def fault(self, **body) -> None:
        requests.post(f"{self.base_url}/emulator/faults", json=body, timeout=10).raise_for_status()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def server():
    found = InProcess(mailboxes=["m1@example.com", "m2@example.com"])
    yield found
    found.close()


@pytest.fixture
def emu(server):
    server.emulator.reset()  # a new store: fresh budgets and counters too
    server.throttle.policy = throttling.Policy()
    return server


def test_default_policy_values_are_exchange_servers():
    policy = throttling.Policy()
    assert (policy.hanging_connection_limit, policy.max_subscriptions, policy.max_concurrency) == (3, 5000, 27)
    assert (policy.max_burst_ms, policy.recharge_rate_ms_per_hour, policy.cutoff_balance_ms) == \
           (300_000, 900_000, 3_000_000)
    assert throttling.peek(SOAP.format(impersonation="<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>"
                                                     "A@Example.com</t:PrimarySmtpAddress></t:ConnectingSID>"
                                                     "</t:ExchangeImpersonation>", body=GET_INBOX).encode()) \
        == ("GetFolder", "a@example.com")


def test_subscriptions_are_charged_to_the_target_mailbox(emu):
    emu.throttle.policy.max_subscriptions = 2
    with requests.Session() as session:
        answers = [code_of(soap(emu.url, SUBSCRIBE, "m1@example.com", session)) for _ in range(3)]
        assert answers == ["NoError", "NoError", "ErrorExceededSubscriptionCount"]
        # another mailbox has its own budget: the same service account subscribes it freely
        assert code_of(soap(emu.url, SUBSCRIBE, "m2@example.com", session)) == "NoError"
    assert emu.throttle.refusals["ErrorExceededSubscriptionCount"] == 1


def test_concurrency_over_ews_max_concurrency_is_refused_per_budget(emu):
    emu.throttle.policy.max_concurrency = 2
    emu.fault(kind="latency", ms=600)  # each request is held ~0.6 s: they overlap
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            same = [pool.submit(soap, emu.url, GET_INBOX, "m1@example.com") for _ in range(3)]
            time.sleep(0.1)
            other = pool.submit(soap, emu.url, GET_INBOX, "m2@example.com")
            codes = sorted(code_of(f.result()) for f in same)
            assert codes == ["ErrorExceededConnectionCount", "NoError", "NoError"], codes
            assert code_of(other.result()) == "NoError"  # m2's copy of the budget is untouched
    finally:
        emu.fault(kind="latency", ms=0)


def test_spent_budget_answers_server_busy_with_back_off_until_recharged(emu):
    # 100 ms of burst, locked out at -150 ms, 36 s of budget an hour (10 ms a second)
    emu.throttle.policy = throttling.Policy(max_burst_ms=100, cutoff_balance_ms=150, recharge_rate_ms_per_hour=36_000)
    emu.fault(kind="latency", ms=150)  # each request costs ~150 ms of server time
    try:
        with requests.Session() as session:
            first, second = (soap(emu.url, GET_INBOX, "m1@example.com", session) for _ in range(2))
            assert (first.status_code, second.status_code) == (200, 200)  # 100 -> -50 -> -200: over the cutoff
            busy = soap(emu.url, GET_INBOX, "m1@example.com", session)
            assert busy.status_code == 500 and code_of(busy) == "ErrorServerBusy", busy.text
            back_off = int(re.search(r"<(?:\w+:)?Value Name=\"BackOffMilliseconds\">(\d+)<", busy.text).group(1))
            assert 15_000 <= back_off <= 21_000, back_off  # ~200 ms of debt at 10 ms/s
            assert soap(emu.url, GET_INBOX, "m2@example.com", session).status_code == 200  # its own budget
    finally:
        emu.fault(kind="latency", ms=0)


# -- a real emulator process with the policy's real values ----------------------------------------------

@pytest.fixture(scope="module")
def onprem():
    with Emulator(accounts=[":".join(SERVICE)], heartbeat_seconds=1.0, extra_args=["--throttling", "default"]) as emu:
        yield emu


def test_three_streaming_connections_per_impersonated_mailbox(onprem):
    onprem.reset()

    def as_ann():  # a Protocol (session pool of one) of its own: exchangelib answers a refused
        # connection by shrinking the pool and retrying, and raises only once it holds one session
        return ews_client.account(onprem, "ann@example.com", max_connections=1)
    ids = [as_ann().subscribe_to_streaming() for _ in range(5)]
    streams = [ews_client.StreamReader(as_ann().inbox, [sub_id]).start() for sub_id in ids[:3]]
    ews_client.wait_for(lambda: ews_client.open_streams(onprem) == 3, message="three streams open")
    fourth = ews_client.StreamReader(as_ann().inbox, [ids[3]]).start()
    fourth.join(10)
    assert type(fourth.error).__name__ == "ErrorExceededConnectionCount", fourth.error
    # the same service account streaming while impersonating another mailbox: that mailbox's budget
    other = ews_client.StreamReader(ews_client.account(onprem, "bo@example.com", max_connections=1).inbox,
                                    [ids[4]]).start()  # the subscriptions belong to the service account
    ews_client.wait_for(lambda: ews_client.open_streams(onprem) == 4, message="a fourth stream, as bo")
    assert other.error is None and all(s.error is None for s in streams)
    onprem.reset()


@pytest.mark.slow
def test_listener_with_many_groups_is_never_refused_a_connection(onprem, redis_client, listeners):
    onprem.reset()
    # 40 groups: 40 connections, 13 times what one budget allows (EL_THROTTLING_MAILBOXES=5000
    # EL_THROTTLING_GROUP_SIZE=200 runs the full 5,000 mailboxes, 25 groups: a minute here)
    count = int(os.environ.get("EL_THROTTLING_MAILBOXES", "2000"))
    group_size = int(os.environ.get("EL_THROTTLING_GROUP_SIZE", "50"))
    groups = -(-count // group_size)
    addresses = [f"u{i:04d}@example.com" for i in range(count)]
    mailboxes.add(redis_client, addresses)
    proc = listeners(onprem, group_size=group_size)
    expected = {"streaming_connections": groups, "connections_per_budget_max": 1, "connections_per_budget_allowed": 3,
                "subscriptions": count, "subscriptions_per_mailbox_max": 1, "subscriptions_per_mailbox_allowed": 5000,
                "group_size_max": group_size, "group_size_allowed": 200}

    def settled():
        snap = health.snapshot(redis_client, "exchange-listener")
        found = snap["listeners"][0].get("throttling") if snap["listeners"] else None
        return snap if found == expected and onprem.stats()["streams"] == groups else None
    snap = wait_for(settled, timeout=60 + count / 50, message=f"all {count} mailboxes streaming on {groups} connections")
    assert f"throttling: streams 1/3 per mailbox budget ({groups} open)" in status.render(snap, [])
    item = onprem.deliver(addresses[-1], f"From: p@x.example\r\nMessage-ID: <{uuid.uuid4()}@x>\r\n\r\nhi\r\n".encode())
    queue = make_queue(redis_client, "exchange-listener")
    wait_for(lambda: any(m["item_id"] == item["item_id"] for job in queue.jobs for m in job.args[0]["mails"]),
             timeout=15, message="the last mailbox's mail enqueued through its group's stream")
    log = proc.log_path.read_text()
    assert "ErrorExceededConnectionCount" not in log and "ErrorServerBusy" not in log
    assert not [line for line in proc.lines() if line.get("reason") == "limit"]
