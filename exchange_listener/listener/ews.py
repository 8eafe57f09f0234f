"""The EWS listener: leases mailboxes, streams them in groups, enqueues every new mail.

One thread per group streams (``sources.ews.stream``), a few threads catch up from
SyncFolderItems state (``sources.ews.catch_up``); the loop, the leases and the buffered enqueue
are every listener's (``listener.base``). Nothing is lost on the way to the queue:

- a stream event is enqueued at once (held in memory while Redis is away);
- catch-up runs on start and after every reconnect, resubscribe, expiry, server restart and
  takeover, and its sync state only advances after its items are enqueued;
- while streaming, the folders that had new mail are checkpointed every ``checkpoint_seconds``
  (a catch-up that finds only processed mail), so a restart reads only the gap;
- a move (also to Deleted Items or Recoverable Items) is recorded in the ledger, so a worker
  whose item is gone follows it; mail in a folder made since the tree was read triggers a
  catch-up with the tree refreshed.

Each catch-up thread has a Protocol (one HTTP session) of its own. With one pool shared by the
threads, exchangelib answers ErrorServerBusy by shrinking the pool, and threads then wait for a
session without end (``Protocol.get_session``): whole mailboxes were never caught up after a
busy spell (found by the chaos drill). A pool of one is never shrunk.

SIGTERM (or SIGINT): streams are stopped, subscriptions removed, leases released; exit 0 well
within supervisord's 10 s.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from exchange_listener.core import metrics
from exchange_listener.core.config import Settings
from exchange_listener.listener.base import (
    REDIS_ERRORS,
    BaseListener,
    CatchUps,
    Folders,
)
from exchange_listener.sources.base import NewMail
from exchange_listener.sources.ews import account as ews_account
from exchange_listener.sources.ews.catch_up import SyncStore, catch_up_mailbox
from exchange_listener.sources.ews.stream import (
    EWS_MAX_SUBSCRIPTIONS,
    HANGING_CONNECTION_LIMIT,
    StreamGroup,
)

if TYPE_CHECKING:  # exchangelib's (untyped); account makes them
    from exchangelib import Configuration

MAX_GROUP_SIZE = 200  # Exchange's limit of subscriptions per GetStreamingEvents; groups may grow to it


class EwsListener(BaseListener):
    source = "ews"

    def __init__(self, settings: Settings):
        settings.require("ews_url", "redis_url")
        super().__init__(settings)
        self.sync = SyncStore(self.conn)
        self.groups: list[StreamGroup] = []
        self.group_of: dict[str, StreamGroup] = {}
        self._group_seq = 0
        self._full_groups: list[StreamGroup] = []  # groups the server refused a connection for
        self.catchups: CatchUps[Configuration] = CatchUps(self.holds, self._catch_up, self._configuration, settings)

    def _configuration(self, i: int) -> Configuration:
        return ews_account.make_configuration(self.settings, pool=f"{self.listener_id}/sync-{i}", max_connections=1)

    def _catch_up(self, config: Configuration, mailbox: str, reason: str, folders: Folders) -> None:
        account = ews_account.make_account(self.settings, mailbox, config)
        account.protocol.TIMEOUT = 30
        total, watched = catch_up_mailbox(account, mailbox, self.sync, self.ledger, self.sink.enqueue,
                                          added_at=self.watched.get(mailbox),
                                          folders=sorted(folders) if folders is not None else None)
        if watched is not None:
            group = self.group_of.get(mailbox)
            if group is not None:
                _, ignored = self.sync.known(mailbox)
                group.set_folders(mailbox, watched, ignored)
        metrics.CATCHUPS.labels("checkpoint" if folders is not None else "full").inc()
        self.log.debug("caught up", mailbox=mailbox, reason=reason, items=total,
                       folders="all" if folders is None else len(folders))

    # -- callbacks from stream threads -----------------------------------------------------
    def holds(self, mailbox: str) -> bool:
        return mailbox in self.group_of

    def held(self) -> list[str]:
        return list(self.group_of)

    def _on_mail(self, mails: Sequence[NewMail], *, subscription_id: str, group: str) -> None:
        self.sink.put(mails)  # the sink's thread batches what arrives together, across mailboxes
        self._note_activity(mails[0].mailbox, {m.folder for m in mails})
        self.log.debug("new mail", mailbox=mails[0].mailbox, group=group, subscription_id=subscription_id,
                       items=len(mails))

    def _on_subscribed(self, mailboxes: Iterable[str], reason: str) -> None:
        self.catchups.request(mailboxes, reason)

    def _on_unknown_folder(self, mailbox: str, folder_id: str, first: bool = True) -> None:
        if first:
            self.log.info("new mail in a folder not known yet; reading the folder tree and catching up",
                          mailbox=mailbox, folder=folder_id)
        self.catchups.request([mailbox], "new_folder")  # requests merge: a burst costs one more run

    def _on_moves(self, mailbox: str, moves: Sequence[tuple[str, str]], moved_into: Iterable[str] = ()) -> None:
        """Record moves for workers whose item is gone, and have the folders mail was moved into
        checkpointed: mail moved there that no job covers (moved before a stream saw it, or before
        the move was recorded) is found by the checkpoint; processed mail is skipped there."""
        if moved_into:
            self._note_activity(mailbox, set(moved_into))
        if not moves:
            return
        try:
            self.ledger.record_moves(mailbox, moves)
        except REDIS_ERRORS as exc:  # the next full catch-up finds the moved mail in its new folder
            self.log.warning("could not record moved mail; a catch-up will find it", mailbox=mailbox,
                             error=str(exc), moves=len(moves))
            self.catchups.request([mailbox], "moves_unrecorded")

    def _on_limit(self, group: StreamGroup) -> None:
        with self._activity_lock:
            if group not in self._full_groups:
                self._full_groups.append(group)

    def _reform(self) -> None:
        """Fold groups the server refused a connection for into groups with room (fewer connections)."""
        with self._activity_lock:
            full, self._full_groups = self._full_groups, []
        for group in full:
            if group not in self.groups or not group.assigned:
                continue
            others = [g for g in self.groups if g is not group and g.size() < MAX_GROUP_SIZE]
            moving = sorted(group.assigned)
            moved = []
            for target in sorted(others, key=lambda g: -g.size()):
                room = MAX_GROUP_SIZE - target.size()
                batch, moving = moving[:room], moving[room:]
                if batch:
                    target.add(batch)
                    for mailbox in batch:
                        self.group_of[mailbox] = target
                    moved += batch
                if not moving:
                    break
            if moved:
                group.remove(moved)
                self.log.warning("server refused another streaming connection; moved mailboxes into other groups",
                                 group=group.id, moved=len(moved), left=len(group.assigned))
            if not group.assigned:
                group.stop()
                self.groups.remove(group)

    # -- the source's part of the loop -------------------------------------------------------
    def _banner(self) -> dict[str, Any]:
        return {"ews_url": self.settings.ews_url, "group_size": self.settings.group_size}

    def _tick(self) -> None:
        self._reform()
        for group in self.groups:
            group.poke()

    def _take(self, mailboxes: list[str]) -> None:
        size = self.settings.group_size
        for mailbox in mailboxes:
            group = next((g for g in self.groups if g.size() < size), None)
            if group is None:
                self._group_seq += 1
                group = StreamGroup(f"g{self._group_seq}", self.settings, on_mail=self._on_mail,
                                    on_subscribed=self._on_subscribed, on_unknown_folder=self._on_unknown_folder,
                                    on_moves=self._on_moves, on_limit=self._on_limit, folder_cache=self.sync,
                                    listener_id=self.listener_id)
                self.groups.append(group)
                group.start()
            group.add([mailbox])
            self.group_of[mailbox] = group

    def _drop(self, mailboxes: list[str]) -> None:
        by_group: collections.defaultdict[StreamGroup, list[str]] = collections.defaultdict(list)
        for mailbox in mailboxes:
            group = self.group_of.pop(mailbox, None)
            if group is not None:
                by_group[group].append(mailbox)
        for group, members in by_group.items():
            group.remove(members)

    def _source_info(self) -> dict[str, Any]:
        groups = [g.status() for g in self.groups]
        return {"groups": groups, "throttling": self._throttling(groups)}

    @staticmethod
    def _throttling(groups: list[dict[str, Any]]) -> dict[str, Any]:
        """How close this listener is to Exchange's default throttling policy (``status`` shows it).

        A streaming connection is charged to the mailbox its GetStreamingEvents impersonates
        (``stream_as``), a subscription to its target mailbox: the figures are the most any one
        budget carries, against what the default policy allows (emulators/ews/throttling.py)."""
        per_budget = collections.Counter(g["stream_as"] for g in groups if g["connected"] and g.get("stream_as"))
        return {"streaming_connections": sum(per_budget.values()),
                "connections_per_budget_max": max(per_budget.values(), default=0),
                "connections_per_budget_allowed": HANGING_CONNECTION_LIMIT,
                "subscriptions": sum(g["subscribed"] for g in groups),
                "subscriptions_per_mailbox_max": 1 if any(g["subscribed"] for g in groups) else 0,
                "subscriptions_per_mailbox_allowed": EWS_MAX_SUBSCRIPTIONS,
                "group_size_max": max((g["mailboxes"] for g in groups), default=0),
                "group_size_allowed": MAX_GROUP_SIZE}

    def _stop_source(self, deadline: float) -> dict[str, Any]:
        for group in self.groups:
            group.stop()
        joined_by = time.monotonic() + 1.5  # one shared wait: a thread stuck in a request is left behind
        for group in self.groups:
            group.join(max(0.0, joined_by - time.monotonic()))
        done: list[int] = []
        threads = [threading.Thread(target=lambda g=g: done.append(g.unsubscribe_all()), daemon=True)
                   for g in self.groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.05, deadline - time.monotonic() - 2))
        return {"unsubscribed": sum(done)}
