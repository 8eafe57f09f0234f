"""Every fault kind of the emulator, asserted as exchangelib's caller observes it."""
from __future__ import annotations

import time

import pytest
import requests
from ews_client import StreamReader, account, message, open_streams, wait_for
from exchangelib.errors import ErrorServerBusy, ErrorSubscriptionNotFound

ALICE = "alice@example.com"


def _streaming(emulator, folder_ids=None):
    acc = account(emulator, ALICE)
    sub = acc.inbox.subscribe_to_streaming()
    reader = StreamReader(account(emulator, ALICE).inbox, [sub]).start()
    wait_for(lambda: open_streams(emulator) == 1)
    return acc, sub, reader


def test_reset_streams_surfaces_as_a_requests_connection_error(emulator):
    _acc, _sub, reader = _streaming(emulator)
    emulator.fault(kind="reset_streams")
    reader.join()
    assert isinstance(reader.error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError))


def test_stall_streams_sends_nothing_until_the_stall_ends(emulator):
    _acc, _sub, reader = _streaming(emulator)
    emulator.fault(kind="stall_streams", seconds=2.5)
    started = time.monotonic()
    emulator.deliver(ALICE, message("<stalled@customer.example>"))
    time.sleep(1.0)
    assert reader.notifications == [] and not reader.finished.is_set()
    wait_for(lambda: reader.events("NewMailEvent"), timeout=10)
    assert time.monotonic() - started >= 2.0
    assert reader.error is None


def test_expire_subscriptions_gives_subscription_not_found(emulator):
    acc, sub, reader = _streaming(emulator)
    emulator.fault(kind="expire_subscriptions")
    reader.join()
    assert isinstance(reader.error, ErrorSubscriptionNotFound) and sub in str(reader.error)
    with pytest.raises(ErrorSubscriptionNotFound):
        list(acc.inbox.get_streaming_events(sub, connection_timeout=1))


def test_server_busy_raises_with_the_back_off(emulator):
    acc = account(emulator, ALICE)
    emulator.fault(kind="server_busy", count=1, back_off_ms=1500)
    with pytest.raises(ErrorServerBusy) as info:
        acc.root.refresh()
    assert info.value.back_off == 1.5
    assert acc.inbox.total_count == 0  # only the next N requests are refused


def test_http_503_raises_server_busy_then_recovers(emulator):
    acc = account(emulator, ALICE)
    emulator.fault(kind="http_503", count=1)
    with pytest.raises(ErrorServerBusy) as info:  # exchangelib re-raises the transient 503 as busy
        acc.root.refresh()
    assert "HTTP 503" in str(info.value)
    assert acc.inbox.total_count == 0


def test_latency_delays_every_response_until_cleared(emulator):
    acc = account(emulator, ALICE)
    assert acc.inbox.total_count == 0  # warm: folders resolved
    emulator.fault(kind="latency", ms=400)
    started = time.monotonic()
    acc.inbox.refresh()
    assert time.monotonic() - started >= 0.4
    emulator.fault(kind="latency", ms=0)
    started = time.monotonic()
    acc.inbox.refresh()
    assert time.monotonic() - started < 0.4


def test_restart_drops_streams_and_subscriptions_but_keeps_mail(emulator):
    acc, sub, reader = _streaming(emulator)
    delivered = emulator.deliver(ALICE, message("<kept@customer.example>"))
    wait_for(lambda: reader.events("NewMailEvent"))
    emulator.fault(kind="restart")
    reader.join()
    assert isinstance(reader.error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError))
    with pytest.raises(ErrorSubscriptionNotFound):
        list(acc.inbox.get_streaming_events(sub, connection_timeout=1))
    found = list(acc.inbox.filter(message_id="<kept@customer.example>"))
    assert [m.id for m in found] == [delivered["item_id"]]
