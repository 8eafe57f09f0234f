"""The IMAP listener (Gmail and any other IMAP server): one IDLE connection per watched folder.

For each mailbox whose lease it holds (same leases and fair shares as EWS, among the live IMAP
listeners), the listener runs one ``FolderWatch`` thread per folder of ``imap_folders`` (names,
or special-use flags such as ``\\Junk`` found by LIST). A watch:

- logs in as the rep (``sources.imap.session``), EXAMINEs its folder and reads everything after
  the folder's cursor (``sources.imap.scan``): on every (re)connect, so a restart, a takeover, a
  cut connection or a server restart never loses mail, whatever its length;
- then IDLEs; an EXISTS ends the IDLE, the new UIDs are read and enqueued, and IDLE starts again;
- ends and re-issues IDLE every ``imap_idle_seconds`` (RFC 2177 allows 29 minutes; NATs drop
  quiet connections far sooner) and reads from the cursor then too;
- watches the connection's liveness itself: a BYE, an EOF (imapclient's ``idle_check`` returns
  nothing rather than raising on one) or ``WATCHDOG_SECONDS`` without a byte (Dovecot says
  "Still here" every 2 minutes) ends the IDLE, and DONE must then be answered within the
  command timeout, or the connection is dropped and made anew;
- backs off on its own when the server refuses the rep's login, is unreachable, or the folder is
  missing, and reports it in ``status``; other mailboxes are not disturbed.

Catch-up requests from the base loop (Redis changed under us, a checkpoint) make each watch of
the mailbox read from its cursor at its next tick. While Redis is away nothing is read: the
cursor lives in Redis and the mail stays on the server until it is back.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import imapclient
import redis
from imapclient.exceptions import IMAPClientError

from exchange_listener.core import logs, metrics, redis_conn
from exchange_listener.core.backoff import Backoff
from exchange_listener.core.config import Settings, folder_list
from exchange_listener.listener.base import (
    REDIS_ERRORS,
    BaseListener,
    CatchUps,
    Folders,
    Sink,
)
from exchange_listener.sources.base import SKEW_SECONDS
from exchange_listener.sources.imap import session
from exchange_listener.sources.imap.cursor import CursorStore
from exchange_listener.sources.imap.scan import GmailIds, Selected, examine, scan
from exchange_listener.sources.imap.session import (
    SLOT_TTL,
    Budget,
    GoogleTokens,
    ImapError,
    LimitReached,
    LoginRefused,
)
from exchange_listener.sources.ledger import Ledger

IDLE_TICK = 1.0  # seconds per idle_check, so a stop, a drop or a catch-up request is seen within a second
WATCHDOG_SECONDS = 150.0  # nothing heard this long: prove the connection alive (DONE must be answered)
EOF_SUSPECT = 0.2  # idle_check came back empty this far before its timeout: the socket hit EOF
RETRY_CAP = 300.0  # seconds between attempts at most, for a refused login or a missing folder
REDIS_RETRY = 2.0  # seconds before a read that Redis refused is tried again
WATCH_REDIS_USERS = 1000  # threads that may use the watch threads' Redis client at once
STABLE_SECONDS = 60.0  # a connection up this long resets the retry schedule (a server that drops us
# right after every login must not be hammered once a second)
ANNOUNCED_ROUNDS = 5  # scans in a row while the server keeps announcing mail during them
STACK_SIZE = 512 * 1024  # per watch thread; thousands of them must stay cheap


class FolderMissing(ImapError):
    """The folder to watch does not exist (or no folder has that special-use flag)."""


class FolderWatch(threading.Thread):
    """One folder of one mailbox: connect, read from the cursor, IDLE; again after any failure."""

    def __init__(self, listener: ImapListener, mailbox: str, folder: str):
        super().__init__(name=f"imap-{mailbox}-{folder}", daemon=True)
        self.listener = listener
        self.settings = listener.settings
        self.mailbox = mailbox
        self.wanted = folder  # as configured: a name or a special-use flag
        self.folder: str | None = None  # the name on the server
        self.stopping = threading.Event()
        self.connected = False
        self.error: tuple[float, str] | None = None  # (failing since, what)
        self.last_activity = 0.0
        self._rescan = threading.Event()
        self._watchdog = min(WATCHDOG_SECONDS, self.settings.imap_idle_seconds)
        self._client: imapclient.IMAPClient | None = None
        self._client_lock = threading.Lock()
        self._slot: str | None = None  # our connection's slot in the mailbox's budget
        self._slot_renewed = 0.0
        self._up_since: float | None = None
        self._sweep_failures: dict[str, str] = {}  # folder -> why the last sweep could not read it
        self._sweep_failures_said: dict[str, str] = {}
        self._carried = False  # an announcement was left for IDLE after the last scan
        # the first folder's watch also sweeps the mailbox's other folders
        self.sweeper = folder == listener.folders[0]
        self.log = logs.get_logger(mailbox=mailbox, folder=folder, source="imap")

    # -- control from the listener ----------------------------------------------------------
    def request_scan(self) -> None:
        self._rescan.set()

    def stop(self) -> None:
        self.stopping.set()
        with self._client_lock:
            if self._client is not None:
                session.interrupt(self._client)

    # -- the thread ---------------------------------------------------------------------------
    def run(self) -> None:
        backoff = Backoff(base=1.0, cap=RETRY_CAP)
        while not self.stopping.is_set():
            self._up_since = None
            try:
                self._session()
            except (LoginRefused, FolderMissing) as exc:
                self._failed(str(exc), backoff, level="error")
            except LimitReached as exc:  # busy workers can fill the budget for a while: not an error yet
                self._failed(str(exc), backoff, level="warning")
            except (ImapError, IMAPClientError, OSError) as exc:
                if not self.stopping.is_set():
                    self._failed(session.describe(exc, self.settings), backoff, level="warning", up=self._up_since)
            except REDIS_ERRORS as exc:  # the cursor could not be read: the mail waits on the server
                if not self.stopping.is_set():
                    self._failed(f"Redis: {exc}", backoff, level="warning")
            except Exception as exc:  # noqa: BLE001 - a watch never dies: it reports and tries again
                if not self.stopping.is_set():
                    self.log.error("IMAP folder watch failed unexpectedly", where=_where(exc))
                    self._failed(session.describe(exc, self.settings), backoff, level="error")
            finally:
                self._close()

    def _failed(self, error: str, backoff: Backoff, level: str, up: float | None = None) -> None:
        if up is not None and time.monotonic() - up >= STABLE_SECONDS:
            backoff.reset()  # it worked for a while: a fresh failure starts the schedule again
        wait = backoff.next()
        first = self.error is None or self.error[1] != error
        self.error = (self.error[0] if self.error else time.time(), error)
        if first:
            getattr(self.log, level)("IMAP folder cannot be watched; retrying", error=error, retry_in=round(wait, 1))
        metrics.RECONNECTS.labels("imap_error").inc()
        self.stopping.wait(wait)

    def _close(self) -> None:
        self.connected = False
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            session.close(client)
        slot, self._slot = self._slot, None
        if slot is not None:
            self.listener.budget.give_back(self.mailbox, slot)

    def _keep_slot(self) -> None:
        """Renew our connection slot every third of its life; a lapsed slot someone else took
        ends the connection (the budget is full: we wait for room like any new connection)."""
        if self._slot is None or time.monotonic() - self._slot_renewed < SLOT_TTL / 3:
            return
        self._slot_renewed = time.monotonic()  # also after an error: tried again a third of a slot later
        try:
            kept = self.listener.budget.renew(self.mailbox, self._slot)
        except REDIS_ERRORS:
            return  # Redis away: nothing else can take the slot meanwhile either
        if not kept:
            raise LimitReached(f"{self.mailbox}: our connection slot lapsed and every slot is taken "
                               "(imap_max_connections_per_account)")

    def _session(self) -> None:
        self._slot = self.listener.budget.take(self.mailbox)
        self._slot_renewed = time.monotonic()
        client = session.connect(self.settings, self.mailbox, self.listener.tokens)
        with self._client_lock:
            self._client = client
            if self.stopping.is_set():
                return
        client.normalise_times = False  # INTERNALDATE with its zone, not as local time
        self.folder = session.special_folder(client, self.wanted)
        if self.folder is None:
            raise FolderMissing(f"{self.mailbox}: no folder has the special-use flag {self.wanted}")
        try:
            selected = examine(client, self.folder)
        except IMAPClientError as exc:
            if "NO" in str(exc)[:20] or "doesn't exist" in str(exc).lower() or "nonexistent" in str(exc).lower():
                raise FolderMissing(f"{self.mailbox}: folder {self.folder!r} cannot be opened: "
                                    f"{session.describe(exc, self.settings)}") from None
            raise
        self.connected = True
        # every (re)connect: whatever came while we were away, here and (the sweeper) filed elsewhere
        selected = self._read(client, selected, "catchup", sweep=self.sweeper)
        if self.error is not None:
            self.log.info("IMAP folder watched again", failing_for=round(time.time() - self.error[0], 1))
        self.error = None
        self._up_since = time.monotonic()
        idle = b"IDLE" in client.capabilities()
        while not self.stopping.is_set():
            new = self._idle(client) if idle else self._poll(client)
            if self.stopping.is_set():
                return
            selected = self._read(client, selected, "stream" if new else "catchup", sweep=self.sweeper and not new)

    def _idle(self, client: imapclient.IMAPClient) -> bool:
        """IDLE until new mail, a renewal, a liveness check or a request; True when mail came."""
        client.idle()
        started = heard = time.monotonic()
        new = _announced(client)  # mail announced after the last scan, before IDLE began
        try:
            while not new and not self.stopping.is_set() and not self._rescan.is_set():
                now = time.monotonic()
                if now - started >= self.settings.imap_idle_seconds or now - heard >= self._watchdog:
                    break
                self._keep_slot()
                asked = time.monotonic()
                responses = client.idle_check(timeout=IDLE_TICK)
                if responses:
                    heard = time.monotonic()
                    if _bye(responses):
                        raise ImapError(f"server closed the connection: {_bye(responses)}")
                    if any(_is_new(r) for r in responses):
                        new = True
                        break
                elif time.monotonic() - asked < IDLE_TICK * EOF_SUSPECT:
                    break  # an empty answer before the timeout: EOF; DONE below proves it
        finally:
            if not self.stopping.is_set():
                _text, responses = client.idle_done()  # raises when the connection is dead
                if _bye(responses):
                    raise ImapError(f"server closed the connection: {_bye(responses)}")
                new = new or any(_is_new(r) for r in responses)
        return new

    def _poll(self, client: imapclient.IMAPClient) -> bool:
        """A server without IDLE: NOOP every tick until a renewal is due or mail came."""
        started = time.monotonic()
        while not self.stopping.is_set() and not self._rescan.is_set():
            if time.monotonic() - started >= self.settings.imap_idle_seconds:
                return False
            responses = client.noop()[1]
            if any(_is_new(r) for r in responses):
                return True
            self._keep_slot()
            self.stopping.wait(IDLE_TICK)
        return False

    def _read(self, client: imapclient.IMAPClient, selected: Selected, via: str, sweep: bool = False) -> Selected:
        """Enqueue what is after the cursor (and, with ``sweep``, what was filed in the mailbox's
        other folders); while Redis refuses, try again every few seconds. Returns the folder as
        selected again (a sweep opens others)."""
        sweep = sweep or self._rescan.is_set() and self.sweeper
        self._rescan.clear()
        while not self.stopping.is_set():
            self._keep_slot()
            try:
                self._scan_own(client, selected, via)  # its own folder first: a sweep never delays it
                if sweep:
                    self._sweep(client)
                    selected = examine(client, selected.folder)
                    sweep = False
                    self._scan_own(client, selected, via)  # and again: mail of the sweep's time
            except redis.exceptions.RedisError as exc:
                self.log.warning("Redis unreachable; new mail stays on the IMAP server until it is back",
                                 error=str(exc))
                if self.stopping.wait(REDIS_RETRY):
                    return selected
                # a sweep may have left another folder selected: the own folder again (this also
                # proves the connection alive; a dead one raises and reconnects)
                selected = examine(client, selected.folder)
                continue
            return selected
        return selected

    def _scan_own(self, client: imapclient.IMAPClient, selected: Selected, via: str) -> None:
        """The watch's own folder from its cursor, again while the server announces more mail."""
        found = 0
        for _ in range(ANNOUNCED_ROUNDS):
            _announced(client)  # what this session was told so far is read by the scan below
            count = scan(client, self.mailbox, selected, self.listener.cursors, self.listener.watch_ledger,
                         self.listener.watch_sink.enqueue, since=self.listener.since(self.mailbox), via=via,
                         gmail_ids=self.listener.gmail_ids)
            found += count
            if count:
                self.last_activity = time.time()
                self.log.debug("enqueued new IMAP mail", items=count, via=via)
            if not _announced(client, keep=True):  # mail announced during the scan (not in its answer)
                self._carried = False
                return
        # still announced after the last round: left for the IDLE that follows, which reads it at
        # once (``_idle``) rather than waiting for the next announcement; but only once in a row
        # without new mail (a server may repeat EXISTS with nothing new: no loop without a pause)
        if found or not self._carried:
            self._carried = True
        else:
            _announced(client)
            self._carried = False

    def _sweep(self, client: imapclient.IMAPClient) -> None:
        """The mailbox's other folders, by STATUS against their cursors: a reply a rule, a filter or
        the rep filed away (also while no listener ran) still counts. Own-mail folders (Sent,
        Drafts) are left out; on Gmail, where All Mail holds every label, only All Mail and Trash."""
        names = sweep_folders(client.list_folders(), self.listener.folders)
        for gone in set(self._sweep_failures) - set(names):  # deleted or renamed since
            self._forget_sweep_failure(gone)
        for name in names:
            self._keep_slot()
            try:
                status = client.folder_status(name, [b"UIDVALIDITY", b"UIDNEXT"])
                self._forget_sweep_failure(name)
                validity, uidnext = int(status.get(b"UIDVALIDITY", 0)), int(status.get(b"UIDNEXT", 0) or 0)
                cursor = self.listener.cursors.get(self.mailbox, name)
                if cursor is not None and cursor.uidvalidity == validity and uidnext - 1 <= cursor.last_uid:
                    continue
                count = scan(client, self.mailbox, examine(client, name), self.listener.cursors,
                             self.listener.watch_ledger, self.listener.watch_sink.enqueue,
                             since=self.listener.since(self.mailbox), via="catchup", gmail_ids=self.listener.gmail_ids)
            except IMAPClientError as exc:
                if isinstance(exc, imapclient.IMAPClient.AbortError):
                    raise  # the connection is gone: reconnect
                # one folder we may not read (a shared folder, deleted meanwhile, a broken index)
                # must not keep the rest, and the watch's own folder, from being read
                self._sweep_failures[name] = session.describe(exc, self.settings)
                if self._sweep_failures_said.get(name) != self._sweep_failures[name]:
                    self._sweep_failures_said[name] = self._sweep_failures[name]
                    self.log.warning("a folder cannot be read by the sweep; skipped", folder=name,
                                     error=self._sweep_failures[name])
                continue
            if count:
                self.last_activity = time.time()
                self.log.info("enqueued mail filed in another folder", folder=name, items=count)

    def _forget_sweep_failure(self, name: str) -> None:
        self._sweep_failures.pop(name, None)
        self._sweep_failures_said.pop(name, None)


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame of ``exc`` (a traceback's text could carry values)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb is not None else "?"


def _announced(client: imapclient.IMAPClient, keep: bool = False) -> bool:
    """Take (or with ``keep`` only look at) the EXISTS/RECENT a server sent inside another
    command's answer: imaplib keeps them aside, and the next IDLE would not hear of that mail
    again. True when there were any."""
    pending = client._imap.untagged_responses
    if keep:
        return bool(pending.get("EXISTS")) or bool(pending.get("RECENT"))
    return bool(pending.pop("EXISTS", None)) | bool(pending.pop("RECENT", None))


def sweep_folders(listing: list[tuple[tuple[bytes, ...], Any, str]], watched: list[str]) -> list[str]:
    """The folders a sweep reads: selectable, not an own-mail folder, not one a watch IDLEs on;
    on Gmail (a folder flagged \\All) only All Mail and Trash, since every label is in All Mail."""
    skip_flags = {b"\\Noselect", b"\\NonExistent", b"\\Sent", b"\\Drafts"}
    named = {w.lower() for w in watched if not w.startswith("\\")}
    flagged = {w.encode().lower() for w in watched if w.startswith("\\")}
    gmail = any(b"\\all" in {f.lower() for f in flags} for flags, _d, _n in listing)
    out = []
    for flags, _delimiter, name in listing:
        lowered = {f.lower() for f in flags}
        if lowered & {f.lower() for f in skip_flags} or str(name).lower() in named or lowered & flagged:
            continue
        if gmail and not lowered & {b"\\all", b"\\trash"}:
            continue
        out.append(str(name))
    return out


def _is_new(response: Any) -> bool:
    return isinstance(response, tuple) and len(response) >= 2 and response[1] in (b"EXISTS", b"RECENT")


def _bye(responses: list[Any]) -> str | None:
    for response in responses:
        if isinstance(response, tuple) and response and response[0] == b"BYE":
            return " ".join(str(p) for p in response[1:])[:200] or "BYE"
    return None


class ImapListener(BaseListener):
    source = "imap"

    def __init__(self, settings: Settings):
        settings.require("redis_url", "imap_host")
        super().__init__(settings)
        # the watch threads (one per folder: thousands) share a client of their own, whose pool
        # lets them wait their turn; the main loop's leases and heartbeat never queue behind them
        self.watch_conn = redis_conn.connect(settings.redis_url, socket_timeout=5.0, shared_by=WATCH_REDIS_USERS)
        self.watch_ledger = Ledger(self.watch_conn, processed_days=settings.processed_days)
        self.watch_sink = Sink(self.watch_conn, settings, source=self.source)
        self.cursors = CursorStore(self.watch_conn)
        self.gmail_ids = GmailIds()  # one message under several Gmail labels: one job
        self.tokens = GoogleTokens(settings) if settings.imap_auth == "xoauth2-google" else None
        self.budget = Budget(settings.imap_max_connections_per_account, self.watch_conn)
        self.folders = folder_list(settings.imap_folders)
        self._watches: dict[str, list[FolderWatch]] = {}
        self._lock = threading.Lock()
        self.catchups: CatchUps[None] = CatchUps(self.holds, self._catch_up, lambda _i: None, settings, threads=1)
        threading.stack_size(STACK_SIZE)

    def since(self, mailbox: str) -> float:
        """Mail received before this is not new in ``mailbox`` (before it was added, or older than
        the ledger remembers), less the clock skew allowance."""
        return max(self.watched.get(mailbox, 0.0), self.ledger.horizon()) - SKEW_SECONDS

    # -- BaseListener --------------------------------------------------------------------------
    def held(self) -> list[str]:
        with self._lock:
            return list(self._watches)

    def holds(self, mailbox: str) -> bool:
        return mailbox in self._watches

    def _banner(self) -> dict[str, Any]:
        return {"imap_host": f"{self.settings.imap_host}:{self.settings.imap_port}",
                "security": self.settings.imap_security, "auth": self.settings.imap_auth, "folders": self.folders}

    def _take(self, mailboxes: list[str]) -> None:
        for mailbox in mailboxes:
            watches = [FolderWatch(self, mailbox, folder) for folder in self.folders]
            with self._lock:
                if mailbox in self._watches:
                    continue
                self._watches[mailbox] = watches
            for watch in watches:
                watch.start()

    def _drop(self, mailboxes: list[str]) -> None:
        for mailbox in mailboxes:
            with self._lock:
                watches = self._watches.pop(mailbox, [])
            for watch in watches:
                watch.stop()

    def _catch_up(self, _state: None, mailbox: str, reason: str, folders: Folders) -> None:
        with self._lock:
            watches = list(self._watches.get(mailbox, ()))
        for watch in watches:
            watch.request_scan()

    def _source_info(self) -> dict[str, Any]:
        with self._lock:
            watches = [w for ws in self._watches.values() for w in ws]
        failing = [(w, w.error) for w in watches if w.error is not None]
        unreadable = [{"mailbox": w.mailbox, "folder": f, "error": e} for w in watches
                      for f, e in list(w._sweep_failures.items())]
        return {
            "groups": [],
            "imap": {
                "folders": len(watches),
                "connected": sum(1 for w in watches if w.connected),
                "last_activity_at": max((w.last_activity for w in watches), default=0.0) or None,
                "failing": [{"mailbox": w.mailbox, "folder": w.wanted, "since": e[0], "error": e[1]}
                            for w, e in failing[:20] if e is not None],
                "failing_count": len(failing),
                "sweep_unreadable": unreadable[:20],  # folders the sweep cannot read (skipped)
                "sweep_unreadable_count": len(unreadable),
            },
        }

    def _stop_source(self, deadline: float) -> dict[str, Any]:
        with self._lock:
            watches = [w for ws in self._watches.values() for w in ws]
        for watch in watches:
            watch.stop()
        for watch in watches:
            watch.join(timeout=max(0.0, deadline - time.monotonic() - 1.0))
        return {"folders": len(watches), "still_running": sum(1 for w in watches if w.is_alive())}
