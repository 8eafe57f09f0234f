"""Where each watched IMAP folder was read up to: (UIDVALIDITY, last UID), kept in Redis.

UIDs only grow within one UIDVALIDITY, so "everything after the last UID we enqueued" is exactly
the new mail, whatever happened meanwhile (an outage, a restart, a takeover by another
listener): no date windows, no unseen flags. A cursor is stored only after the mail up to it
was enqueued, so a crash in between enqueues that mail again (its job id dedupes) and never
skips it. A different UIDVALIDITY (the folder was recreated or its index rebuilt) means the UIDs
start over: the folder is read again and the ledger skips what was processed.
"""
from __future__ import annotations

import dataclasses

import redis

from exchange_listener.core import keys, redis_conn


@dataclasses.dataclass(frozen=True)
class Cursor:
    uidvalidity: int
    last_uid: int

    def encode(self) -> str:
        return f"{self.uidvalidity}:{self.last_uid}"

    @classmethod
    def decode(cls, raw: str) -> Cursor | None:
        validity, _, last = raw.partition(":")
        if not validity.isdigit() or not last.isdigit():
            return None  # a damaged entry reads as none: the folder starts from its baseline
        return cls(int(validity), int(last))


class CursorStore:
    """The cursors of every folder of every mailbox (one hash per mailbox)."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn

    def get(self, mailbox: str, folder: str) -> Cursor | None:
        raw = self.conn.hget(keys.imap_cursor(mailbox), folder)
        return None if raw is None else Cursor.decode(redis_conn.text(raw))

    def all(self, mailbox: str) -> dict[str, Cursor]:
        out = {}
        for folder, raw in self.conn.hgetall(keys.imap_cursor(mailbox)).items():
            cursor = Cursor.decode(redis_conn.text(raw))
            if cursor is not None:
                out[redis_conn.text(folder)] = cursor
        return out

    def put(self, mailbox: str, folder: str, cursor: Cursor) -> None:
        self.conn.hset(keys.imap_cursor(mailbox), folder, cursor.encode())

    def forget_mailbox(self, mailbox: str) -> None:
        self.conn.delete(keys.imap_cursor(mailbox))
