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

from workers.classify import classify_message, find_return_date
from workers.classify import headers as classify

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


def _broad(handler_type) -> bool:
    """The handler catches Exception or BaseException (alone, in a tuple, or bare)."""
    import ast

    if handler_type is None:
        return True
    names = handler_type.elts if isinstance(handler_type, ast.Tuple) else [handler_type]
    return any(ast.unparse(n).rsplit(".", 1)[-1] in ("Exception", "BaseException") for n in names)


def _catches_timeout(handler_type) -> bool:
    import ast

    names = handler_type.elts if isinstance(handler_type, ast.Tuple) else [handler_type]
    return any(ast.unparse(n).rsplit(".", 1)[-1] == "BaseTimeoutException" for n in names)


def _unguarded_handlers(source: str) -> list[int]:
    """Line numbers of broad handlers with no earlier ``except BaseTimeoutException`` clause
    in the same ``try`` (read with ``ast``: tuples, bare ``except:`` and dotted names count)."""
    import ast

    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            continue
        for index, handler in enumerate(node.handlers):
            if _broad(handler.type) and not any(
                    h.type is not None and _catches_timeout(h.type) for h in node.handlers[:index]):
                bad.append(handler.lineno)
    return bad


def test_no_handler_in_the_classifier_swallows_timeouts():
    """Every handler that catches ``Exception``/``BaseException`` in the classifier's modules
    comes after a clause for RQ's timeout in the same ``try`` (read from the source, so a new
    handler cannot forget it)."""
    import inspect

    from workers.classify import auto_reply_text, machine_mail, return_date, verdict

    for module in (classify, machine_mail, auto_reply_text, return_date, verdict):
        assert _unguarded_handlers(inspect.getsource(module)) == [], module.__name__


@pytest.mark.parametrize("clause", ["except Exception:", "except (ValueError, Exception):",
                                    "except builtins.BaseException:", "except:",
                                    "except (KeyError, BaseException) as exc:"])
def test_the_source_check_sees_every_broad_handler(clause):
    """The check itself can fail: a broad clause without the timeout first is reported,
    and the same clause after ``except BaseTimeoutException: raise`` is not."""
    bare = f"try:\n    f()\n{clause}\n    pass\n"
    guarded = f"try:\n    f()\nexcept BaseTimeoutException:\n    raise\n{clause}\n    pass\n"
    assert _unguarded_handlers(bare) == [3]
    assert _unguarded_handlers(guarded) == []
    assert _unguarded_handlers(f"try:\n    f()\nexcept ValueError:\n    pass\n{clause}\n    pass\n") == [5]
