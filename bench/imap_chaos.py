"""The chaos drill against IMAP (``bench/chaos.py --source imap``; ``make chaos SOURCE=imap``).

The same drill as the EWS one (``bench/chaos.py``: its plan, mail builders, probes, ground truth
and check), with a real Dovecot (``emulators.dovecot``) as the mail server, the drill's mailboxes
as its users, and two ``exchange-listener listen`` processes with ``source = imap`` (an IDLE
connection per watched folder: INBOX and the ``\\Junk`` folder) logging in as Dovecot's master
user. Mail is delivered with IMAP APPEND, also while a fault is on (whenever the server is up).

Faults: Dovecot killed -9 and started again on the same port (``kill_dovecot``), stopped cleanly
(its clients get BYE) and started again (``stop_dovecot``), some mailboxes' connections cut
mid-IDLE (``kick``: ``doveadm kick``), a mailbox's INBOX recreated with its mail re-appended
(``uidvalidity``: new UIDVALIDITY, every UID starts over; the re-appended replies are the same
mail, so the ground truth expects no new action for them), a listener killed -9 (the other takes
its mailboxes over when the lease runs out), a worker killed -9 mid-job (Dovecot frozen with
SIGSTOP meanwhile, so a worker is caught waiting on it) and Redis restarted.

The mailbox-behaviour phase keeps what IMAP can tell: queued replies are moved (to an existing
nested folder, a new one, Trash, Junk, twice) or expunged before the workers run (batch A with the
listeners running, batch B with both down); an expunged reply exists nowhere, so its enrollment
stays active. Batch C arrives while both listeners are down, a third each in INBOX, filed into
Junk (a spam rule) and filed by a rule into a folder no watch IDLEs on: the listeners read the first
two from their cursors when they start, and find the third by sweeping the mailbox's other folders.

A mailbox is "caught up" when every listener's watches are connected and the cursor of its INBOX
and Junk (``el:imap:cursor:<mailbox>``) is at the last UID the drill appended there, on the
folder's current UIDVALIDITY.

The report (last line, JSON) has the EWS drill's fields, plus ``imap``: Dovecot restarts, kicked
connections, UIDVALIDITY changes and the messages they re-appended, seconds Dovecot was frozen,
deliveries retried after a fault, what the settle wait waited on last, and the listeners' last
watch status; ``mailbox_phase.replayed_items`` details any batch-A reply queued again after the
restart (its jobs, the ledger, the folder's cursor). IMAP item ids (``UIDVALIDITY/UID/folder``)
are unique within a mailbox only, so the phase's checks go by mailbox and item id. Progress
lines go to stderr.

    python bench/imap_chaos.py --size small     # the same as chaos.py --source imap
"""
from __future__ import annotations

import collections
import contextlib
import functools
import imaplib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

from chaos import (
    PAUSE_DAYS,
    PROCESS_FAULTS,
    Drill,
    Enrollment,
    Stack,
    _message_id,
    human_reply,
    record_sends,
    retrying,
    unrelated,
)
from chaos import main as chaos_main
from graph_chaos import GraphDrill
from rq.job import Job
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from emulators.dovecot import Dovecot
from exchange_listener.core import keys
from exchange_listener.listener import mailboxes as mailbox_registry
from exchange_listener.sources.imap.cursor import CursorStore
from exchange_listener.sources.imap.scan import item_id
from exchange_listener.sources.ledger import Ledger, identity
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

IMAP_FAULTS = ("kill_dovecot", "stop_dovecot", "kick", "uidvalidity")
WATCHED = ("INBOX", "Junk")  # imap_folders INBOX,\Junk: Junk is the folder with the \Junk flag
NESTED_FOLDER = "Clients/Key Accounts"  # made before the listeners start
# what the rep does to a queued reply while no worker runs; expunged: gone, its enrollment stays active
C_FOLDERS = {"inbox_while_down": "INBOX", "junk_while_down": "Junk", "rule_filed_while_down": "Customers/Filed by rule"}
C_FATES = tuple(C_FOLDERS)
IMAP_FATES = ("moved_nested", "moved_new", "deleted", "moved_junk", "moved_twice", "purged", "kept")
FATE_FOLDER = {"moved_nested": NESTED_FOLDER, "deleted": "Trash", "moved_junk": "Junk"}
IMAP_ERRORS = (OSError, imaplib.IMAP4.error, RuntimeError)


class ImapDeliverer:
    """APPENDs to Dovecot for the drill: waits while the drill has the server down (``up``), holds
    a mailbox off while its INBOX is recreated (its lock), retries a delivery a fault cut short,
    and remembers the last UID appended per folder (what "caught up" is measured against)."""

    def __init__(self, dovecot: Dovecot):
        self.dovecot = dovecot
        self.up = threading.Event()
        self.up.set()
        self.locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self.guard = threading.Lock()
        self.validity: dict[tuple[str, str], int] = {}
        self.last_uid: dict[tuple[str, str], int] = {}
        self.retried = 0

    def lock(self, mailbox: str) -> threading.Lock:
        with self.guard:
            return self.locks[mailbox]

    @contextlib.contextmanager
    def session(self, mailbox: str) -> Iterator[imaplib.IMAP4]:
        """A connection as ``mailbox`` through the master user (as the listeners log in)."""
        conn = imaplib.IMAP4(self.dovecot.host, self.dovecot.port, timeout=10)
        try:
            conn.login(f"{mailbox}*{self.dovecot.master_user}", self.dovecot.master_password)
            yield conn
        finally:
            with contextlib.suppress(*IMAP_ERRORS):
                conn.logout()

    def status(self, mailbox: str, folder: str) -> tuple[int, int]:
        """(UIDVALIDITY, UIDNEXT) of a folder."""
        with self.session(mailbox) as conn:
            typ, data = conn.status(f'"{folder}"', "(UIDVALIDITY UIDNEXT)")
        raw = data[0] if typ == "OK" and data and isinstance(data[0], bytes) else b""
        validity, uidnext = re.search(rb"UIDVALIDITY (\d+)", raw), re.search(rb"UIDNEXT (\d+)", raw)
        if not validity or not uidnext:
            raise RuntimeError(f"STATUS {folder} of {mailbox}: {typ} {data!r}")
        return int(validity.group(1)), int(uidnext.group(1))

    def uidvalidity(self, mailbox: str, folder: str) -> int:
        key = (mailbox, folder)
        if key not in self.validity:
            self.validity[key] = self.status(mailbox, folder)[0]
        return self.validity[key]

    def noted(self, mailbox: str, folder: str, uid: int) -> str:
        """Record ``uid`` as appended to ``folder``; its item id as the listeners write it."""
        validity = self.uidvalidity(mailbox, folder)
        key = (mailbox, folder)
        with self.guard:
            self.last_uid[key] = max(self.last_uid.get(key, 0), uid)
        return item_id(folder, validity, uid)

    def call(self, mailbox: str, action: Callable[[], Any], timeout: float = 90.0) -> Any:
        """``action`` once the server is up and the mailbox is not being recreated; again after
        an error a fault caused (a retried APPEND may deliver a second copy of the same mail: a
        duplicate, which the system must act on once)."""
        deadline = time.monotonic() + timeout
        while True:
            self.up.wait(timeout)
            try:
                with self.lock(mailbox):
                    return action()
            except IMAP_ERRORS:
                if time.monotonic() > deadline:
                    raise
                with self.guard:
                    self.retried += 1
                time.sleep(0.3)

    def deliver(self, mailbox: str, raw: bytes, folder: str = "INBOX") -> str:
        """Deliver ``raw``; returns its item id (``UIDVALIDITY/UID/folder``)."""
        return self.call(mailbox, lambda: self.noted(mailbox, folder, self.dovecot.append(mailbox, raw, folder)))

    def move(self, mailbox: str, the_id: str, dst: str) -> str:
        _validity, uid, src = the_id.split("/", 2)
        new_uid = self.call(mailbox, lambda: self.dovecot.move(mailbox, int(uid), src, dst))
        return self.noted(mailbox, dst, new_uid)

    def expunge(self, mailbox: str, the_id: str) -> None:
        _validity, uid, folder = the_id.split("/", 2)
        self.call(mailbox, lambda: self.dovecot.expunge(mailbox, int(uid), folder))

    def recreate_inbox(self, mailbox: str) -> tuple[int, int]:
        """INBOX recreated, its mail re-appended (new UIDVALIDITY); deliveries to the mailbox wait
        meanwhile, or a mail appended mid-copy would vanish. Returns (old, new) UIDVALIDITY."""
        self.up.wait(60)
        with self.lock(mailbox):
            before = self.status(mailbox, "INBOX")[0]
            self.dovecot.recreate_folder(mailbox, "INBOX")
            after, uidnext = self.status(mailbox, "INBOX")
            with self.guard:
                self.validity[(mailbox, "INBOX")] = after
                self.last_uid[(mailbox, "INBOX")] = uidnext - 1
        return before, after


class ImapStack(Stack):
    """``chaos.Stack`` with a real Dovecot (the drill's mailboxes its users) as the "emulator" and
    listeners and workers with ``source = imap`` logging in as its master user."""

    def __init__(self, mailboxes: list[str], **kwargs: Any):
        super().__init__(mailboxes, **kwargs)
        self.deliverer = ImapDeliverer(self.emulator)

    def _make_emulator(self) -> Dovecot:
        return Dovecot(root=os.path.join(self.log_dir, "dovecot"))

    @property
    def dovecot(self) -> Dovecot:
        return self.emulator

    def env(self) -> dict[str, str]:
        dovecot = self.dovecot
        settings = {"heartbeat_seconds": self.heartbeat_seconds, "log_level": os.environ.get("CHAOS_LOG_LEVEL", "warning"),
                    "pause_days": PAUSE_DAYS, "redis_url": self.redis_url, "log_format": "json",
                    "source": "imap", "imap_host": dovecot.host, "imap_port": dovecot.port, "imap_security": "none",
                    "imap_auth": "master", "imap_username": dovecot.master_user,
                    "imap_password": dovecot.master_password, **self.extra}
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
        env.update({f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in settings.items()})
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, "bench"), env.get("PYTHONPATH")) if p)
        return env

    def start_services(self) -> ImapStack:
        super().start_services()  # Redis, then Dovecot
        self.dovecot.add_users(self.mailboxes)
        return self

    def add_mailboxes(self, mailboxes: list[str] | None = None) -> None:
        assert self.redis is not None
        mailbox_registry.add(self.redis, mailboxes or self.mailboxes, source="imap")

    def listener_ids(self) -> list[str]:
        import socket

        return [f"{socket.gethostname()}-{p.pid}" for p in self.listeners if p.alive()]

    def watch_status(self) -> list[dict]:
        """Each live listener's ``imap`` status (folders, connected, failing_count)."""
        assert self.redis is not None
        out = []
        for listener_id in self.listener_ids():
            raw = self.redis.hget(keys.listener(listener_id), "imap")
            out.append(json.loads(raw) if raw else {})
        return out

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            shutil.rmtree(self.dovecot.run_dir, ignore_errors=True)


class ImapDrill(Drill):
    """``chaos.Drill`` against a real Dovecot: its faults are the server's (crash, clean stop, cut
    connections, a new UIDVALIDITY) and the process faults; deliveries are IMAP APPENDs."""

    source = "imap"
    base_fault_kinds = IMAP_FAULTS + PROCESS_FAULTS  # type: ignore[assignment]  # other kinds than EWS's
    # GraphDrill's: kept down until the other listener took its mailboxes over (nothing Graph in them)
    lease_holders = GraphDrill.lease_holders
    kill_listener = GraphDrill.kill_listener

    def __init__(self, size: str, seed: int, log_dir: str, plumbing: str = "ours", sentinel: bool | None = None,
                 phase: bool = True):
        if plumbing != "ours":
            raise ValueError("the baseline knows EWS only")
        # one redis-server with AOF unless asked for the Sentinel group
        super().__init__(size, seed, log_dir, plumbing, sentinel=bool(sentinel), phase=phase)
        self.imap_info: dict[str, Any] = {"dovecot_kills": 0, "dovecot_stops": 0, "kicked_connections": 0,
                                          "uidvalidity_changes": [], "frozen_s": 0.0}

    @property
    def imap_stack(self) -> ImapStack:
        return self.stack  # type: ignore[return-value]

    @property
    def deliverer(self) -> ImapDeliverer:
        return self.imap_stack.deliverer

    def make_stack(self, log_dir: str, commands: dict) -> Stack:
        return ImapStack(self.mailboxes, listeners=2, workers=2, log_dir=log_dir, sentinel=self.sentinel, settings={
            "queue_name": "drill", "lease_seconds": self.cfg["lease"], "worker_ttl": 10, "job_timeout": 30,
            "job_retries": 8, "checkpoint_seconds": 2,
            # a dead or frozen server is noticed within seconds, and every IDLE is renewed mid-drill
            "imap_timeout_seconds": 5, "imap_idle_seconds": 20,
        })

    # -- setup -------------------------------------------------------------------------------
    def phase_enrollments(self) -> dict[str, list[Enrollment]]:
        """Batches A and B (moved or expunged while queued: ``IMAP_FATES``) and C (arrives while
        both listeners are down: in INBOX, filed into Junk, or filed into a folder nobody IDLEs on)."""
        count = int(self.cfg["phase"])
        batches, n = {}, 0
        for name, size in (("A", count), ("B", count), ("C", max(2, count // 2))):
            batch = []
            for i in range(size):
                fate = C_FATES[i % len(C_FATES)] if name == "C" else IMAP_FATES[i % len(IMAP_FATES)]
                batch.append(Enrollment(id=f"mbx-{name}-{i:04d}", mailbox=self.mailboxes[n % len(self.mailboxes)],
                                        prospect=f"m{n}@mbx{n}.example", colleague=f"c{n}@mbx{n}.example",
                                        cc=f"cc{n}@mbxcc.example", send_ids=[_message_id("sales.example")],
                                        scenario="reply_prospect", fate=fate))
                n += 1
            batches[name] = batch
        return batches

    def setup(self) -> None:
        stack = self.imap_stack
        stack.start_services()
        assert stack.redis is not None
        registry = SendRegistry(stack.redis)
        record_sends(registry, self.enrollments)
        self.probe_pool = self.probe_enrollments(len(self.fault_kinds) * int(self.cfg["rounds"]) * min(6, len(self.mailboxes)))
        record_sends(registry, self.probe_pool)
        if self.phase_on:
            self.batches = self.phase_enrollments()
            for batch in self.batches.values():
                record_sends(registry, batch)
            for mailbox in sorted({e.mailbox for e in self.batches["A"] + self.batches["B"]}):
                stack.dovecot.create_folder(mailbox, NESTED_FOLDER)  # a folder the rep already had
        stack.add_mailboxes()
        stack.start_processes()

    def wait_ready(self, timeout: float = 60.0) -> float:
        """One reply per mailbox, all stopped: every mailbox watched and the workers warm. A reply
        not acted on within 5 s is sent again (as a new mail)."""
        stack = self.imap_stack
        assert stack.redis is not None
        warm = self.probe_enrollments(len(self.mailboxes))
        record_sends(SendRegistry(stack.redis), warm)
        store = EnrollmentStore(stack.redis)
        t0, last_sent = time.monotonic(), 0.0
        pending = {e.id: e for e in warm}
        while pending and time.monotonic() - t0 < timeout:
            if time.monotonic() - last_sent > 5.0:
                for e in pending.values():
                    e.delivered.append("reply")
                    self.deliverer.deliver(e.mailbox, human_reply(e.mailbox, e.prospect, e.send_ids[0]))
                last_sent = time.monotonic()
            time.sleep(0.3)
            states = retrying(lambda: store.get_many(list(pending)))
            for eid, state in zip(list(pending), states):
                if state and state["status"] == "stopped":
                    pending.pop(eid)
        if pending:
            raise RuntimeError(f"stack not ready after {timeout:.0f}s: {len(pending)} warm-up replies not processed "
                               f"(logs in {stack.log_dir})")
        return time.monotonic() - t0

    # -- deliveries ----------------------------------------------------------------------------
    def deliver_one(self, mailbox: str, raw: bytes) -> str:
        return self.deliverer.deliver(mailbox, raw)

    def send_probes(self, fault: dict, mailboxes: list[str] | None = None) -> None:
        """Replies delivered right when a fault hits (to ``mailboxes`` first: those it hit)."""
        count = min(6, len(self.mailboxes))
        chosen = [self.probe_pool.pop() for _ in range(count)] if len(self.probe_pool) >= count else []
        targets = list(mailboxes or [])[:count]
        targets += self.rng.sample([m for m in self.mailboxes if m not in targets], len(chosen) - len(targets))
        for e, mailbox in zip(chosen, targets):
            e.mailbox = mailbox  # the send was recorded for another mailbox; the reply may land anywhere
            e.delivered.append("reply")
            self.deliverer.deliver(mailbox, human_reply(mailbox, e.prospect, e.send_ids[0]))
        fault["probes"] = [e.id for e in chosen]

    # -- faults --------------------------------------------------------------------------------
    def say(self, what: str) -> None:
        """A progress line on stderr (the report stays the last line of stdout)."""
        print(f"[imap chaos {time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)

    def inject(self, kind: str) -> dict:
        t0 = time.monotonic()
        self.say(f"fault {kind}")
        try:
            return self._inject(kind)
        finally:
            self.say(f"fault {kind} injected in {time.monotonic() - t0:.1f}s")

    def _inject(self, kind: str) -> dict:
        if kind == "kill_listener":
            return self.kill_listener()  # type: ignore[misc]  # GraphDrill's, typed for it
        if kind not in IMAP_FAULTS:
            return super().inject(kind)  # kill_worker (kill_busy_worker below), restart_redis
        fault: dict[str, Any] = {"kind": kind, "at": time.time(), "probes": [], "job_id": None}
        dovecot, deliverer = self.imap_stack.dovecot, self.deliverer
        hit: list[str] = []
        if kind in ("kill_dovecot", "stop_dovecot"):
            pause = self.rng.uniform(1, 3)
            deliverer.up.clear()
            try:
                if kind == "kill_dovecot":
                    dovecot.kill()  # a crash: connections die without a word
                    self.imap_info["dovecot_kills"] += 1
                else:
                    dovecot.stop()  # maintenance: every client gets BYE
                    self.imap_info["dovecot_stops"] += 1
                time.sleep(pause)
                dovecot.start()  # the same port and mail
            finally:
                deliverer.up.set()
            fault["down_s"] = round(time.time() - fault["at"], 2)
        elif kind == "kick":
            hit = self.rng.sample(self.mailboxes, max(1, len(self.mailboxes) // 3))
            cut = 0
            for mailbox in hit:
                cut += deliverer.call(mailbox, functools.partial(dovecot.kick, mailbox))
            self.imap_info["kicked_connections"] += cut
            fault["note"] = f"{cut} connections of {len(hit)} mailboxes cut"
        elif kind == "uidvalidity":
            mailbox = self.rng.choice(self.mailboxes)
            hit = [mailbox]
            before, after = deliverer.recreate_inbox(mailbox)
            fault["at"] = time.time()
            self.imap_info["uidvalidity_changes"].append({"mailbox": mailbox, "before": before, "after": after,
                                                          "messages": deliverer.last_uid[(mailbox, "INBOX")]})
        self.send_probes(fault, hit)
        return fault

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Dovecot stopped in its tracks (SIGSTOP to its process group): connections stay open
        and every command waits. Deliveries wait too; SIGCONT at the end."""
        dovecot = self.imap_stack.dovecot
        assert dovecot.proc is not None
        self.deliverer.up.clear()
        t0 = time.monotonic()
        os.killpg(dovecot.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(dovecot.proc.pid, signal.SIGCONT)
            self.deliverer.up.set()
            self.imap_info["frozen_s"] = round(self.imap_info["frozen_s"] + time.monotonic() - t0, 2)

    def kill_busy_worker(self) -> dict:
        """Work queued (unrelated mail to a few mailboxes), Dovecot frozen so the next job waits on
        it, then kill -9 of a worker caught mid-job, Dovecot thawed and the worker restarted."""
        stack = self.imap_stack
        found = None
        for _attempt in range(3):
            for mailbox in self.rng.sample(self.mailboxes, min(8, len(self.mailboxes))):
                self.deliverer.deliver(mailbox, unrelated(mailbox, self.rng))
            deadline = time.monotonic() + 5  # until the listeners queued some of it
            while time.monotonic() < deadline and not retrying(
                    lambda: sum(stack.backlog()[k] for k in ("queued", "started"))):
                time.sleep(0.01)
            with self.frozen():
                deadline = time.monotonic() + 3
                while found is None and time.monotonic() < deadline:
                    found = retrying(lambda: stack.busy_worker(stack.workers))
                    if found is None:
                        time.sleep(0.05)
                if found is not None:
                    victim, job_id = found
                    self.supervisor.hold(victim)
                    victim.kill()
                    break
        if found is None:
            return {"victim": None, "skipped": True, "note": "no worker was busy while Dovecot was frozen"}
        threading.Timer(self.rng.uniform(1, 3), self.supervisor.release, args=(victim,)).start()
        return {"victim": victim.name, "job_id": job_id}

    def slow_down(self, on: bool) -> None:
        """Not used (``kill_busy_worker`` freezes Dovecot instead)."""

    # -- mailbox behaviour ---------------------------------------------------------------------
    def caught_up(self) -> list[str]:
        """What is not caught up (empty when all is): every listener's watches connected, and the
        INBOX and Junk cursors of each mailbox at the last UID appended there, on the folder's
        current UIDVALIDITY. Each entry says why (for the report when it never happens)."""
        stack = self.imap_stack
        status = retrying(stack.watch_status)
        folders = sum(s.get("folders", 0) for s in status)
        if folders != len(WATCHED) * len(self.mailboxes) or any(
                s.get("connected") != s.get("folders") or s.get("failing_count") for s in status):
            return [f"watches: {[{k: s.get(k) for k in ('folders', 'connected', 'failing_count')} for s in status]}"]
        assert stack.redis is not None
        cursors = CursorStore(stack.redis)
        behind = []
        for mailbox in self.mailboxes:
            have = retrying(lambda m=mailbox: cursors.all(m))
            for folder in WATCHED:
                want = self.deliverer.last_uid.get((mailbox, folder))
                if want is None:
                    continue
                cursor, validity = have.get(folder), self.deliverer.validity.get((mailbox, folder))
                if cursor is None or cursor.uidvalidity != validity or cursor.last_uid < want:
                    behind.append(f"{mailbox} {folder}: cursor {cursor.encode() if cursor else None}, "
                                  f"appended up to {validity}:{want}")
        return behind

    def wait_caught_up(self, since: float, timeout: float = 120.0) -> float | None:
        """Seconds until every mailbox is caught up (``caught_up``), or None (and an error)."""
        t0 = time.monotonic()
        self.say("waiting for every mailbox to be caught up")
        time.sleep(max(0.0, since + 1.5 - time.time()))  # a heartbeat after ``since``: fresh status
        while time.monotonic() - t0 < timeout:
            behind = self.caught_up()
            if not behind:
                self.say(f"caught up in {time.monotonic() - t0:.1f}s")
                return round(time.monotonic() - t0, 1)
            time.sleep(0.5)
        self.errors.append(f"mailbox phase: not every mailbox caught up within {timeout:.0f}s: {behind[:5]}")
        return None

    def caught_up_at(self, mailbox: str) -> float | None:
        behind = self.caught_up()
        return None if any(b.startswith(("watches:", f"{mailbox} ")) for b in behind) else time.time()

    def deliver_batch(self, batch: list[Enrollment], deliverer: Any = None,
                      folder: Callable[[Enrollment, int], str] = lambda e, i: "INBOX") -> dict:
        """One reply per enrollment; returns enrollment id -> item id."""
        items = {}
        for i, e in enumerate(batch):
            e.delivered.append("reply")
            items[e.id] = self.deliverer.deliver(e.mailbox, human_reply(e.mailbox, e.prospect, e.send_ids[0]),
                                                 folder(e, i))
            with self.lock:
                self.delivered += 1
        return items

    def apply_fates(self, batch: list[Enrollment], items: dict) -> dict[str, str | None]:
        """What the rep does to each queued reply while no worker runs (``IMAP_FATES``). Returns
        enrollment id -> the reply's item id now (None when expunged)."""
        now: dict[str, str | None] = {}
        for e in batch:
            item: str | None = items[e.id]
            assert item is not None
            if e.fate in FATE_FOLDER:
                item = self.deliverer.move(e.mailbox, item, FATE_FOLDER[e.fate])
            elif e.fate == "moved_new":  # a folder made by this very move, two levels deep
                item = self.deliverer.move(e.mailbox, item, f"Projects/{e.id}/Replies")
            elif e.fate == "moved_twice":
                item = self.deliverer.move(e.mailbox, self.deliverer.move(e.mailbox, item, "Later"), "Trash")
            elif e.fate == "purged":  # \Deleted and UID EXPUNGE: gone, no worker can ever read it
                self.deliverer.expunge(e.mailbox, item)
                item = None
            now[e.id] = item
        return now

    @staticmethod
    def keyed(batch: list[Enrollment], items: dict) -> dict[str, str]:
        """enrollment id -> "mailbox item-id": IMAP item ids are unique within a mailbox only (two
        folders may share a UIDVALIDITY and a UID), so the phase's checks go by both."""
        return {e.id: f"{e.mailbox} {items[e.id]}" for e in batch if items.get(e.id)}

    def queued_items(self) -> set[str]:
        """"mailbox item-id" of the mail carried by the jobs waiting in the queue."""
        jobs = retrying(lambda: self.stack.queue().jobs)
        return {f"{job.args[0].get('mailbox')} {m['item_id']}" for job in jobs for m in (job.args[0].get("mails") or [])}

    def pending_items(self) -> set[str]:
        """"mailbox item-id" of the mail carried by jobs not yet done: queued, running, or waiting
        for a retry."""
        queue = self.stack.queue()

        def read() -> set[str]:
            ids = (queue.get_job_ids() + StartedJobRegistry(queue=queue).get_job_ids()
                   + ScheduledJobRegistry(queue=queue).get_job_ids())
            assert self.stack.redis is not None
            jobs = Job.fetch_many(ids, connection=self.stack.redis, serializer=JSONSerializer)
            return {f"{job.args[0].get('mailbox')} {m['item_id']}" for job in jobs if job is not None
                    for m in (job.args[0].get("mails") or [])}

        return retrying(read)

    def mailbox_phase(self) -> dict:
        """Two deploy drains (``chaos.Drill.mailbox_phase``), with IMAP's fates: in the first the
        reps move or expunge queued replies (batch A) while the listeners run, and the workers
        must stop every one that still exists; in the second batch B is queued, both listeners
        go down (one SIGTERM, one kill -9), batch B is moved or expunged and batch C arrives in
        INBOX or Junk; the listeners come back and read batch C from their cursors."""
        self.say("mailbox-behaviour phase")
        stack, info = self.imap_stack, dict[str, Any]()
        listeners, workers = list(stack.listeners), list(stack.workers)
        batch_a, batch_b, batch_c = self.batches["A"], self.batches["B"], self.batches["C"]
        info["drain_s"] = round(self.set_running(workers, False), 1)
        items_a = self.deliver_batch(batch_a)
        info["queued_s"] = self.wait_queued(self.keyed(batch_a, items_a), "batch A queued")
        now_a = self.apply_fates(batch_a, items_a)
        self.set_running(workers, True)
        t_back = time.monotonic()
        info["workers_back_at"] = [time.time()]
        exists_a = [e for e in batch_a if e.fate != "purged"]
        old_ids = set(self.keyed(batch_a, items_a).values())
        calm = 0
        while time.monotonic() - t_back < 90 and calm < 3:  # until all stopped, or every batch-A job ran
            done = len(self.stopped(exists_a)) == len(exists_a)
            calm = 3 if done else (calm + 1 if not old_ids & self.pending_items() else 0)
            time.sleep(0.3 if not done else 0)
        info["unstopped_after_jobs"] = sorted({e.id for e in exists_a} - self.stopped(exists_a))
        info["batch_a_s"] = round(time.monotonic() - t_back, 1)
        self.set_running(workers, False)
        items_b = self.deliver_batch(batch_b)
        self.wait_queued(self.keyed(batch_b, items_b), "batch B queued")
        self.set_running(listeners[:1], False)
        self.set_running(listeners[1:], False, kill=True)
        listeners_down = time.monotonic()
        self.apply_fates(batch_b, items_b)
        items_c = self.deliver_batch(batch_c, folder=lambda e, i: C_FOLDERS[e.fate])
        info["listeners_down_s"] = round(time.monotonic() - listeners_down, 1)
        restarted_at = time.time()
        queued_before_restart = self.pending_items()
        self.set_running(listeners, True)
        info["catch_up_s"] = self.wait_queued(self.keyed(batch_c, items_c), "batch C read from the cursors by the listeners")
        # batch A was processed where it was moved to; the restart's reads must not enqueue it again
        self.wait_caught_up(restarted_at)
        replayed = set(self.keyed(batch_a, now_a).values()) & (self.pending_items() - queued_before_restart)
        info["replayed_after_restart"] = len(replayed)
        info["replayed_items"] = self.replayed_details(batch_a, now_a, replayed)
        self.set_running(workers, True)
        info["workers_back_at"].append(time.time())
        info["fates"] = dict(collections.Counter(e.fate for b in self.batches.values() for e in b))
        return info

    def replayed_details(self, batch: list[Enrollment], now: dict, replayed: set[str]) -> list[dict]:
        """For each batch-A reply queued again after the restart (at most 5): its fate, the jobs
        that carry it (how the listener read it, when), whether the ledger has its Message-ID
        processed, and the folder's cursor now: what tells a cursor that went back from a ledger
        that forgot."""
        stack = self.imap_stack
        assert stack.redis is not None
        by_key = {key: e for e in batch if (key := self.keyed([e], now).get(e.id))}
        jobs = retrying(lambda: stack.queue().jobs)
        out = []
        for key in sorted(replayed)[:5]:
            mailbox, the_id = key.split(" ", 1)
            e = by_key[key]
            mails = [m for job in jobs for m in (job.args[0].get("mails") or [])
                     if job.args[0].get("mailbox") == mailbox and m.get("item_id") == the_id]
            folder = the_id.split("/", 2)[2]
            cursor = CursorStore(stack.redis).get(e.mailbox, folder)
            message_id = (mails[0].get("message_id") if mails else None) or ""
            done = Ledger(stack.redis).processed(e.mailbox, [identity(message_id, the_id)]) if message_id else set()
            out.append({"item": the_id, "mailbox": e.mailbox, "fate": e.fate, "jobs": len(mails),
                        "message_id": message_id, "stopped": e.id in self.stopped([e]),
                        "via": [m.get("via") for m in mails], "seen_at": [m.get("seen_at") for m in mails],
                        "ledger_processed": bool(done), "ledger_size": stack.redis.zcard(keys.done(e.mailbox)),
                        "cursor": cursor.encode() if cursor else None})
        return out

    # -- all of it -----------------------------------------------------------------------------
    def wait_quiet(self, bound: float) -> float:
        """``chaos.Drill.wait_quiet``, noting what it waited on last (``imap.settle_waiting_on``)."""
        assert self.stack.redis is not None
        store = EnrollmentStore(self.stack.redis)
        t0, calm = time.monotonic(), 0
        while time.monotonic() - t0 < bound:
            try:
                backlog = self.stack.backlog()
                busy = backlog["queued"] + backlog["started"] + backlog["scheduled"]
                done = busy == 0 and self.all_expected_done(store)
                if not done:
                    self.imap_info["settle_waiting_on"] = {"at_s": round(time.monotonic() - t0, 1), **backlog,
                                                           "transitions_missing": busy == 0}
            except Exception:  # noqa: BLE001 - Redis may be restarting: not quiet yet
                done = False
            calm = calm + 1 if done else 0
            if calm >= 3:
                break
            time.sleep(1.0)
        return time.monotonic() - t0

    def run(self) -> dict:
        self.say(f"{len(self.mailboxes)} mailboxes, {len(self.timeline)} deliveries, faults: {', '.join(self.fault_kinds)}")
        report = super().run()
        stack = self.imap_stack
        try:
            status = stack.watch_status()
        except Exception as exc:  # noqa: BLE001 - informational only
            status = [{"error": f"{type(exc).__name__}: {exc}"}]
        report["imap"] = {**self.imap_info, "delivery_retries": self.deliverer.retried,
                          "dovecot": stack.dovecot.version, "watches": status}
        return report


def main(argv: list[str] | None = None) -> int:
    """This file on its own: ``chaos.py --source imap`` with the same options."""
    return chaos_main(["--source", "imap", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
