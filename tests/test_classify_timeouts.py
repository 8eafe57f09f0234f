"""RQ's job timeout is never swallowed by the classifier (issue 10, point 2).

RQ ends a job that runs past ``job_timeout`` by raising ``JobTimeoutException`` (a subclass of
``Exception``) from a SIGALRM handler, wherever the job happens to be. The classifier catches
``Exception`` around every step that reads hostile mail; those handlers must let the timeout
through, or a hung step runs past its budget and the job reports a wrong answer instead of
timing out. These tests arm RQ's own death penalty (a real signal) and make dateparser slow —
dateparser is a library, not a wire we own, so slowing it down is fair.
"""
from __future__ import annotations

import datetime as dt
import time

import pytest
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from workers import classify
from workers.classify import classify_message, find_return_date

OOO = (b"From: anna@prospect.example\r\nTo: tom@vendor.example\r\nSubject: Automatic reply: Intro\r\n"
       b"Date: Tue, 1 Dec 2026 09:00:00 +0000\r\nAuto-Submitted: auto-replied\r\n"
       b"In-Reply-To: <s1@vendor.example>\r\nMessage-ID: <ooo1@prospect.example>\r\n\r\n"
       b"I am out of the office until 14 December 2026.\r\n")


@pytest.fixture
def slow_dateparser(monkeypatch):
    import dateparser

    def slow(*_args, **_kwargs):
        time.sleep(5)  # longer than the 1 s job timeout armed below

    monkeypatch.setattr(dateparser, "parse", slow)


def test_timeout_inside_date_parsing_propagates(slow_dateparser):
    started = time.monotonic()
    with pytest.raises(JobTimeoutException), UnixSignalDeathPenalty(1, JobTimeoutException, job_id="t1"):
        find_return_date("I am out of the office until 14 December 2026.", dt.date(2026, 12, 1))
    assert time.monotonic() - started < 4  # ended by the timeout, not by dateparser returning


def test_timeout_propagates_through_classify_message(slow_dateparser):
    with pytest.raises(JobTimeoutException), UnixSignalDeathPenalty(1, JobTimeoutException, job_id="t2"):
        classify_message(OOO)


def test_ordinary_dateparser_errors_are_still_contained(monkeypatch):
    """Bad mail must not crash the worker: an ordinary error in dateparser means 'no date'."""
    import dateparser

    def broken(*_args, **_kwargs):
        raise ValueError("odd input")

    monkeypatch.setattr(dateparser, "parse", broken)
    assert find_return_date("I am out of the office until 14 December 2026.", dt.date(2026, 12, 1)) is None


def test_no_handler_in_the_classifier_swallows_timeouts():
    """Every ``except Exception`` in the classifier's modules is preceded by a clause that
    re-raises RQ's timeout (read from the source, so a new handler cannot forget it)."""
    import inspect
    import re

    from workers import auto_reply_text, machine_mail

    for module in (classify, machine_mail, auto_reply_text):
        lines = inspect.getsource(module).splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*except (Exception|BaseException)\b", line):
                before = "\n".join(lines[max(0, i - 2):i])
                assert "except BaseTimeoutException" in before, f"{module.__name__}:{i + 1}"
