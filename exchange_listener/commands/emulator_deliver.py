"""``exchange-listener emulator-deliver``: POST an RFC 5322 file to an emulator mailbox."""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="emulator base URL, e.g. http://127.0.0.1:8085")
    parser.add_argument("--mailbox", required=True, metavar="ADDRESS")
    parser.add_argument("--folder", default="inbox", metavar="NAME",
                        help="distinguished name (inbox, junkemail, calendar, ...) or a user folder path such as "
                             "Customers/Acme or Inbox/Sub, created on demand (default inbox)")
    parser.add_argument("file", metavar="FILE.eml", help="the raw message ('-' reads stdin)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.file == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as fh:
                raw = fh.read()
    except OSError as exc:
        print(f"emulator-deliver: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    base = base.removesuffix("/EWS/Exchange.asmx")
    url = (f"{base}/emulator/mailboxes/{urllib.parse.quote(args.mailbox, safe='@')}/messages?"
           + urllib.parse.urlencode({"folder": args.folder}))
    req = urllib.request.Request(url, data=raw, method="POST", headers={"Content-Type": "message/rfc822"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            result = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"emulator-deliver: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"emulator-deliver: cannot reach {base}: {exc.reason}", file=sys.stderr)
        return 3
    print(json.dumps(result))
    return 0
