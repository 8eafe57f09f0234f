"""Classify an incoming mail: human reply, auto-reply, bounce, read receipt, complaint, machine, other.

The public API; callers write ``from workers.classify import classify_message``. Inside the
package imports point one way, each module importing only those above it in this list:

- ``verdict``: ``Classification``, ``KINDS``, ``UnparseableMessage``, the subject rules;
- ``return_date``: the return date an out-of-office states;
- ``machine_mail``: list managers, ticket systems, CRMs, calendars (reads ``verdict``);
- ``auto_reply_text``: out-of-offices told only by their text (reads ``verdict``, ``return_date``);
- ``headers``: the header rules and the full-message pass (reads all of the above).
"""
from workers.classify.auto_reply_text import first_text
from workers.classify.headers import (
    classify_headers,
    classify_message,
    headers_of,
    needs_body,
    needs_text,
    settle_with_text,
)
from workers.classify.return_date import find_return_date
from workers.classify.verdict import KINDS, Classification, UnparseableMessage

__all__ = [
    "KINDS",
    "Classification",
    "UnparseableMessage",
    "classify_headers",
    "classify_message",
    "find_return_date",
    "first_text",
    "headers_of",
    "needs_body",
    "needs_text",
    "settle_with_text",
]
