"""Prometheus metrics for listeners and workers, served on ``metrics_port`` when it is set.

Workers count in the process that runs the job; the worker runs jobs in-process (no fork per
job), so no multiprocess directory is needed and nothing is lost when a horse exits.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

EVENTS_RECEIVED = Counter("el_events_received_total", "Streaming events received from the mail source", ["kind"])
JOBS_ENQUEUED = Counter("el_jobs_enqueued_total", "Jobs put on the queue", ["via"])
RECONNECTS = Counter("el_reconnects_total", "Streaming connections reopened", ["reason"])
RESUBSCRIBES = Counter("el_resubscribes_total", "Mailboxes resubscribed", ["reason"])
CATCHUP_ITEMS = Counter("el_catchup_items_total", "Items found by SyncFolderItems catch-up")
CATCHUPS = Counter("el_catchups_total", "Catch-ups run: full (after a gap, tree refreshed) or checkpoint", ["kind"])
ITEMS_GONE = Counter("el_items_gone_total", "Items gone when a worker came to them: found again elsewhere "
                     "(relocated), found nowhere, or there but unreadable", ["outcome"])
GRAPH_NOTIFICATIONS = Counter("el_graph_notifications_total", "Graph notifications received: queued (one per "
                              "message), rejected (not our subscription or clientState), malformed, oversize (a POST "
                              "over the body or item cap, refused with 413), or a lifecycle event (missed, "
                              "subscriptionRemoved, reauthorizationRequired)", ["outcome"])
GRAPH_SUBSCRIPTIONS = Counter("el_graph_subscriptions_total", "Graph subscriptions created, renewed, reauthorized, "
                              "recreated (found gone) or deleted", ["action"])
CLASSIFIED = Counter("el_classified_total", "Messages classified, by kind", ["kind"])
TRANSITIONS = Counter("el_transitions_total", "Enrollment transitions made", ["status", "reason"])
UNMATCHED = Counter("el_unmatched_total", "Messages that matched no recorded send", ["kind"])
JOBS_PROCESSED = Counter("el_jobs_processed_total", "Jobs finished by workers", ["outcome"])
DELIVERY_TO_STOP = Histogram(
    "el_delivery_to_stop_seconds", "From the listener seeing a reply to its enrollment transition",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def serve(port: int) -> None:
    """Start the /metrics endpoint on ``port`` (0 = disabled)."""
    if port:
        start_http_server(port, addr="0.0.0.0")
