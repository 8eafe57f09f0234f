"""Delta query on a mail folder: rounds of pages, opaque sync-state tokens, 410 SyncStateNotFound.

A round is fixed when it starts: the first round lists the folder's messages, a later one the
folder's change log since the previous round began (messages that came in, by move or delivery,
as full items; those that left as ``@removed``, reason ``deleted`` for a hard delete and
``changed`` for a move out). Pages render messages as they are when the page is read, skipping
any that left meanwhile (their removal comes in the next round). Tokens are kept server side;
like Exchange's sync states, only the newest few generations of one chain of links live, so an
old nextLink or deltaLink may answer 410 even without a fault.
"""
from __future__ import annotations

import bisect
import dataclasses
import secrets
from typing import Any

from emulators.graph.errors import GraphError
from emulators.graph.store import Folder, Mailbox, Store

DEFAULT_PAGE = 10
MAX_PAGE = 1000
CHANGE_TYPES = frozenset({"created", "updated", "deleted"})


@dataclasses.dataclass
class Round:
    mailbox: Mailbox
    folder: Folder
    select: tuple[str, ...] | None
    change_types: frozenset[str]
    immutable: bool  # ids the round was grouped by
    entries: list[tuple[str, Any, str]]  # ("item", message key, "") or ("removed", id, reason)
    end: int  # the store's sequence number when the round began: the next round starts after it


@dataclasses.dataclass
class State:
    round: Round | None  # None: a deltaLink, whose round starts when it is followed
    offset: int
    position: int  # for a deltaLink: changes after this sequence number
    mailbox: Mailbox
    folder: Folder
    select: tuple[str, ...] | None
    change_types: frozenset[str]
    chain: int
    generation: int


def syncstate_gone(generation: int | None = None, highest: int | None = None) -> GraphError:
    detail = "" if generation is None else f"; generation={generation};[highest={highest}]"
    return GraphError(410, "SyncStateNotFound", f"The sync state generation is not found{detail}.")


class DeltaTokens:
    def __init__(self, store: Store, generations_kept: int = 4):
        self.store = store
        self.generations_kept = max(1, generations_kept)
        self.clear()

    def clear(self) -> None:
        self.states: dict[str, State] = {}
        self.chains: dict[int, list[str]] = {}
        self.evicted: dict[str, tuple[int, int]] = {}  # token -> (generation, highest) for the error text
        self._chain = 0
        self.issued = 0

    def expire_all(self) -> int:
        """Every token issued so far answers 410 from now on."""
        count = len(self.states)
        self.states.clear()
        self.chains.clear()
        self.evicted.clear()
        return count

    def _issue(self, state: State) -> str:
        token = secrets.token_urlsafe(48)
        self.states[token] = state
        self.issued += 1
        chain = self.chains.setdefault(state.chain, [])
        chain.append(token)
        while len(chain) > self.generations_kept:
            old = chain.pop(0)
            gone = self.states.pop(old, None)
            if gone is not None:
                self.evicted[old] = (gone.generation, state.generation)
        return token

    def lookup(self, token: str) -> State:
        state = self.states.get(token)
        if state is None:
            raise syncstate_gone(*self.evicted.get(token, (None, None)))
        return state

    def start(self, mailbox: Mailbox, folder: Folder, select, change_types: frozenset[str]) -> State:
        """The state of a first call (no token yet): a round listing the whole folder."""
        self._chain += 1
        return State(None, 0, -1, mailbox, folder, select, change_types, self._chain, 0)

    def page(self, state: State, immutable: bool, size: int, links_base: str) -> dict[str, Any]:
        """One page of ``state``'s round (starting the round if the state is a deltaLink's)."""
        current = state.round or self._begin(state, immutable)
        chunk = current.entries[state.offset:state.offset + size]
        value = []
        for kind, ref, reason in chunk:
            if kind == "removed":
                value.append({"@odata.type": "#microsoft.graph.message", "id": ref, "@removed": {"reason": reason}})
                continue
            message = current.folder.messages.get(ref)
            if message is None:
                continue  # left after the round began: its removal is in the next round
            value.append({"@odata.type": "#microsoft.graph.message",
                          **message.to_json(current.select, immutable)})
        link = (f"{links_base}/users/{current.mailbox.object_id}/mailFolders('{current.folder.id}')"
                f"/messages/delta")
        body: dict[str, Any] = {"@odata.context": f"{links_base}/$metadata#Collection(message)", "value": value}
        generation = state.generation + 1
        if state.offset + size < len(current.entries):
            token = self._issue(State(current, state.offset + size, current.end, current.mailbox, current.folder,
                                      current.select, current.change_types, state.chain, generation))
            body["@odata.nextLink"] = f"{link}?$skiptoken={token}"
        else:
            token = self._issue(State(None, 0, current.end, current.mailbox, current.folder, current.select,
                                      current.change_types, state.chain, generation))
            body["@odata.deltaLink"] = f"{link}?$deltatoken={token}"
        return body

    def _begin(self, state: State, immutable: bool) -> Round:
        folder, types = state.folder, state.change_types
        entries: list[tuple[str, Any, str]] = []
        if state.position < 0:
            if "created" in types or "updated" in types:
                entries = [("item", key, "") for key in folder.messages]
        else:
            start = bisect.bisect_right([c.seq for c in folder.log], state.position)
            last: dict[Any, Any] = {}
            for change in folder.log[start:]:
                group = change.key if immutable else (change.key, change.regular_id)
                last.pop(group, None)
                last[group] = change  # ordered by each group's latest change
            for change in last.values():
                message = folder.messages.get(change.key)
                present = message is not None and (immutable or message.regular_id == change.regular_id)
                if present:
                    if "created" in types or "updated" in types:
                        entries.append(("item", change.key, ""))
                elif "deleted" in types:
                    entries.append(("removed", change.immutable_id if immutable else change.regular_id,
                                    "deleted" if change.event == "deleted" else "changed"))
        return Round(state.mailbox, folder, state.select, types, immutable, entries, self.store.seq)
