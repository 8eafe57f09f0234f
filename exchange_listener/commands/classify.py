"""``exchange-listener classify FILE...``: classify RFC 5322 message files, one JSON object per line.

Each object has ``file``, ``kind`` and ``references`` (normalized Message-IDs), plus
``original_message_id``, ``bounce_type`` (hard | soft) and ``return_date`` (ISO date) where
they apply (null otherwise), and the other Classification fields. ``-`` reads standard input. A file that
cannot be read or is not a message gives an object with ``error`` instead, and the command
exits 1 after the other files are done. Needs no settings, Redis or Exchange.
"""
from __future__ import annotations

import argparse
import json
import sys

from workers.classify import (
    UnparseableMessage,
    classify_headers,
    classify_message,
    needs_body,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="message file (RFC 5322 / .eml); - for stdin")
    parser.add_argument("--headers-only", action="store_true",
                        help="classify from the headers alone, as the worker's hot path does "
                             "(adds 'needs_body')")


def _classify_one(path: str, headers_only: bool) -> dict:
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as fh:
                raw = fh.read()
    except OSError as exc:
        return {"file": path, "error": f"cannot read: {exc.strerror or exc}"}
    try:
        if headers_only:
            return {"file": path, **_headers_only(raw)}
        result = classify_message(raw).as_dict()
    except UnparseableMessage as exc:
        return {"file": path, "error": str(exc)}
    return {"file": path, **result}


def _headers_only(raw: bytes) -> dict:
    import email
    import email.policy

    if not raw.strip():
        raise UnparseableMessage("empty message")
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    headers = [(k, str(v)) for k, v in msg.items()]
    return {**classify_headers(headers).as_dict(), "needs_body": needs_body(headers)}


def run(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        result = _classify_one(path, args.headers_only)
        failed += "error" in result
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return 1 if failed else 0
