"""``exchange-listener salesforce-emulator``: serve the Salesforce REST emulator until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import sys

from exchange_listener.core import logs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8086)
    parser.add_argument("--jwt-cert", metavar="FILE",
                        help="PEM X.509 certificate of the connected app: JWT assertions must be signed (RS256) by "
                             "its key; without it any well-formed assertion for a seeded User is accepted")
    parser.add_argument("--client-id", action="append", default=[], metavar="CONSUMER_KEY",
                        help="accepted JWT issuer (repeatable; none given: any)")
    parser.add_argument("--external-id", action="append", default=[], metavar="TYPE.FIELD",
                        help="an external-id field upserts may use (repeatable; default: "
                             "ExchangeListener_Transition_Id__c on Task and EmailMessage)")
    parser.add_argument("--log-level", default="warning")


def run(args: argparse.Namespace) -> int:
    try:
        from emulators.salesforce.server import DEFAULT_EXTERNAL_IDS, Options
        from emulators.salesforce.server import run as serve
    except ImportError as exc:  # aiohttp is the 'emulator' extra, not needed to run the service
        print(f"exchange-listener salesforce-emulator: {exc}; install the extra: "
              "pip install 'exchange-listener[emulator]'", file=sys.stderr)
        return 2

    logs.configure(args.log_level, "auto", stream=sys.stderr)
    cert = None
    if args.jwt_cert:
        try:
            with open(args.jwt_cert, "rb") as fh:
                cert = fh.read()
        except OSError as exc:
            print(f"exchange-listener salesforce-emulator: cannot read --jwt-cert: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    options = Options(client_ids=tuple(args.client_id), jwt_cert=cert,
                      external_ids=tuple(args.external_id) or DEFAULT_EXTERNAL_IDS)

    def ready(url: str) -> None:
        print(f"Salesforce emulator serving {url} (login URL)", flush=True)

    try:
        serve(options, args.host, args.port, ready)
    except ValueError as exc:  # a certificate that is not PEM
        print(f"exchange-listener salesforce-emulator: --jwt-cert: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"exchange-listener salesforce-emulator: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
