"""``exchange-listener emulator``: serve the EWS emulator until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import sys

from exchange_listener.core import config, logs


def _pair(value: str) -> tuple[str, str]:
    name, sep, secret = value.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME:SECRET")
    return name, secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8085)
    parser.add_argument("--account", type=_pair, action="append", default=[], metavar="USER:PASSWORD",
                        help="Basic-auth account that may impersonate every mailbox (repeatable)")
    parser.add_argument("--plain-account", type=_pair, action="append", default=[], metavar="USER:PASSWORD",
                        help="Basic-auth account without impersonation rights: its own mailbox only")
    parser.add_argument("--oauth-client", type=_pair, action="append", default=[], metavar="ID:SECRET",
                        help="OAuth2 client-credentials app that may impersonate every mailbox (repeatable)")
    parser.add_argument("--mailbox", action="append", default=[], metavar="ADDRESS",
                        help="mailbox to create at start (delivering to an unknown address creates it too)")
    parser.add_argument("--heartbeat-seconds", type=float, default=config.default("heartbeat_seconds"),
                        help="seconds between ConnectionStatus OK heartbeats on an idle stream; the default is "
                             "what the listener's heartbeat_seconds assumes (default %(default)g)")
    parser.add_argument("--subscription-idle-timeout", type=float, default=300.0,
                        help="seconds a subscription with no open stream lives (default 300)")
    parser.add_argument("--max-streams-per-account", type=int, default=0,
                        help="open GetStreamingEvents connections per account (0 = unlimited)")
    parser.add_argument("--max-subscriptions-per-mailbox", type=int, default=0,
                        help="subscriptions per mailbox (0 = unlimited)")
    parser.add_argument("--connection-timeout-minute-seconds", type=float, default=60.0,
                        help="how long one ConnectionTimeout minute lasts (tests shorten it; default 60)")
    parser.add_argument("--max-queued-events", type=int, default=10_000,
                        help="events a subscription may queue before it fails with ErrorMissedNotificationEvents")
    # on-premises Exchange as it runs (issue 15)
    parser.add_argument("--auth", default="basic,ntlm,oauth2",
                        help="authentication schemes offered, comma-separated: basic, ntlm (also Negotiate-wrapped "
                             "NTLM), oauth2 (default: all)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    parser.add_argument("--throttling", choices=("off", "default"), default="off",
                        help="enforce Exchange's default throttling policy on each account (default off)")
    parser.add_argument("--server-version", choices=("2016", "2019", "SE"), default="2016",
                        help="the Exchange Server version to answer as (ServerVersionInfo; default 2016)")
    parser.add_argument("--autodiscover-redirect", metavar="URL", default="",
                        help="answer POX autodiscover with a redirect to this autodiscover URL")
    parser.add_argument("--log-level", default="warning")


def _raise_open_file_limit() -> None:
    """Every open stream is a socket: allow as many as the hard limit permits."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ImportError, ValueError, OSError):
        pass


def run(args: argparse.Namespace) -> int:
    try:
        from emulators.ews.server import Options
        from emulators.ews.server import run as serve
    except ImportError as exc:  # aiohttp is the 'emulator' extra, not needed to run the service
        print(f"exchange-listener emulator: {exc}; install the extra: pip install 'exchange-listener[emulator]'",
              file=sys.stderr)
        return 2

    logs.configure(args.log_level, "auto", stream=sys.stderr)
    _raise_open_file_limit()
    options = Options(
        accounts=dict(args.account), plain_accounts=dict(args.plain_account), oauth_clients=dict(args.oauth_client),
        mailboxes=args.mailbox, heartbeat_seconds=args.heartbeat_seconds, idle_timeout=args.subscription_idle_timeout,
        max_streams_per_account=args.max_streams_per_account,
        max_subscriptions_per_mailbox=args.max_subscriptions_per_mailbox,
        minute_seconds=args.connection_timeout_minute_seconds, max_queued_events=args.max_queued_events,
        auth=tuple(a.strip() for a in args.auth.split(",") if a.strip()), tls_cert=args.tls_cert or "",
        tls_key=args.tls_key or "", throttling=args.throttling, server_version=args.server_version,
        autodiscover_redirect=args.autodiscover_redirect,
    )

    def ready(url: str) -> None:
        print(f"EWS emulator serving {url}", flush=True)

    if not (options.accounts or options.plain_accounts or options.oauth_clients):
        print("exchange-listener emulator: warning: no --account, --plain-account or --oauth-client given; "
              "every EWS request will get 401", file=sys.stderr)
    try:
        serve(options, args.host, args.port, ready)
    except OSError as exc:
        print(f"exchange-listener emulator: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0
