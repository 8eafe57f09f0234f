"""Log lines: JSON off a terminal, secrets blanked, and a library's exception with its traceback."""
from __future__ import annotations

import io
import json
import logging

from exchange_listener.core import logs


def test_a_library_exception_is_logged_as_json_with_its_traceback():
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    try:
        raise ValueError("I/O operation on closed file.")
    except ValueError:
        logging.getLogger("rq.worker").error("found an unhandled exception, quitting...", exc_info=True)  # noqa: G201 - as rq does
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["event"] == "found an unhandled exception, quitting..." and line["level"] == "error"
    assert "Traceback" in line["exception"] and "ValueError: I/O operation on closed file." in line["exception"]
    assert "exc_info" not in line  # not a tuple's repr


def test_our_own_exceptions_and_secrets():
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    try:
        raise KeyError("gone")
    except KeyError:
        logs.get_logger(mailbox="rep@x.example").exception("failed", client_secret="hunter2")
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["mailbox"] == "rep@x.example" and line["client_secret"] == "***"
    assert "KeyError: 'gone'" in line["exception"]
    assert "hunter2" not in out.getvalue()
