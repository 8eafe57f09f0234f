"""The boundary between a mail source (EWS today; Graph or IMAP later) and the workers.

The listener turns a source's events into ``NewMail`` jobs; workers see only
``FetchedMessage`` objects from a ``MailFetcher``. Nothing in ``workers/`` imports
exchangelib, so another source is a new fetcher plus a new listener, and no worker change.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

# Mails a listener puts in one job at most (a catch-up page of one mailbox; stream mail of any
# mailboxes that arrived together): RQ's own work, ~2 ms CPU per job, is then shared by many
# mails, and a job stays far inside job_timeout.
MAX_MAILS_PER_JOB = 50
# Mail received up to this long before a mailbox was added (or before the ledger's horizon) is
# still taken by a catch-up, to cover clock skew between us and the server (every source).
SKEW_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class NewMail:
    """One mail the listener saw arrive; the unit a job carries (JSON-safe via ``as_dict``)."""

    mailbox: str
    item_id: str
    folder: str = ""
    seen_at: float = 0.0  # epoch seconds when the listener saw the event
    via: str = "stream"  # stream | catchup
    message_id: str = ""  # normalized Internet Message-ID, when the source read it (catch-up does)
    received_at: float = 0.0  # epoch seconds the server received it, when known

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NewMail:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclasses.dataclass
class FetchedMessage:
    """What a worker needs of one mail: ids, participants and headers; MIME only on request."""

    mailbox: str
    item_id: str
    internet_message_id: str | None
    subject: str
    sender: str | None
    from_address: str | None
    to: list[str]
    cc: list[str]
    received_at: datetime.datetime | None
    conversation_id: str | None
    in_reply_to: str | None
    references: str | None
    headers: list[tuple[str, str]]  # every internet header, in order, as the server gave them
    mime: bytes | None = None  # the full RFC 5322 source, when fetched
    item_class: str | None = None  # the source's own type of item (EWS ItemClass, e.g. IPM.Schedule.Meeting.Resp.Pos)
    # the mail sits in the mailbox's own-mail folders (Sent Items, Drafts, Outbox): never a reply;
    # the job skips it. (A Graph subscription covers every folder, so our own sends come through.)
    outgoing: bool = False


class ItemGone(Exception):
    """The item no longer exists (deleted or moved away before the worker got to it)."""


class ItemUnreadable(ItemGone):
    """The item exists but the server cannot return it (corrupt, MIME conversion failed)."""


class MailFetcher(Protocol):
    """Fetch messages of one mailbox by item id, in as few round trips as the source allows."""

    def fetch(self, mailbox: str, item_ids: Sequence[str]) -> list[FetchedMessage | ItemGone]:
        """Headers and participants for each id, in the given order (``ItemGone`` for missing ones)."""

    def fetch_mime(self, mailbox: str, item_id: str) -> bytes:
        """The full RFC 5322 source, for classification that needs the body or attachments."""

    def fetch_texts(self, mailbox: str, item_ids: Sequence[str]) -> list[str | None | ItemGone]:
        """The text each message added (e.g. EWS UniqueBody), in the given order, in as few round
        trips as the source allows: ``ItemGone`` for a missing or unreadable item, ``None`` when
        the source reads no such text (the caller then reads the MIME). This default asks the
        source's one-item ``fetch_text`` per id when it has one, so a source need not implement it."""
        fetch_text = getattr(self, "fetch_text", None)
        if fetch_text is None:
            return [None for _ in item_ids]
        out: list[str | None | ItemGone] = []
        for item_id in item_ids:
            try:
                out.append(fetch_text(mailbox, item_id))
            except ItemGone as exc:
                out.append(exc)
        return out

    def close(self) -> None: ...
