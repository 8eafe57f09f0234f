"""``exchange-listener graph-emulator``: serve the Microsoft Graph emulator until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import sys

from exchange_listener.core import logs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8087, help="Graph port (http; default %(default)s)")
    parser.add_argument("--token-port", type=int, default=0,
                        help="port of the HTTPS token host (default: a free port)")
    # dest names unlike the settings': these options configure the emulator, not a listener
    parser.add_argument("--ca-file", dest="ca_out", metavar="PATH",
                        help="where to write the token host's CA certificate (PEM; default: a temporary file)")
    parser.add_argument("--tenant", default="contoso-tenant", help="tenant id in the token URL (default %(default)s)")
    parser.add_argument("--client-id", dest="app_id", default="graph-app", help="the one application's client id")
    parser.add_argument("--client-secret", dest="app_secret", default=None,
                        help="its client secret (none: certificates only)")
    parser.add_argument("--client-certificate", action="append", default=[], metavar="PEM",
                        help="PEM file with the application's certificate (a private key beside it is ignored); "
                             "client assertions signed by its key are accepted (repeatable)")
    parser.add_argument("--mailbox", action="append", default=[], metavar="ADDRESS",
                        help="mailbox to create at start (delivering to an unknown address creates it too)")
    parser.add_argument("--token-lifetime", type=int, default=3599, help="access token lifetime, seconds")
    parser.add_argument("--notification-timeout", type=float, default=3.0,
                        help="seconds a receiver has to answer 2xx (Graph: 3)")
    parser.add_argument("--slow-threshold-seconds", type=float, default=None,
                        help="an answer slower than this counts as slow (default: 2.9/3 of --notification-timeout)")
    parser.add_argument("--retry-base-seconds", type=float, default=1.0,
                        help="first retry delay of a failed notification, doubling (default %(default)g)")
    parser.add_argument("--retry-cap-seconds", type=float, default=600.0, help="longest retry delay")
    parser.add_argument("--retry-window-seconds", type=float, default=4 * 3600.0,
                        help="how long a notification is retried before it is dropped (Graph: 4 h)")
    parser.add_argument("--slow-window-seconds", type=float, default=600.0,
                        help="length of the slow-endpoint measuring window (Graph: 10 min)")
    parser.add_argument("--slow-min-count", type=int, default=100,
                        help="notifications a window needs before the slow rules apply (Graph: 100)")
    parser.add_argument("--slow-delay-seconds", type=float, default=600.0,
                        help="delay for a slow endpoint's notifications (Graph: 10 min)")
    parser.add_argument("--validation-timeout", type=float, default=10.0,
                        help="seconds a receiver has to answer the validation request (Graph: 10)")
    parser.add_argument("--max-subscriptions-per-mailbox", type=int, default=1000)
    parser.add_argument("--max-concurrent-per-mailbox", type=int, default=4)
    parser.add_argument("--latency-seconds", type=float, default=0.0,
                        help="time every Graph request takes while holding its mailbox's slot")
    parser.add_argument("--restart-seconds", type=float, default=1.0,
                        help="how long the restart fault answers 503")
    parser.add_argument("--delta-generations", type=int, default=4,
                        help="newest delta/next links of one chain that stay valid (older: 410)")
    parser.add_argument("--log-level", dest="emulator_log_level", default="warning")


def run(args: argparse.Namespace) -> int:
    try:
        from emulators.graph.auth import load_certificates
        from emulators.graph.server import Options, Timing
        from emulators.graph.server import run as serve
    except ImportError as exc:  # aiohttp and trustme are the 'emulator' extra, not needed to run the service
        print(f"exchange-listener graph-emulator: {exc}; install the extra: pip install 'exchange-listener[emulator]'",
              file=sys.stderr)
        return 2

    logs.configure(args.emulator_log_level, "auto", stream=sys.stderr)
    certificates = []
    for path in args.client_certificate:
        try:
            with open(path, "rb") as fh:
                certificates.extend(load_certificates(fh.read()))
        except OSError as exc:
            print(f"exchange-listener graph-emulator: cannot read --client-certificate {path}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"exchange-listener graph-emulator: --client-certificate {path}: {exc}", file=sys.stderr)
            return 2
    if args.app_secret is None and not certificates:
        print("exchange-listener graph-emulator: give --client-secret and/or --client-certificate", file=sys.stderr)
        return 2
    timeout = args.notification_timeout
    timing = Timing(notification_timeout=timeout,
                    slow_threshold=args.slow_threshold_seconds if args.slow_threshold_seconds is not None
                    else timeout * 2.9 / 3.0,
                    retry_base=args.retry_base_seconds, retry_cap=args.retry_cap_seconds,
                    retry_window=args.retry_window_seconds, slow_window=args.slow_window_seconds,
                    slow_min_count=args.slow_min_count, slow_delay=args.slow_delay_seconds,
                    validation_timeout=args.validation_timeout)
    options = Options(tenant=args.tenant, client_id=args.app_id, client_secret=args.app_secret,
                      certificates=certificates, mailboxes=args.mailbox, token_lifetime=args.token_lifetime,
                      timing=timing, max_subscriptions_per_mailbox=args.max_subscriptions_per_mailbox,
                      max_concurrent_per_mailbox=args.max_concurrent_per_mailbox, latency=args.latency_seconds,
                      restart_seconds=args.restart_seconds, delta_generations=args.delta_generations)

    def ready(graph_url: str, token_url: str, ca_file: str) -> None:
        print(f"Graph emulator serving {graph_url} (tenant {args.tenant})", flush=True)
        print(f"token URL: {token_url} (CA certificate: {ca_file})", flush=True)

    try:
        serve(options, args.host, args.port, args.token_port, args.ca_out, ready)
    except OSError as exc:
        print(f"exchange-listener graph-emulator: cannot listen on {args.host}:{args.port}/{args.token_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
