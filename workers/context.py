"""What a job needs from its process: settings, Redis, the stores and a fetcher per mail source.

Built lazily on first use and once per process: a job running in a worker reuses the Redis
pool, the stores and the fetcher's HTTP sessions of the previous job. After a fork the child
starts from nothing (``os.register_at_fork``), so no socket or exchangelib session is shared
between processes.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import TYPE_CHECKING

from redis import Redis

from exchange_listener.core import config, redis_conn
from exchange_listener.core.config import Settings
from exchange_listener.sources.base import MailFetcher

if TYPE_CHECKING:  # for the annotations only: at run time each is imported on first use
    from exchange_listener.sources.ledger import Ledger
    from workers.sinks.webhooks import Notifier
    from workers.state.enrollments import EnrollmentStore
    from workers.state.sends import SendRegistry

# source name (the job payload's "source") -> "module:Class" of its MailFetcher
FETCHERS = {"ews": "exchange_listener.sources.ews.fetch:EwsFetcher",
            "graph": "exchange_listener.sources.graph.fetch:GraphFetcher",
            "imap": "exchange_listener.sources.imap.fetch:ImapFetcher"}


class Context:
    """Per-process resources for jobs; every attribute is created on first access."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._redis: Redis | None = None
        self._sends: SendRegistry | None = None
        self._enrollments: EnrollmentStore | None = None
        self._notifier: Notifier | None = None
        self._ledger: Ledger | None = None
        self._fetchers: dict[str, MailFetcher] = {}

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            self._redis = redis_conn.connect(self.settings.redis_url)
        return self._redis

    @property
    def sends(self) -> SendRegistry:
        if self._sends is None:
            from workers.state.sends import SendRegistry

            self._sends = SendRegistry(self.redis, retention_days=self.settings.retention_days)
        return self._sends

    @property
    def enrollments(self) -> EnrollmentStore:
        if self._enrollments is None:
            from workers.state.enrollments import EnrollmentStore

            self._enrollments = EnrollmentStore(self.redis, retention_days=self.settings.retention_days,
                                                pause_days=self.settings.pause_days)
        return self._enrollments

    @property
    def ledger(self) -> Ledger:
        """Processed mail per mailbox (so a catch-up never fetches it again) and the move map."""
        if self._ledger is None:
            from exchange_listener.sources.ledger import Ledger

            self._ledger = Ledger(self.redis, processed_days=self.settings.processed_days)
        return self._ledger

    @property
    def notifier(self) -> Notifier:
        if self._notifier is None:
            from workers.sinks.webhooks import Notifier

            self._notifier = Notifier.from_settings(self.redis, self.settings)
        return self._notifier

    def fetcher(self, source: str) -> MailFetcher:
        """The MailFetcher for ``source`` (``ValueError`` for a source nobody implements)."""
        with self._lock:
            fetcher = self._fetchers.get(source)
            if fetcher is None:
                if source not in FETCHERS:
                    raise ValueError(f"unknown mail source {source!r} (known: {', '.join(sorted(FETCHERS))})")
                module, _, name = FETCHERS[source].partition(":")
                fetcher = getattr(importlib.import_module(module), name)(self.settings)
                self._fetchers[source] = fetcher
            return fetcher

    def warm_up(self) -> None:
        """Build every fetcher now (exchangelib's import and session set-up) rather than inside
        the first job; the worker also imports the job code and dateparser's data up front."""
        for source in FETCHERS:
            self.fetcher(source)

    def close(self) -> None:
        for fetcher in self._fetchers.values():
            fetcher.close()
        self._fetchers.clear()
        if self._redis is not None:
            self._redis.close()
            self._redis = None


_current: Context | None = None


def configure(settings: Settings) -> Context:
    """Use ``settings`` for jobs in this process (the worker calls this with its --config)."""
    global _current
    if _current is not None:
        _current.close()
    _current = Context(settings)
    return _current


def get() -> Context:
    """The process's context; loads settings from $EXCHANGE_LISTENER_CONFIG / env on first use."""
    if _current is None:
        return configure(config.load())
    return _current


def _forget_after_fork() -> None:
    global _current
    if _current is not None:  # keep the settings; the parent's sockets and sessions stay the parent's
        _current = Context(_current.settings)


os.register_at_fork(after_in_child=_forget_after_fork)
