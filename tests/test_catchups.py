"""CatchUps, the listeners' catch-up scheduler (pure threads and timing; no wire involved)."""
from __future__ import annotations

import itertools
import threading
import time

from exchange_listener.core import config
from exchange_listener.listener.base import CatchUps


def make(run, holds=lambda _m: True) -> CatchUps:
    return CatchUps(holds, run, lambda _i: None, config.load(env={}), threads=2)


def test_a_failing_mailbox_asked_again_every_tick_runs_on_its_backoff_not_every_tick():
    runs: list[tuple[float, str, object]] = []

    def run(_state, mailbox, reason, folders):
        runs.append((time.monotonic(), reason, folders))
        raise RuntimeError("Graph refuses the subscription")

    catchups = make(run)
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # the listener's tick asks again and again
        catchups.request(["rep@x.example"], "renew", set())
        catchups.retry_due()
        time.sleep(0.05)
    # first run at once, then retries after about 1 s and 2 s (jittered), not 50 of them
    assert 2 <= len(runs) <= 3, runs
    assert all(b[0] - a[0] >= 0.4 for a, b in itertools.pairwise(runs))


def test_work_asked_during_a_backoff_is_merged_into_the_retry_not_lost():
    seen: list[tuple[str, object]] = []
    fail = threading.Event()
    fail.set()

    def run(_state, mailbox, reason, folders):
        seen.append((reason, folders))
        if fail.is_set():
            fail.clear()
            raise RuntimeError("once")

    catchups = make(run)
    catchups.request(["rep@x.example"], "checkpoint", {"inbox"})
    deadline = time.monotonic() + 5
    while len(seen) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    catchups.request(["rep@x.example"], "checkpoint", {"archive"})  # during the backoff
    while len(seen) < 2 and time.monotonic() < deadline:
        catchups.retry_due()
        time.sleep(0.05)
    assert seen[0] == ("checkpoint", {"inbox"})
    assert seen[1] == ("checkpoint", {"inbox", "archive"})  # both folders in the one retry
    assert catchups.pending() == 0
