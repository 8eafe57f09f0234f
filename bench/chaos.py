"""Chaos drill: prove that no reply is lost or acted on twice while processes die and EWS misbehaves.

One machine runs the EWS emulator, Redis with AOF (everysec), two listener processes and two
worker processes (``python -m exchange_listener.cli listen|work``). Redis is a Sentinel group by
default (a primary, a replica and three ``redis-server --sentinel``, ``local_services.
SentinelGroup``) and every child is given its ``redis+sentinel://`` URL; ``--redis single`` runs
one redis-server instead. The drill records sends across many mailboxes, keeps the ground truth
in its own memory, delivers replies of every kind at a steady rate and, at random moments, kills a
listener (-9), kills a worker in the middle of a job (-9), restarts Redis (under Sentinel: a
graceful shutdown of the primary, the Sentinels promote the replica, the old primary rejoins as
its replica), kills the primary -9 (``failover``, Sentinel only) and injects every emulator fault.

Then comes the **mailbox-behaviour phase**, two deploy drains (workers stopped with SIGTERM).
It starts once every mailbox was caught up after the last Redis fault. In the first drain,
replies are delivered and queued, and the reps move some of them to a nested folder
they had, to a new nested folder, to Deleted Items, twice (a folder, then Deleted Items),
hard-delete some (to Recoverable Items) and purge some (batch A, listeners running); the workers
come back and every batch-A reply that still exists must be stopped once its job has run, before
any listener restart could find it again by a catch-up. In the second, a batch B is queued, both
listeners go down (one SIGTERM, one kill -9), the same moves and deletes happen to batch B, and
server-side rules file a batch C into new folders (``?folder=Rules/...``, half made by the rule
first, half by the delivery); the listeners start again and catch up, then the workers. Finally
the drill waits (bounded) for the system to go quiet and checks the enrollment state and audit
trail in Redis against the ground truth.

The last line printed is a JSON report; the exit status is non-zero when anything was lost,
duplicated, falsely stopped or left unexplained in the queues. Its fields:

- ``injected`` / ``faults``: faults injected, in all and by kind (a worker kill counts only when
  a worker was caught mid-job: EWS is slowed down with the emulator's latency fault meanwhile);
- ``lost``: enrollments whose expected stop or pause never happened, and soft bounces or read
  receipts never recorded in ``el:observed`` (what the workers do with them). A purged reply is
  not lost by us: it exists nowhere, so nothing can stop its enrollment; the ground truth expects
  it to stay active (``purged_expected_active`` counts them; a stop of one is a false stop);
- ``duplicated``: enrollments with more than one stop, or more pauses than distinct
  out-of-office mails (the same mail delivered twice must make one transition);
- ``false_stops``: stops of enrollments that only got out-of-office, soft bounces, read
  receipts or nothing (and any transition on an enrollment the drill never made);
- ``wrong``: wrong stop reason (replied / bounced) or wrong pause end (the stated return date,
  else ``pause_days``);
- ``unexplained``: jobs still queued, running, waiting for a retry, or failed at the end;
- ``max_recovery_s``: for each fault, replies are delivered right when it hits; its recovery
  is the time until the last of them is stopped (for a worker kill, until the killed job
  finished on another worker); the maximum over all faults;
- ``process_exits``: processes that exited on their own and were restarted, as supervisord's
  ``autorestart`` does in production (deploy/programs.conf);
- ``redis``: ``sentinel`` or ``single``; ``failover_recovery_s``: for the kill -9 of the primary,
  the seconds from the kill until the first enrollment transition is written again (the worst
  over all failovers); ``failovers``: per failover ``promoted_s`` (kill until the Sentinels name
  the new primary), ``flowing_s`` (as above) and ``recovery_s`` (until the replies delivered at the
  kill are all stopped);
- ``mailbox_phase``: seconds to drain the workers (``drain_s``), for the listeners to catch up the
  rule-filed replies after starting again (``catch_up_s``), from the workers' return to the last
  stop of each drain's replies (``resume_to_last_stop_s``, the worse of the two), per fate the
  replies and the enrollments stopped (``by_fate``: every fate but ``purged`` must stop all;
  ``purged`` none), and ``unstopped_after_jobs``: batch-A replies still not stopped when their
  jobs had run (each also counted in ``lost``, even if a later catch-up stopped it);
  ``replayed_after_restart``: batch-A replies, already processed in the folders they were moved
  to, that the listeners' catch-up after the restart enqueued again (must be 0: processed mail is
  never fetched again, whatever its folder). A job queued before the restart is not counted: the
  checkpoint of a folder mail was moved into may queue a moved reply's twin while the workers are
  drained (a safety net for moves no job covers; the twin's work is idempotent).

Children run with short timings so that the drill fits in CI: ``heartbeat_seconds`` 1,
``lease_seconds`` 8-10, ``worker_ttl`` 10, ``job_timeout`` 30, ``job_retries`` 8, and
``connection_timeout`` 1 minute, so the server's routine end of every stream happens mid-drill.

    python bench/chaos.py --size small     # CI: about 90 s on two cores
    python bench/chaos.py --size large     # >= 10,000 replies
    python bench/chaos.py --size small --source graph   # the same drill against Microsoft Graph
    python bench/chaos.py --size small --source imap    # the same drill against a real Dovecot
    python bench/chaos.py --size small --profile onprem # NTLM, HTTPS, default throttling, Exchange 2019

``--profile onprem`` (EWS only, ``OnpremDrill``) runs the same drill against Exchange Server as it
runs on premises: the emulator with ``--auth ntlm --throttling default --server-version 2019`` over
HTTPS with a test CA made at run time, the children with ``auth_type = "ntlm"`` as ``DOMAIN\\user``,
``ca_file`` and an empty ``ews_version`` (exchangelib's version probe); every EWS fault is still
injected. The report adds ``profile``, ``server`` and ``throttling`` (what the listeners' status
showed of the policy at worst, and how many log lines of the children named ErrorServerBusy,
ErrorExceededConnectionCount, ErrorExceededSubscriptionCount); it fails on any
ErrorExceededConnectionCount.

``--source graph`` (``bench/graph_chaos.py``) runs it with the Graph emulator, listeners with
``source = graph`` behind one notification URL (a forwarding proxy in front of their receivers),
one redis-server with AOF unless ``--redis sentinel``, and the Graph emulator's faults instead of
the EWS ones; the report and its check are the same (plus a ``graph`` section). ``--source imap``
(``bench/imap_chaos.py``) runs it against a real Dovecot: Dovecot killed and stopped and restarted,
connections cut mid-IDLE, a recreated INBOX (new UIDVALIDITY), besides the listener, worker and
Redis faults (plus an ``imap`` section).

The helpers here (``Stack``, the message builders, ``Deliverer``, ``transition_times``) are also
used by ``bench/run_all.py`` for the end-to-end benchmark.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import http.client
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from email.utils import format_datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import redis
from rq import Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from emulators.services import (
    Emulator,
    RedisServer,
    SentinelGroup,
    ask,
    service_env,
    wait_for,
)
from exchange_listener.core import keys, redis_conn
from exchange_listener.queueing import make_queue
from exchange_listener.sources.ews.catch_up import SyncStore
from workers.state.enrollments import STREAM_KEY, EnrollmentStore
from workers.state.sends import SendRegistry

SERVICE_ACCOUNT = ("svc", "svc-password")
EMULATOR_FAULTS = ("reset_streams", "stall_streams", "expire_subscriptions", "server_busy", "http_503", "restart")
PROCESS_FAULTS = ("kill_listener", "kill_worker", "restart_redis")
FAULT_KINDS = EMULATOR_FAULTS + PROCESS_FAULTS
SENTINEL_FAULTS = ("failover",)  # only when the drill's Redis is a Sentinel group
PAUSE_DAYS = 7

SIZES = {
    # deliveries: replies to deliver (incl. duplicates and unrelated mail); rate: replies/s;
    # rounds: how many times each fault kind is injected; settle: seconds allowed to go quiet.
    # sentinel: run Redis as a Sentinel group and inject the failover; phase: replies per batch of
    # the mailbox-behaviour phase.
    "small": {"mailboxes": 24, "deliveries": 480, "rate": 12.0, "rounds": 1, "settle": 100.0, "lease": 8.0,
              "sentinel": True, "phase": 21},
    "large": {"mailboxes": 200, "deliveries": 10_000, "rate": 55.0, "rounds": 3, "settle": 240.0, "lease": 10.0,
              "sentinel": True, "phase": 140},
}
# What the rep does to a queued reply while no worker runs (mailbox-behaviour phase). A move
# gives the item a new id; a hard delete moves it to Recoverable Items; a purge removes it from
# the mailbox entirely: that reply exists nowhere, so nothing can stop its enrollment.
FATES = ("moved_nested", "moved_new", "deleted", "hard_deleted", "moved_twice", "purged", "kept")
NESTED_FOLDER = "Clients/Key Accounts"  # made before the listeners start



# --- messages ---------------------------------------------------------------------------------

def _message_id(domain: str = "mail.example") -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def _headers(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in pairs if value is not None)


def _date() -> str:
    return format_datetime(dt.datetime.now(dt.UTC))


def human_reply(mailbox: str, sender: str, send_id: str, *, references_only: bool = False, cc: str | None = None,
                subject: str = "Quick question") -> bytes:
    """A person answering a send (Outlook-like); ``references_only`` leaves out In-Reply-To, as a
    colleague's client does when it replies further down the thread."""
    earlier = _message_id("other.example")
    pairs = [("From", sender), ("To", mailbox), ("Cc", cc), ("Subject", f"RE: {subject}"), ("Date", _date()),
             ("Message-ID", _message_id(sender.split("@")[1])), ("MIME-Version", "1.0"),
             ("Content-Type", "text/plain; charset=utf-8")]
    if references_only:
        pairs.append(("References", f"{send_id} {earlier}"))
    else:
        pairs += [("In-Reply-To", send_id), ("References", send_id)]
    body = "Thanks, that sounds interesting. Can we talk on Thursday?\r\n\r\n> earlier text\r\n"
    return (_headers(pairs) + "\r\n" + body).encode()


def out_of_office(mailbox: str, sender: str, send_id: str, return_date: dt.date | None,
                  subject: str = "Quick question") -> bytes:
    """Exchange's automatic reply, with or without a stated return date."""
    pairs = [("From", sender), ("To", mailbox), ("Subject", f"Automatic reply: {subject}"), ("Date", _date()),
             ("Message-ID", _message_id(sender.split("@")[1])), ("In-Reply-To", send_id), ("References", send_id),
             ("Auto-Submitted", "auto-replied"), ("X-Auto-Response-Suppress", "All"),
             ("X-MS-Exchange-Inbox-Rules-Loop", sender), ("MIME-Version", "1.0"),
             ("Content-Type", "text/plain; charset=utf-8")]
    if return_date:
        body = (f"Thank you for your message. I am out of the office until "
                f"{return_date.strftime('%A, %B')} {return_date.day}, {return_date.year} with limited access to email.\r\n")
    else:
        body = "Thank you for your message. I am currently out of the office with limited access to email.\r\n"
    return (_headers(pairs) + "\r\n" + body).encode()


def bounce(mailbox: str, recipient: str, send_id: str, *, hard: bool, subject: str = "Quick question") -> bytes:
    """A Postfix-style DSN (multipart/report) carrying the original headers."""
    boundary = uuid.uuid4().hex
    status, action, diag = (("5.1.1", "failed", f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown")
                            if hard else ("4.2.2", "delayed", f"452 4.2.2 <{recipient}>: Mailbox full"))
    headline = "Undelivered Mail Returned to Sender" if hard else "Delayed Mail (still being retried)"
    pairs = [("From", "MAILER-DAEMON@mx.mail.example (Mail Delivery System)"), ("To", mailbox),
             ("Subject", headline), ("Date", _date()), ("Message-ID", _message_id("mx.mail.example")),
             ("Auto-Submitted", "auto-replied"), ("MIME-Version", "1.0"),
             ("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"')]
    explanation = ("I'm sorry to have to inform you that your message could not be delivered to one or more recipients.\r\n"
                   if hard else "Your message could not be delivered yet; delivery will be retried.\r\n")
    body = (f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{explanation}\r\n"
            f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
            f"Reporting-MTA: dns; mx.mail.example\r\n\r\n"
            f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822; {recipient}\r\n"
            f"Action: {action}\r\nStatus: {status}\r\nDiagnostic-Code: smtp; {diag}\r\n\r\n"
            f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"From: {mailbox}\r\nTo: {recipient}\r\nSubject: {subject}\r\nMessage-ID: {send_id}\r\n\r\n"
            f"--{boundary}--\r\n")
    return (_headers(pairs) + "\r\n" + body).encode()


def read_receipt(mailbox: str, sender: str, send_id: str, subject: str = "Quick question") -> bytes:
    """An RFC 8098 read receipt that also names the send in References (as some clients do)."""
    boundary = uuid.uuid4().hex
    pairs = [("From", sender), ("To", mailbox), ("Subject", f"Read: {subject}"), ("Date", _date()),
             ("Message-ID", _message_id(sender.split("@")[1])), ("References", send_id), ("MIME-Version", "1.0"),
             ("Content-Type", f'multipart/report; report-type=disposition-notification; boundary="{boundary}"')]
    body = (f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour message was read.\r\n\r\n"
            f"--{boundary}\r\nContent-Type: message/disposition-notification\r\n\r\n"
            f"Reporting-UA: mail.example; Outlook\r\nFinal-Recipient: rfc822;{sender}\r\n"
            f"Original-Message-ID: {send_id}\r\nDisposition: manual-action/MDN-sent-manually; displayed\r\n\r\n"
            f"--{boundary}--\r\n")
    return (_headers(pairs) + "\r\n" + body).encode()


def unrelated(mailbox: str, rng: random.Random) -> bytes:
    """Mail that answers nothing we sent: a newsletter, or a reply to someone else's thread."""
    if rng.random() < 0.5:
        pairs = [("From", "news@newsletter.example"), ("To", mailbox), ("Subject", "This week in widgets"),
                 ("Date", _date()), ("Message-ID", _message_id("newsletter.example")),
                 ("List-Unsubscribe", "<mailto:leave@newsletter.example>"), ("MIME-Version", "1.0"),
                 ("Content-Type", "text/plain; charset=utf-8")]
    else:
        other = _message_id("elsewhere.example")
        pairs = [("From", "friend@elsewhere.example"), ("To", mailbox), ("Subject", "Re: lunch"), ("Date", _date()),
                 ("Message-ID", _message_id("elsewhere.example")), ("In-Reply-To", other), ("References", other),
                 ("MIME-Version", "1.0"), ("Content-Type", "text/plain; charset=utf-8")]
    return (_headers(pairs) + "\r\nSee you at noon.\r\n").encode()


# --- processes --------------------------------------------------------------------------------

class Proc:
    """A listener or worker child (any command: the baseline's too) that can be killed (-9) and
    started again as the same object, with its CPU and RSS read from /proc. (``local_services.
    CliProcess`` starts once, at construction; the drill restarts the same process slot.)"""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: str):
        self.name, self.args, self.env = name, args, env
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - deliberate
        self.popen = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """kill -9 of the process and anything it forked (a forking worker's horse dies with it)."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(10)

    def terminate(self, timeout: float = 12.0) -> int | None:
        """SIGTERM and wait (warm shutdown); SIGKILL after ``timeout``. Returns the exit status."""
        if not self.alive():
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process and its reaped children (a forking worker's horses)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, IndexError, ValueError):
        return 0.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "exchange_listener.cli", *args]


def baseline_commands(mailboxes: list[str], log_dir: str) -> dict:
    """``Stack`` arguments that run the afternoon baseline (``bench/baseline.py``) instead of ours."""
    path = os.path.join(log_dir, "baseline-mailboxes.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(mailboxes) + "\n")
    script = os.path.join(ROOT, "bench", "baseline.py")
    return {"listener_cmd": [sys.executable, script, "listen", "--mailboxes", path],
            "worker_cmd": [sys.executable, script, "work"]}


class TlsEmulator(Emulator):
    """The EWS emulator serving HTTPS (``--tls-cert``); the drill's own calls trust ``ca_file``:
    ``Emulator``'s hooks call ``urlopen`` without a context, so the drill process installs an
    opener that trusts the test CA (it talks to no other HTTPS server)."""

    def __init__(self, ca_file: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.context = ssl.create_default_context(cafile=ca_file)
        urllib.request.install_opener(urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.context)))

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def make_test_pki(directory: str) -> dict:
    """A test CA made now (trustme, on cryptography; no key is kept anywhere else) and a server
    certificate for 127.0.0.1 from it: {"ca": CA PEM, "cert": chain + key PEM}."""
    import trustme

    os.makedirs(directory, mode=0o700, exist_ok=True)
    ca = trustme.CA(organization_name="exchange-listener chaos drill test CA")
    files = {"ca": os.path.join(directory, "ca.pem"), "cert": os.path.join(directory, "server.pem")}
    ca.cert_pem.write_to_path(files["ca"])
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(files["cert"])
    return files


class Stack:
    """Emulator + redis-server (AOF) + listener and worker processes, all on free ports.

    ``settings`` are extra ``EXCHANGE_LISTENER_*`` values (lower-case keys) for the children;
    ``listener_cmd`` / ``worker_cmd`` replace ``exchange-listener listen|work`` (the baseline).
    """

    def __init__(self, mailboxes: list[str], *, listeners: int = 2, workers: int = 2, settings: dict | None = None,
                 listener_cmd: list[str] | None = None, worker_cmd: list[str] | None = None,
                 heartbeat_seconds: float = 1.0, log_dir: str | None = None, aof: bool = True,
                 sentinel: bool = False, account: tuple[str, str] = SERVICE_ACCOUNT, login: str | None = None,
                 emulator_args: tuple[str, ...] = (), tls: dict | None = None):
        self.mailboxes = mailboxes
        # the emulator's account, the user name the children log in with (``DOMAIN\\user`` under
        # NTLM; default: the account's own name) and extra emulator flags (the onprem profile);
        # tls: {"cert": PEM chain + key, "ca": the CA's PEM}: HTTPS, the children trust it by ca_file
        self.account, self.login, self.emulator_args = account, login or account[0], list(emulator_args)
        self.tls = tls
        self.n_listeners, self.n_workers = listeners, workers
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="el-stack-")
        self.heartbeat_seconds = heartbeat_seconds
        self.extra = dict(settings or {})
        self.listener_cmd = listener_cmd or cli("listen")
        self.worker_cmd = worker_cmd or cli("work")
        # sentinel: a primary, a replica and three Sentinels; every child gets redis+sentinel://
        # (its logs under log_dir: kept with the drill's logs when it fails)
        self.sentinel = SentinelGroup(workdir=os.path.join(self.log_dir, "redis-sentinel")) if sentinel else None
        self.redis_server = None if sentinel else RedisServer(aof=aof)
        self.emulator = self._make_emulator()
        self.listeners: list[Proc] = []
        self.workers: list[Proc] = []
        self.redis: redis.Redis | None = None

    def _make_emulator(self):
        """The mail server the children talk to (``bench/graph_chaos.GraphStack``: the Graph one)."""
        if self.tls:
            return TlsEmulator(self.tls["ca"], accounts=[":".join(self.account)], mailboxes=self.mailboxes,
                               heartbeat_seconds=self.heartbeat_seconds,
                               extra_args=[*self.emulator_args, "--tls-cert", self.tls["cert"]])
        return Emulator(accounts=[":".join(self.account)], mailboxes=self.mailboxes,
                        heartbeat_seconds=self.heartbeat_seconds, extra_args=self.emulator_args)

    @property
    def queue_name(self) -> str:
        return self.extra.get("queue_name", "exchange-listener")

    @property
    def redis_url(self) -> str:
        return self.sentinel.url if self.sentinel else self.redis_server.url

    def env(self) -> dict[str, str]:
        settings = {"heartbeat_seconds": self.heartbeat_seconds, "log_level": os.environ.get("CHAOS_LOG_LEVEL", "warning"), "pause_days": PAUSE_DAYS,
                    **({"ca_file": self.tls["ca"]} if self.tls else {}), **self.extra}
        env = service_env(self.redis_url, self.emulator.ews_url, username=self.login,
                          password=self.account[1], **settings)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, "bench"), env.get("PYTHONPATH")) if p)
        return env

    def start_services(self) -> Stack:
        if self.sentinel:
            self.sentinel.start()
        else:
            self.redis_server.start()
        self.emulator.start()
        self.redis = redis_conn.connect(self.redis_url, socket_timeout=10)
        return self

    def restart_redis(self, pause: float) -> None:
        """Take Redis down gracefully for ``pause`` seconds and start it again. Under Sentinel the
        primary is shut down (maintenance): the Sentinels promote the replica, and the old primary
        comes back as the new one's replica."""
        if not self.sentinel:
            self.redis_server.stop()
            time.sleep(pause)
            self.redis_server.start()
            return
        port = self.sentinel.primary_port()
        self.sentinel.server(port).stop()
        time.sleep(pause)
        self.rejoin(port)

    def kill_primary(self) -> tuple[int, float]:
        """kill -9 of the Sentinel group's primary (a crash); its port and the epoch second of the kill."""
        port = self.sentinel.primary_port()
        self.sentinel.server(port).kill()
        return port, time.time()

    def rejoin(self, old_port: int, timeout: float = 30.0) -> float:
        """Wait for the Sentinels to promote another server, then start the one on ``old_port``
        again as its replica (as an operator or supervisor brings a failed node back). Returns the
        epoch second at which the Sentinels named the new primary."""
        new_port = wait_for(lambda: (p := self.sentinel.primary_port()) not in (None, old_port) and p,
                            timeout=timeout, interval=0.1, message="the Sentinels promoting the replica")
        promoted = time.time()
        server = self.sentinel.server(old_port)
        server.extra_args = ["--replicaof", "127.0.0.1", str(new_port)]
        server.start()
        return promoted

    def sentinel_switches(self) -> list[str]:
        """The ``+switch-master`` lines of the first Sentinel's log: every failover it saw, the
        drill's own and any it did not ask for (a primary too slow to answer for down-after)."""
        path = os.path.join(self.sentinel.workdir, f"sentinel-{self.sentinel.sentinel_ports[0]}", "sentinel.log")
        try:
            with open(path, errors="replace") as fh:
                return [line.strip() for line in fh if "+switch-master" in line]
        except OSError:
            return []

    def sentinel_settled(self) -> bool:
        """Every Sentinel names the same primary and sees the other server as its healthy replica,
        and that replica is in sync: a further failover can happen."""
        group = self.sentinel
        try:
            primary = group.primary_port()
            if primary is None:
                return False
            other = group.replica if primary == group.primary.port else group.primary
            info = ask(other.port, "INFO", "replication")
            if info.get("master_link_status") != "up" or int(info.get("master_port", 0)) != primary:
                return False
            for port in group.sentinel_ports:
                addr = ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", group.name)
                if not addr or int(addr[1]) != primary:
                    return False
                replicas = ask(port, "SENTINEL", "REPLICAS", group.name)
                flags = {int(r[b"port"]): r[b"flags"].decode() for r in (_pairs(x) for x in replicas)}
                if flags.get(other.port) != "slave":
                    return False
        except (redis.exceptions.RedisError, OSError, ValueError, KeyError):
            return False
        return True

    def add_mailboxes(self, mailboxes: list[str] | None = None) -> None:
        mailboxes = mailboxes or self.mailboxes
        for start in range(0, len(mailboxes), 500):
            subprocess.run(cli("mailboxes", "add", *mailboxes[start:start + 500]), env=self.env(), cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL, timeout=120)

    def start_processes(self) -> Stack:
        env = self.env()
        self.listeners = [Proc(f"listener-{i}", self.listener_cmd, env, self.log_dir).start() for i in range(self.n_listeners)]
        self.workers = [Proc(f"worker-{i}", self.worker_cmd, env, self.log_dir).start() for i in range(self.n_workers)]
        return self

    def start_listeners(self, count: int | None = None) -> None:
        env = self.env()
        for i in range(count if count is not None else self.n_listeners):
            self.listeners.append(Proc(f"listener-{len(self.listeners)}", self.listener_cmd, env, self.log_dir).start())

    def stop_listeners(self) -> None:
        for proc in self.listeners:
            proc.terminate()
        self.listeners = []

    def restart(self, proc: Proc) -> None:
        proc.kill()
        proc.start()

    def stop(self) -> None:
        for proc in self.listeners + self.workers:
            try:
                proc.terminate(timeout=8)
            except Exception:  # noqa: BLE001 - recorded in the report, never fatal
                proc.kill()
        self.emulator.stop()
        if self.sentinel:
            self.sentinel.stop()
        else:
            self.redis_server.kill()

    def queue(self):
        return make_queue(self.redis, self.queue_name)

    def backlog(self) -> dict:
        """Jobs not yet done: queued, running, waiting for a retry; and failed ones."""
        queue = self.queue()
        return {
            "queued": queue.count,
            "started": StartedJobRegistry(queue=queue).count,
            "scheduled": ScheduledJobRegistry(queue=queue).count,
            "failed": FailedJobRegistry(queue=queue).count,
        }

    def busy_worker(self, procs: list[Proc]) -> tuple[Proc, str] | None:
        """A worker process of ``procs`` that is running a job right now, and the job's id."""
        by_pid = {p.pid: p for p in procs if p.alive()}
        for worker in Worker.all(connection=self.redis, serializer=JSONSerializer):
            if worker.pid in by_pid and worker.get_state() == "busy":
                job_id = worker.get_current_job_id()
                if job_id:
                    return by_pid[worker.pid], job_id
        return None


def _pairs(flat) -> dict:
    """A Sentinel reply as a flat [key, value, ...] list (RESP2), or already a dict, as a dict."""
    if isinstance(flat, dict):
        return {k if isinstance(k, bytes) else str(k).encode(): v for k, v in flat.items()}
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


class Supervisor(threading.Thread):
    """Restarts a listener or worker that exited on its own, as supervisord's ``autorestart``
    does in production, and counts those exits. Processes the drill killed on purpose are
    ``held`` until the drill restarts them itself."""

    def __init__(self, stack: Stack):
        super().__init__(name="supervisor", daemon=True)
        self.stack = stack
        self.held: set[int] = set()
        self.exits: list[dict] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def hold(self, proc: Proc) -> None:
        with self.lock:
            self.held.add(id(proc))

    def release(self, proc: Proc) -> None:
        """Start ``proc`` again (if still down) and let the supervisor watch it again."""
        with self.lock:
            if not proc.alive() and not self.stopping.is_set():
                proc.start()
            self.held.discard(id(proc))

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            for proc in self.stack.listeners + self.stack.workers:
                with self.lock:
                    if id(proc) in self.held or proc.popen is None or proc.popen.poll() is None:
                        continue
                    self.exits.append({"process": proc.name, "exit_code": proc.popen.returncode, "at": time.time()})
                    proc.start()


class Deliverer:
    """POSTs raw messages to the emulator over kept-alive HTTP connections (one per thread)."""

    def __init__(self, emulator: Emulator):
        self.host, self.port = "127.0.0.1", emulator.port
        self.context: ssl.SSLContext | None = getattr(emulator, "context", None)  # TlsEmulator: HTTPS
        self.local = threading.local()

    def deliver(self, mailbox: str, raw: bytes, folder: str = "inbox") -> dict:
        for attempt in range(3):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = (
                    http.client.HTTPSConnection(self.host, self.port, timeout=30, context=self.context)
                    if self.context else http.client.HTTPConnection(self.host, self.port, timeout=30))
            try:
                query = urllib.parse.urlencode({"folder": folder})
                conn.request("POST", f"/emulator/mailboxes/{mailbox}/messages?{query}", body=raw,
                             headers={"Content-Type": "message/rfc822"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"emulator refused delivery to {mailbox}: {resp.status} {data[:200]!r}")
                return json.loads(data)
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")


def transition_times(client: redis.Redis) -> dict[str, list[tuple[float, dict]]]:
    """enrollment id -> [(epoch seconds the transition was written, transition)], from the stream."""
    out: dict[str, list[tuple[float, dict]]] = collections.defaultdict(list)
    last = "-"
    while True:
        entries = client.xrange(STREAM_KEY, min=last, max="+", count=5000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            return out
        for entry_id, fields in entries:
            data = json.loads(fields[b"data"])
            out[data["enrollment_id"]].append((int(entry_id.split(b"-")[0]) / 1000, data))
        last = entries[-1][0].decode()


OBSERVED_STREAM = keys.OBSERVED  # workers.jobs: soft bounces and read receipts are "recorded" here
RECORDED_AS = {"soft_bounce": "soft_bounce", "receipt": "read_receipt"}


def observed_pairs(client: redis.Redis) -> set[tuple[str, str]] | None:
    """(enrollment id, kind) of every entry the workers recorded; None if they record nothing."""
    if not client.exists(OBSERVED_STREAM):
        return None
    pairs, last = set(), "-"
    while True:
        entries = client.xrange(OBSERVED_STREAM, min=last, max="+", count=5000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            return pairs
        for _, fields in entries:
            data = json.loads(fields[b"data"])
            pairs.add((data.get("enrollment_id"), data.get("kind")))
        last = entries[-1][0].decode()


def retrying(call, seconds: float = 30.0):
    """Call ``call()`` until Redis answers (the drill restarts it on purpose)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# --- ground truth -----------------------------------------------------------------------------

# scenario -> (mail kinds delivered in order, expected status, expected reason)
SCENARIOS = {
    "reply_prospect": (["reply"], "stopped", "replied"),
    "reply_colleague": (["reply_colleague"], "stopped", "replied"),
    "reply_cc": (["reply_cc"], "stopped", "replied"),
    "receipt_then_reply": (["receipt", "reply"], "stopped", "replied"),
    "ooo_then_reply": (["ooo_date", "reply"], "stopped", "replied"),
    "ooo_date": (["ooo_date"], "paused", None),
    "ooo_nodate": (["ooo_nodate"], "paused", None),
    "hard_bounce": (["hard_bounce"], "stopped", "bounced"),
    "soft_bounce": (["soft_bounce"], "active", None),
    "receipt": (["receipt"], "active", None),
    "untouched": ([], "active", None),
}
WEIGHTS = {"reply_prospect": 14, "reply_colleague": 8, "reply_cc": 6, "receipt_then_reply": 5, "ooo_then_reply": 5,
           "ooo_date": 8, "ooo_nodate": 6, "hard_bounce": 8, "soft_bounce": 6, "receipt": 6, "untouched": 4}
STOPPING = {"reply", "reply_colleague", "reply_cc", "hard_bounce"}
PAUSING = {"ooo_date", "ooo_nodate"}


@dataclasses.dataclass
class Enrollment:
    id: str
    mailbox: str
    prospect: str
    colleague: str
    cc: str
    send_ids: list[str]
    scenario: str
    return_date: dt.date | None = None
    delivered: list[str] = dataclasses.field(default_factory=list)  # kinds actually delivered
    fate: str | None = None  # mailbox-behaviour phase: what happened to its reply (FATES, rule_filed)

    @property
    def expected(self) -> tuple[str, str | None]:
        return SCENARIOS[self.scenario][1], SCENARIOS[self.scenario][2]


@dataclasses.dataclass
class Delivery:
    at: float  # position in the timeline, 0..1
    mailbox: str
    kind: str
    enrollment: Enrollment | None
    raw: bytes | None = None
    duplicate_of: Delivery | None = None
    item_id: str | None = None
    sent_at: float | None = None


def build_raw(d: Delivery, rng: random.Random) -> bytes:
    e = d.enrollment
    if d.kind == "unrelated":
        return unrelated(d.mailbox, rng)
    send_id = rng.choice(e.send_ids)  # a send may carry more than one id: any must match
    if d.kind == "reply":
        return human_reply(e.mailbox, e.prospect, send_id)
    if d.kind == "reply_colleague":
        return human_reply(e.mailbox, e.colleague, send_id, references_only=True)
    if d.kind == "reply_cc":
        return human_reply(e.mailbox, e.cc, send_id, cc=e.prospect)
    if d.kind == "receipt":
        return read_receipt(e.mailbox, e.prospect, send_id)
    if d.kind == "ooo_date":
        return out_of_office(e.mailbox, e.prospect, send_id, e.return_date)
    if d.kind == "ooo_nodate":
        return out_of_office(e.mailbox, e.prospect, send_id, None)
    if d.kind in ("hard_bounce", "soft_bounce"):
        return bounce(e.mailbox, e.prospect, send_id, hard=d.kind == "hard_bounce")
    raise ValueError(d.kind)


def make_plan(mailboxes: list[str], deliveries: int, rng: random.Random) -> tuple[list[Enrollment], list[Delivery]]:
    """Enrollments with their scenarios and a shuffled timeline of at least ``deliveries`` mails:
    ~8% duplicates (the same bytes delivered again) and ~8% unrelated mail."""
    names, weights = zip(*WEIGHTS.items())
    enrollments: list[Enrollment] = []
    timeline: list[Delivery] = []
    today = dt.date.today()
    while len(timeline) < deliveries:
        n = len(enrollments)
        mailbox = mailboxes[n % len(mailboxes)]
        domain = f"prospect{n}.example"
        e = Enrollment(id=f"enr-{n:06d}", mailbox=mailbox, prospect=f"pat{n}@{domain}", colleague=f"sam{n}@{domain}",
                       cc=f"lee{n}@cc{n}.example", send_ids=[_message_id("sales.example")],
                       scenario=rng.choices(names, weights)[0])
        if rng.random() < 0.3:  # the id the mail server assigned as well (SES-style rewrite)
            e.send_ids.append(_message_id("ses.example"))
        if "ooo_date" in SCENARIOS[e.scenario][0]:
            e.return_date = today + dt.timedelta(days=rng.randint(10, 60))
        enrollments.append(e)
        positions = sorted(rng.random() for _ in SCENARIOS[e.scenario][0])
        for at, kind in zip(positions, SCENARIOS[e.scenario][0]):
            d = Delivery(at, mailbox, kind, e)
            timeline.append(d)
            if rng.random() < 0.08:
                timeline.append(Delivery(min(1.0, at + rng.random() * 0.1), mailbox, kind, e, duplicate_of=d))
        if rng.random() < 0.12:
            timeline.append(Delivery(rng.random(), rng.choice(mailboxes), "unrelated", None))
    timeline.sort(key=lambda d: d.at)
    return enrollments, timeline


def record_sends(registry: SendRegistry, enrollments: list[Enrollment]) -> None:
    for e in enrollments:
        registry.record(e.send_ids, e.id, f"seq-{len(e.id) % 7}", e.mailbox, [e.prospect], cc=[e.cc])


def warm_up(stack: Stack, replies: list[Enrollment], timeout: float = 60.0) -> float:
    """Answer one send per mailbox and wait for all those stops: then every mailbox is streamed
    and the workers are warm. Returns the seconds it took; raises if not ready in ``timeout``.

    Mail that arrives before a mailbox's first subscription may predate its first sync state,
    so a reply not acted on within a few seconds is sent again (as a new mail)."""
    t0 = time.monotonic()
    store = EnrollmentStore(stack.redis)
    deliverer = Deliverer(stack.emulator)
    pending = {e.id: e for e in replies}
    last_sent = 0.0
    while pending and time.monotonic() - t0 < timeout:
        if time.monotonic() - last_sent > 2.5:
            for e in pending.values():
                e.delivered.append("reply")
                deliverer.deliver(e.mailbox, human_reply(e.mailbox, e.prospect, e.send_ids[0]))
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


# --- the drill --------------------------------------------------------------------------------

class Drill:
    source = "ews"
    base_fault_kinds = FAULT_KINDS

    def __init__(self, size: str, seed: int, log_dir: str, plumbing: str = "ours", sentinel: bool | None = None,
                 phase: bool = True):
        self.cfg = SIZES[size]
        self.size = size
        self.rng = random.Random(seed)
        self.mailboxes = [f"rep{i:04d}@sales.example" for i in range(self.cfg["mailboxes"])]
        commands = baseline_commands(self.mailboxes, log_dir) if plumbing == "baseline" else {}
        self.sentinel = self.cfg["sentinel"] if sentinel is None else sentinel
        self.fault_kinds = self.base_fault_kinds + (SENTINEL_FAULTS if self.sentinel else ())
        self.stack = self.make_stack(log_dir, commands)
        self.enrollments, self.timeline = make_plan(self.mailboxes, self.cfg["deliveries"], self.rng)
        self.supervisor = Supervisor(self.stack)
        self.faults: list[dict] = []  # {kind, at, probes: [enrollment ids], job_id, recovery_s}
        self.probes: list[Enrollment] = []
        # mailbox-behaviour phase: batch -> enrollments whose one reply the rep moves, deletes or files
        self.phase_on = phase
        self.batches: dict[str, list[Enrollment]] = {}
        self.phase_info: dict = {}
        self.lock = threading.Lock()
        self.delivered = 0
        self.errors: list[str] = []

    def make_stack(self, log_dir: str, commands: dict) -> Stack:
        return Stack(self.mailboxes, listeners=2, workers=2, log_dir=log_dir, **commands, sentinel=self.sentinel,
                     settings={
            "queue_name": "drill", "lease_seconds": self.cfg["lease"], "worker_ttl": 10, "job_timeout": 30,
            "job_retries": 8, "connection_timeout": 1,  # the server closes every stream each minute
            **self.profile_settings(),
        }, **self.profile_stack())

    def profile_settings(self) -> dict:
        """Extra settings of the children under a ``--profile`` (``OnpremDrill``)."""
        return {}

    def profile_stack(self) -> dict:
        """Extra ``Stack`` arguments under a ``--profile``: account, login, emulator flags."""
        return {}

    # -- setup -------------------------------------------------------------------------------
    def probe_enrollments(self, count: int) -> list[Enrollment]:
        """Enrollments answered right when a fault hits: the time to their stop is the recovery."""
        out = []
        for i in range(count):
            n = len(self.probes)
            mailbox = self.mailboxes[(n * 7) % len(self.mailboxes)]
            e = Enrollment(id=f"probe-{n:04d}", mailbox=mailbox, prospect=f"probe{n}@probe{n}.example",
                           colleague=f"c{n}@probe{n}.example", cc=f"cc{n}@probecc.example",
                           send_ids=[_message_id("sales.example")], scenario="reply_prospect")
            self.probes.append(e)
            out.append(e)
        return out

    def everyone(self) -> list[Enrollment]:
        return self.enrollments + self.probes + [e for batch in self.batches.values() for e in batch]

    def phase_enrollments(self) -> dict[str, list[Enrollment]]:
        """Three batches of one-reply enrollments for the mailbox-behaviour phase: A (moved or
        deleted while listeners run), B (moved or deleted while both listeners are down) and C
        (rule-filed into new folders while both listeners are down, half as many)."""
        count = self.cfg["phase"]
        batches = {}
        n = 0
        for name, size in (("A", count), ("B", count), ("C", max(1, count // 2))):
            batch = []
            for i in range(size):
                mailbox = self.mailboxes[n % len(self.mailboxes)]
                fate = "rule_filed" if name == "C" else FATES[i % len(FATES)]
                batch.append(Enrollment(id=f"mbx-{name}-{i:04d}", mailbox=mailbox, prospect=f"m{n}@mbx{n}.example",
                                        colleague=f"c{n}@mbx{n}.example", cc=f"cc{n}@mbxcc.example",
                                        send_ids=[_message_id("sales.example")], scenario="reply_prospect", fate=fate))
                n += 1
            batches[name] = batch
        return batches

    def setup(self) -> None:
        self.stack.start_services()
        registry = SendRegistry(self.stack.redis)
        record_sends(registry, self.enrollments)
        rounds = self.cfg["rounds"]
        self.probe_pool = self.probe_enrollments(len(self.fault_kinds) * rounds * min(6, len(self.mailboxes)))
        record_sends(registry, self.probe_pool)
        if self.phase_on:
            self.batches = self.phase_enrollments()
            for batch in self.batches.values():
                record_sends(registry, batch)
            for mailbox in sorted({e.mailbox for e in self.batches["A"] + self.batches["B"]}):
                self.stack.emulator.create_folder(mailbox, NESTED_FOLDER)  # a folder the rep already had
        self.stack.add_mailboxes()
        self.stack.start_processes()

    def wait_ready(self, timeout: float = 60.0) -> float:
        warm = self.probe_enrollments(len(self.mailboxes))
        record_sends(SendRegistry(self.stack.redis), warm)
        return warm_up(self.stack, warm, timeout)

    # -- deliveries ----------------------------------------------------------------------------
    def deliver_one(self, mailbox: str, raw: bytes) -> str:
        """Put one mail in ``mailbox``; its item id (a source's drill delivers its own way)."""
        if getattr(self, "_deliverer", None) is None:  # one, for its kept-alive connection
            self._deliverer = Deliverer(self.stack.emulator)
        return self._deliverer.deliver(mailbox, raw)["item_id"]

    def deliver_all(self, stop: threading.Event) -> None:
        interval = 1.0 / self.cfg["rate"]
        start = time.monotonic()
        for i, d in enumerate(self.timeline):
            if stop.is_set():
                return
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            d.raw = d.duplicate_of.raw if d.duplicate_of and d.duplicate_of.raw else build_raw(d, self.rng)
            try:
                d.sent_at = time.time()
                d.item_id = self.deliver_one(d.mailbox, d.raw)
                if d.enrollment is not None:
                    d.enrollment.delivered.append(d.kind)
                with self.lock:
                    self.delivered += 1
            except Exception as exc:  # the emulator is never faulted on its delivery endpoint  # noqa: BLE001 - recorded in the report, never fatal
                self.errors.append(f"delivery failed: {type(exc).__name__}: {exc}")

    # -- faults --------------------------------------------------------------------------------
    def fault_schedule(self, duration: float) -> list[tuple[float, str]]:
        kinds = [k for k in self.fault_kinds for _ in range(self.cfg["rounds"])]
        self.rng.shuffle(kinds)
        # a killed worker's job comes back only after RQ's reclaim (worker_ttl, maintenance) and a
        # retry's backoff, about a minute: in the first half, so the drill does not end waiting for it
        cut = len(kinds) // 2
        late = [i for i, k in enumerate(kinds) if k == "kill_worker" and i >= cut]
        early = [i for i in range(cut) if kinds[i] != "kill_worker"]
        for i, j in zip(late, self.rng.sample(early, min(len(late), len(early)))):
            kinds[i], kinds[j] = kinds[j], kinds[i]
        slot = duration * 0.85 / len(kinds)
        return [(duration * 0.05 + i * slot + self.rng.random() * slot * 0.5, kind) for i, kind in enumerate(kinds)]

    def send_probes(self, fault: dict) -> None:
        deliverer = Deliverer(self.stack.emulator)
        count = min(6, len(self.mailboxes))
        chosen = [self.probe_pool.pop() for _ in range(count)] if len(self.probe_pool) >= count else []
        mailboxes = self.rng.sample(self.mailboxes, len(chosen))
        for e, mailbox in zip(chosen, mailboxes):
            e.mailbox = mailbox  # the send was recorded for another mailbox; the reply may land anywhere
            e.delivered.append("reply")
            deliverer.deliver(mailbox, human_reply(mailbox, e.prospect, e.send_ids[0]))
        fault["probes"] = [e.id for e in chosen]

    def inject(self, kind: str) -> dict:
        fault = {"kind": kind, "at": time.time(), "probes": [], "job_id": None}
        emulator, stack = self.stack.emulator, self.stack
        if kind == "reset_streams":
            emulator.fault(kind="reset_streams")
        elif kind == "stall_streams":
            emulator.fault(kind="stall_streams", seconds=4 * stack.heartbeat_seconds + 1)
        elif kind == "expire_subscriptions":
            emulator.fault(kind="expire_subscriptions")
        elif kind == "server_busy":
            emulator.fault(kind="server_busy", count=20, back_off_ms=500)
        elif kind == "http_503":
            emulator.fault(kind="http_503", count=20)
        elif kind == "restart":
            emulator.fault(kind="restart")
        elif kind == "kill_listener":
            victim = self.rng.choice([p for p in stack.listeners if p.alive()] or stack.listeners)
            self.supervisor.hold(victim)
            victim.kill()
            fault["victim"] = victim.name
            threading.Timer(self.rng.uniform(3, 8), self.supervisor.release, args=(victim,)).start()
        elif kind == "kill_worker":
            fault.update(self.kill_busy_worker())
        elif kind == "restart_redis":
            self.wait_sentinel_settled(fault)
            fault["at"] = time.time()
            pause = self.rng.uniform(1, 3)
            def restart() -> None:
                try:
                    stack.restart_redis(pause)
                except Exception as exc:  # noqa: BLE001 - recorded in the report, never fatal
                    self.errors.append(f"restarting Redis failed: {type(exc).__name__}: {exc}")

            stopper = threading.Thread(target=restart, daemon=True)
            stopper.start()
            time.sleep(0.2 if stack.sentinel else 0.0)
            self.send_probes(fault)  # replies arrive while Redis is down
            stopper.join()
            return fault
        elif kind == "failover":
            self.wait_sentinel_settled(fault)
            old_port, fault["at"] = stack.kill_primary()  # a crash in the middle of the reply stream
            self.send_probes(fault)
            fault["promoted_s"] = round(stack.rejoin(old_port) - fault["at"], 2)
            return fault
        self.send_probes(fault)
        return fault

    def wait_sentinel_settled(self, fault: dict, timeout: float = 30.0) -> None:
        """Before a Redis fault under Sentinel: the last failover over and the replica in sync."""
        if not self.stack.sentinel:
            return
        t0 = time.monotonic()
        try:
            wait_for(self.stack.sentinel_settled, timeout=timeout, interval=0.2, message="the Sentinel group settled")
        except Exception:  # noqa: BLE001 - recorded; the fault is still injected
            fault["note"] = f"Sentinel group not settled after {timeout:.0f}s"
        fault["waited_settled_s"] = round(time.monotonic() - t0, 2)

    def kill_busy_worker(self) -> dict:
        """Slow EWS down so jobs take a while, wait until a worker is mid-job, kill -9 it, restart it."""
        self.slow_down(True)
        try:
            deliverer = Deliverer(self.stack.emulator)
            deadline = time.monotonic() + 15
            found = None
            while found is None and time.monotonic() < deadline:
                found = retrying(lambda: self.stack.busy_worker(self.stack.workers))
                if found is None:  # make sure there is work: an unrelated mail to any mailbox
                    mailbox = self.rng.choice(self.mailboxes)
                    deliverer.deliver(mailbox, unrelated(mailbox, self.rng))
                    time.sleep(0.05)
            if found is None:
                return {"victim": None, "skipped": True, "note": "no worker was busy within 15 s"}
            victim, job_id = found
            self.supervisor.hold(victim)
            victim.kill()
        finally:
            self.slow_down(False)
        threading.Timer(self.rng.uniform(1, 3), self.supervisor.release, args=(victim,)).start()
        return {"victim": victim.name, "job_id": job_id}

    def slow_down(self, on: bool) -> None:
        """Make the mail server's answers slow (so a worker is caught mid-job), or fast again."""
        self.stack.emulator.fault(kind="latency", ms=400 if on else 0)

    def run_faults(self, schedule: list[tuple[float, str]], start: float, stop: threading.Event) -> None:
        for offset, kind in schedule:
            delay = start + offset - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            try:
                fault = self.inject(kind)
            except Exception as exc:  # noqa: BLE001 - recorded in the report, never fatal
                self.errors.append(f"injecting {kind} failed: {type(exc).__name__}: {exc}")
                continue
            with self.lock:
                self.faults.append(fault)

    # -- mailbox behaviour ---------------------------------------------------------------------
    def queued_items(self) -> set[str]:
        """Item ids carried by the jobs waiting in the queue."""
        jobs = retrying(lambda: self.stack.queue().jobs)
        return {m["item_id"] for job in jobs for m in (job.args[0].get("mails") or [])}

    def deliver_batch(self, batch: list[Enrollment], deliverer: Deliverer, folder=lambda e, i: "inbox") -> dict:
        """One reply per enrollment; returns enrollment id -> item id."""
        items = {}
        for i, e in enumerate(batch):
            e.delivered.append("reply")
            items[e.id] = deliverer.deliver(e.mailbox, human_reply(e.mailbox, e.prospect, e.send_ids[0]),
                                            folder(e, i))["item_id"]
            with self.lock:
                self.delivered += 1
        return items

    def wait_queued(self, items: dict, what: str, timeout: float = 90.0) -> float | None:
        """Seconds until every item of ``items`` is in a queued job; None (and an error in the
        report) if that never happens: the drill goes on, so what it costs shows as lost replies."""
        t0 = time.monotonic()
        wanted = set(items.values())
        try:
            wait_for(lambda: wanted <= self.queued_items(), timeout=timeout, interval=0.25, message=what)
        except AssertionError:
            missing = len(wanted - self.queued_items())
            self.errors.append(f"mailbox phase: {missing} of {len(wanted)} items never queued ({what})")
            return None
        return round(time.monotonic() - t0, 1)

    def apply_fates(self, batch: list[Enrollment], items: dict) -> dict[str, str | None]:
        """What the rep does to each queued reply while no worker runs (see FATES). Returns
        enrollment id -> the reply's item id now (None when purged)."""
        emulator = self.stack.emulator
        now: dict[str, str | None] = {}
        for e in batch:
            item = items[e.id]
            if e.fate == "moved_nested":
                item = emulator.move(item, NESTED_FOLDER)["item_id"]
            elif e.fate == "moved_new":  # a folder made by this very move, two levels deep
                item = emulator.move(item, f"Projects/{e.id}/Replies")["item_id"]
            elif e.fate == "deleted":
                item = emulator.move(item, "deleteditems")["item_id"]
            elif e.fate == "hard_deleted":  # to Recoverable Items (recoverableitemsdeletions)
                item = emulator.delete(item)["item_id"]
            elif e.fate == "moved_twice":
                moved = emulator.move(item, "Later")
                item = emulator.move(moved["item_id"], "deleteditems")["item_id"]
            elif e.fate == "purged":  # gone from the mailbox: no worker can ever read it
                emulator.delete(item, purge=True)
                item = None
            now[e.id] = item
        return now

    def wait_caught_up(self, since: float, timeout: float = 120.0) -> float | None:
        """Seconds until every mailbox finished a full catch-up after ``since`` (epoch), or None."""
        t0 = time.monotonic()

        def behind() -> list[str]:
            return [m for m in self.mailboxes if (self.caught_up_at(m) or 0) <= since]

        try:
            wait_for(lambda: retrying(lambda: not behind()), timeout=timeout, interval=0.5,
                     message="every mailbox caught up")
        except AssertionError:
            late = retrying(behind)
            self.errors.append(f"mailbox phase: not every mailbox caught up within {timeout:.0f}s of the restart: "
                               f"{late[:5]}")
            return None
        return round(time.monotonic() - t0, 1)

    def caught_up_at(self, mailbox: str) -> float | None:
        """Epoch second of the mailbox's last full catch-up (the listeners' sync-state store)."""
        return SyncStore(self.stack.redis).caught_up_at(mailbox)

    def set_running(self, procs: list[Proc], running: bool, *, kill: bool = False) -> float:
        """Stop ``procs`` (SIGTERM: warm shutdown, in parallel; or kill -9) and keep the supervisor
        from restarting them, or start them again. Returns the seconds it took."""
        t0 = time.monotonic()
        if running:
            for proc in procs:
                self.supervisor.release(proc)
            return time.monotonic() - t0
        for proc in procs:
            self.supervisor.hold(proc)
        if kill:
            for proc in procs:
                proc.kill()
        else:  # one SIGTERM each: a second one would make RQ cut the running job short
            stoppers = [threading.Thread(target=proc.terminate, args=(30.0,)) for proc in procs]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join()
        return time.monotonic() - t0

    def pending_items(self) -> set[str]:
        """Item ids carried by jobs not yet done: queued, running, or waiting for a retry."""
        queue = self.stack.queue()

        def read():
            ids = (queue.get_job_ids() + StartedJobRegistry(queue=queue).get_job_ids()
                   + ScheduledJobRegistry(queue=queue).get_job_ids())
            jobs = Job.fetch_many(ids, connection=self.stack.redis, serializer=JSONSerializer)
            return {m["item_id"] for job in jobs if job is not None for m in (job.args[0].get("mails") or [])}

        return retrying(read)

    def stopped(self, batch: list[Enrollment]) -> set[str]:
        states = retrying(lambda: EnrollmentStore(self.stack.redis).get_many([e.id for e in batch]))
        return {e.id for e, state in zip(batch, states) if state and state.get("status") == "stopped"}

    def mailbox_phase(self) -> dict:
        """Two deploy drains. In the first, the reps move, delete, hard-delete and purge queued
        replies while the listeners run (batch A); the workers come back and must stop every one
        that still exists before anything else happens: no listener restart may rescue them, so
        a reply a worker finds "gone" is seen as lost. In the second, replies are queued (batch B),
        both listeners go down (one SIGTERM, one kill -9), the reps move, delete or purge batch B,
        and server-side rules file batch C into new folders; the listeners come back and catch up,
        then the workers. Every reply that still exists must stop its enrollment exactly once."""
        stack, info = self.stack, {}
        deliverer = Deliverer(stack.emulator)
        listeners, workers = list(stack.listeners), list(stack.workers)
        batch_a, batch_b, batch_c = self.batches["A"], self.batches["B"], self.batches["C"]
        # drain 1: batch A moved/deleted while queued, listeners running
        info["drain_s"] = round(self.set_running(workers, False), 1)
        items_a = self.deliver_batch(batch_a, deliverer)
        info["queued_s"] = self.wait_queued(items_a, "batch A queued")
        now_a = self.apply_fates(batch_a, items_a)
        self.set_running(workers, True)
        t_back = time.monotonic()
        info["workers_back_at"] = [time.time()]
        exists_a = [e for e in batch_a if e.fate != "purged"]
        old_ids = set(items_a.values())
        calm = 0
        while time.monotonic() - t_back < 90 and calm < 3:  # until all stopped, or every batch-A job ran
            done = len(self.stopped(exists_a)) == len(exists_a)
            calm = 3 if done else (calm + 1 if not old_ids & self.pending_items() else 0)
            time.sleep(0.3 if not done else 0)
        info["unstopped_after_jobs"] = sorted({e.id for e in exists_a} - self.stopped(exists_a))
        info["batch_a_s"] = round(time.monotonic() - t_back, 1)
        # drain 2: batch B queued; both listeners down (SIGTERM one, kill -9 the other); batch B
        # moved/deleted and batch C rule-filed into new folders meanwhile
        self.set_running(workers, False)
        items_b = self.deliver_batch(batch_b, deliverer)
        self.wait_queued(items_b, "batch B queued")
        self.set_running(listeners[:1], False)
        self.set_running(listeners[1:], False, kill=True)
        listeners_down = time.monotonic()
        self.apply_fates(batch_b, items_b)

        def rule_folder(e: Enrollment, i: int) -> str:
            path = f"Rules/{e.id}" + ("/Filed" if i % 3 == 0 else "")
            if i % 2 == 0:  # the rule made its folder first; else the delivery makes it
                stack.emulator.create_folder(e.mailbox, path)
            return path

        items_c = self.deliver_batch(batch_c, deliverer, rule_folder)
        info["listeners_down_s"] = round(time.monotonic() - listeners_down, 1)
        restarted_at = time.time()
        queued_before_restart = self.pending_items()  # e.g. a checkpoint's twin of a moved reply
        self.set_running(listeners, True)
        info["catch_up_s"] = self.wait_queued(items_c, "the rule-filed replies caught up by the listeners")
        # batch A was processed in its new folders; the restart's catch-up must not enqueue it again
        self.wait_caught_up(restarted_at)
        info["replayed_after_restart"] = len({i for i in now_a.values() if i} & (self.pending_items()
                                                                                 - queued_before_restart))
        self.set_running(workers, True)
        info["workers_back_at"].append(time.time())
        info["fates"] = dict(collections.Counter(e.fate for b in self.batches.values() for e in b))
        return info

    # -- waiting and checking ------------------------------------------------------------------
    def all_expected_done(self, store: EnrollmentStore) -> bool:
        targets = [e for e in self.everyone() if self._expected_status(e) != "active"]
        for start in range(0, len(targets), 1000):
            chunk = targets[start:start + 1000]
            for e, state in zip(chunk, store.get_many([e.id for e in chunk])):
                if not state or state["status"] != self._expected_status(e):
                    return False
        return True

    def _expected_status(self, e: Enrollment) -> str:
        if e.fate == "purged":  # its only reply exists nowhere: expected not stopped (not lost by us)
            return "active"
        kinds = set(e.delivered)
        if kinds & STOPPING:
            return "stopped"
        if kinds & PAUSING:
            return "paused"
        return "active"

    def wait_quiet(self, bound: float) -> float:
        """Until every expected transition is there and no job is queued, running or waiting to
        retry (three checks in a row), or ``bound`` seconds. Returns the seconds it took."""
        store = EnrollmentStore(self.stack.redis)
        t0 = time.monotonic()
        calm = 0
        while time.monotonic() - t0 < bound:
            try:
                backlog = self.stack.backlog()
                busy = backlog["queued"] + backlog["started"] + backlog["scheduled"]
                done = busy == 0 and self.all_expected_done(store)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                done = False
            calm = calm + 1 if done else 0
            if calm >= 3:
                break
            time.sleep(1.0)
        return time.monotonic() - t0

    def verify(self) -> dict:
        client = self.stack.redis
        store = EnrollmentStore(client)
        times = transition_times(client)
        lost, duplicated, false_stops, wrong = [], [], [], []
        everyone = self.everyone()
        known = {e.id for e in everyone}
        for start in range(0, len(everyone), 1000):
            chunk = everyone[start:start + 1000]
            states = store.get_many([e.id for e in chunk])
            pipe = client.pipeline(transaction=False)
            for e in chunk:
                pipe.lrange(keys.enrollment_history(e.id), 0, -1)
            histories = [[json.loads(h) for h in raw] for raw in pipe.execute()]
            for e, state, history in zip(chunk, states, histories):
                status = (state or {}).get("status", "active")
                want = self._expected_status(e)
                stops = [h for h in history if h["status"] == "stopped"]
                pauses = [h for h in history if h["status"] == "paused"]
                reason = SCENARIOS[e.scenario][2]
                if len(stops) > 1:
                    duplicated.append({"enrollment": e.id, "stops": len(stops)})
                pause_mails = sum(1 for k in e.delivered if k in PAUSING)
                distinct_pause_mails = len({k for k in e.delivered if k in PAUSING})  # duplicates share a Message-ID
                if len(pauses) > distinct_pause_mails and pause_mails:
                    duplicated.append({"enrollment": e.id, "pauses": len(pauses), "ooo_mails": distinct_pause_mails})
                if want == "stopped":
                    if status != "stopped":
                        lost.append({"enrollment": e.id, "scenario": e.scenario, "status": status})
                    elif stops and stops[0].get("reason") != reason:
                        wrong.append({"enrollment": e.id, "want": reason, "got": stops[0].get("reason")})
                elif stops:
                    false_stops.append({"enrollment": e.id, "scenario": e.scenario, "reason": stops[0].get("reason"),
                                        "delivered": e.delivered, **({"fate": e.fate} if e.fate else {})})
                elif want == "paused":
                    if status != "paused":
                        lost.append({"enrollment": e.id, "scenario": e.scenario, "status": status})
                    else:
                        until = (state.get("paused_until") or "")[:10]
                        expect = (e.return_date.isoformat() if e.return_date else None)
                        if expect and until != expect:
                            wrong.append({"enrollment": e.id, "want_until": expect, "got_until": until})
                        if not expect:
                            days = (dt.date.fromisoformat(until) - dt.date.today()).days if until else -1
                            if not PAUSE_DAYS - 1 <= days <= PAUSE_DAYS + 1:
                                wrong.append({"enrollment": e.id, "want_until": f"today+{PAUSE_DAYS}d", "got_until": until})
                elif pauses:
                    wrong.append({"enrollment": e.id, "scenario": e.scenario, "unexpected": "paused"})
        observed_mail = observed_pairs(client)
        recorded = collections.Counter()
        if observed_mail is not None:  # a soft bounce or receipt never recorded is a mail lost too
            for e in everyone:
                for kind in sorted({k for k in e.delivered if k in RECORDED_AS}):
                    if (e.id, RECORDED_AS[kind]) in observed_mail:
                        recorded[kind] += 1
                    else:
                        lost.append({"enrollment": e.id, "scenario": e.scenario, "unrecorded": kind})
        expected = collections.Counter(self._expected_status(e) for e in everyone)
        observed = collections.Counter(f"{data['status']}:{data['reason']}" for entries in times.values()
                                       for _, data in entries)
        strangers = sorted(set(times) - known)
        for eid in strangers:
            false_stops.append({"enrollment": eid, "note": "transition on an enrollment the drill never made"})
        # recovery: from each fault to the stop of the replies delivered right at it (or the killed job's end)
        recoveries = []
        for fault in self.faults:
            ends = []
            for eid in fault["probes"]:
                stops = [t for t, data in times.get(eid, []) if data["status"] == "stopped"]
                if stops:
                    ends.append(stops[0] - fault["at"])
            if fault.get("job_id"):
                job = Job.fetch_many([fault["job_id"]], connection=client, serializer=JSONSerializer)[0]
                if job is not None and job.ended_at:
                    ends.append(job.ended_at.replace(tzinfo=dt.UTC).timestamp() - fault["at"])
                fault["job_status"] = job.get_status() if job is not None else "expired"
            fault["recovery_s"] = round(max(ends), 2) if ends else None
            recoveries.append(fault["recovery_s"] or 0.0)
            if fault["kind"] == "failover":
                after = [t for entries in times.values() for t, _ in entries if t > fault["at"]]
                fault["flowing_s"] = round(min(after) - fault["at"], 2) if after else None
        # mailbox-behaviour phase: by fate, how many stopped; from the workers' return to the last stop
        phase = {}
        if self.batches:
            by_fate: dict[str, dict] = collections.defaultdict(lambda: {"replies": 0, "stopped": 0})
            last: dict[str, float] = {}
            for name, batch in self.batches.items():
                for e in batch:
                    stops = [t for t, data in times.get(e.id, []) if data["status"] == "stopped"]
                    by_fate[e.fate]["replies"] += 1
                    by_fate[e.fate]["stopped"] += 1 if stops else 0
                    if stops and e.fate != "purged":
                        drain = "A" if name == "A" else "BC"
                        last[drain] = max(last.get(drain, stops[0]), stops[0])
            backs = self.phase_info.get("workers_back_at") or []
            resumes = [round(last[k] - back, 2) for k, back in zip(("A", "BC"), backs) if k in last]
            phase = {"by_fate": dict(sorted(by_fate.items())),
                     "resume_to_last_stop_s": max(resumes) if len(resumes) == len(backs) == 2 else None}
            already = {x["enrollment"] for x in lost}
            for eid in self.phase_info.get("unstopped_after_jobs", []):  # the worker dropped it as gone
                if eid not in already:
                        lost.append({"enrollment": eid, "note": "not stopped after its job ran (a later catch-up hid it)"})
        backlog = self.stack.backlog()
        queue = self.stack.queue()
        failed_ids = FailedJobRegistry(queue=queue).get_job_ids()
        failed = []
        for job in Job.fetch_many(failed_ids[:20], connection=client, serializer=JSONSerializer):
            if job is not None:
                lines = (job.exc_info or "").strip().splitlines()
                failed.append({"job": job.id, "error": lines[-1] if lines else ""})
        unexplained = backlog["queued"] + backlog["started"] + backlog["scheduled"] + backlog["failed"]
        by_kind = collections.Counter(d.kind for d in self.timeline if d.item_id)
        return {
            "phase": phase,
            "purged_expected_active": sum(1 for e in everyone if e.fate == "purged"),
            "lost": len(lost), "duplicated": len(duplicated), "false_stops": len(false_stops), "wrong": len(wrong),
            "unexplained": unexplained, "backlog": backlog, "failed_jobs": failed,
            "expected_final": dict(sorted(expected.items())), "transitions": dict(sorted(observed.items())),
            "recorded": dict(recorded) if observed_mail is not None else "no el:observed stream",
            "max_recovery_s": round(max(recoveries), 2) if recoveries else None,
            "replies_by_kind": dict(sorted(by_kind.items())),
            "details": {"lost": lost[:10], "duplicated": duplicated[:10], "false_stops": false_stops[:10],
                        "wrong": wrong[:10]},
        }

    # -- all of it -----------------------------------------------------------------------------
    def run(self) -> dict:
        t_start = time.monotonic()
        self.setup()
        self.supervisor.start()
        ready_s = self.wait_ready()
        duration = len(self.timeline) / self.cfg["rate"]
        stop = threading.Event()
        start = time.monotonic()
        deliver = threading.Thread(target=self.deliver_all, args=(stop,), daemon=True)
        faults = threading.Thread(target=self.run_faults, args=(self.fault_schedule(duration), start, stop), daemon=True)
        deliver.start()
        faults.start()
        deliver.join()
        faults.join()
        for proc in self.stack.listeners + self.stack.workers:  # a restart timer may still be pending
            deadline = time.monotonic() + 10
            while not proc.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        delivered_s = time.monotonic() - start
        phase_start = time.monotonic()
        if self.batches:
            # the phase starts once every mailbox was caught up after the last Redis fault (after a
            # failover or restart the listeners catch every mailbox up): its moves are then streamed
            # and recorded as they happen, which is what a worker's relocation follows
            redis_faults = [f["at"] for f in self.faults if f["kind"] in ("failover", "restart_redis")]
            caught_up_s = self.wait_caught_up(max(redis_faults)) if redis_faults else None
            self.phase_info = self.mailbox_phase()
            self.phase_info["caught_up_before_s"] = caught_up_s
        phase_s = time.monotonic() - phase_start
        settle_s = self.wait_quiet(self.cfg["settle"])
        self.supervisor.stopping.set()
        result = self.verify()
        kinds = collections.Counter(f["kind"] for f in self.faults if not f.get("skipped"))
        failovers = [f for f in self.faults if f["kind"] == "failover"]
        report = {
            "size": self.size,
            "redis": "sentinel" if self.sentinel else "single",
            "injected": sum(kinds.values()),
            "faults": {k: kinds.get(k, 0) for k in self.fault_kinds},
            "replies": self.delivered,
            "enrollments": len(self.everyone()),
            "mailboxes": len(self.mailboxes),
            **{k: result[k] for k in ("lost", "duplicated", "false_stops", "wrong", "unexplained", "max_recovery_s")},
            "purged_expected_active": result["purged_expected_active"],
            "failover_recovery_s": max((f.get("flowing_s") or 0.0 for f in failovers), default=None),
            "failovers": [{k: f.get(k) for k in ("promoted_s", "flowing_s", "recovery_s")} for f in failovers],
            # failovers the Sentinels made: the drill's (failover, restart_redis) and any unasked one
            "sentinel_switches": len(self.stack.sentinel_switches()) if self.sentinel else None,
            "mailbox_phase": {**{k: v for k, v in self.phase_info.items()
                                 if k not in ("workers_back_at", "unstopped_after_jobs")},
                              "unstopped_after_jobs": len(self.phase_info.get("unstopped_after_jobs", [])),
                              **result["phase"]} if self.batches else None,
            "backlog": result["backlog"],
            "expected_final": result["expected_final"], "transitions": result["transitions"],
            "recorded": result["recorded"],
            "replies_by_kind": result["replies_by_kind"],
            "ready_s": round(ready_s, 1), "delivery_s": round(delivered_s, 1), "phase_s": round(phase_s, 1),
            "settle_s": round(settle_s, 1),
            "total_s": round(time.monotonic() - t_start, 1),
            "process_exits": dict(collections.Counter(e["process"].rsplit("-", 1)[0] for e in self.supervisor.exits)),
            "process_exit_codes": sorted({e["exit_code"] for e in self.supervisor.exits}),
            "recovery_by_fault": [{"kind": f["kind"], "recovery_s": f.get("recovery_s"),
                                   **{k: f[k] for k in ("flowing_s", "note", "victim_mailboxes", "taken_over_s")
                                      if f.get(k) is not None}}
                                  for f in self.faults],
            "failed_jobs": result["failed_jobs"],
            "details": result["details"],
            "errors": self.errors[:10],
            "logs": self.stack.log_dir,
        }
        return report


ONPREM_ACCOUNT = ("svc@sales.example", "svc-password")  # NTLM answers to SALES\\svc (the AD NetBIOS name)
ONPREM_LOGIN = "SALES\\svc"
THROTTLING_CODES = ("ErrorServerBusy", "ErrorExceededConnectionCount", "ErrorExceededSubscriptionCount")


class OnpremDrill(Drill):
    """The EWS drill against Exchange Server as it runs on premises (``--profile onprem``): the
    emulator accepts NTLM only (``--auth ntlm``), enforces Exchange's default throttling policy
    (``--throttling default``), answers as Exchange 2019 and serves HTTPS with a certificate from a
    test CA made at run time; the children log in with ``auth_type = "ntlm"`` as ``DOMAIN\\user``,
    trust the CA by ``ca_file`` and leave ``ews_version`` empty (exchangelib's probe).
    Every EWS fault is still injected. The report adds what the policy did: the listeners'
    reported distance from it (sampled from their status) and the refusals the children saw."""

    profile = "onprem"

    def profile_settings(self) -> dict:
        return {"auth_type": "ntlm", "ews_version": ""}

    def make_stack(self, log_dir: str, commands: dict) -> Stack:
        self.pki = make_test_pki(os.path.join(log_dir, "pki"))  # removed with the logs
        return super().make_stack(log_dir, commands)

    def profile_stack(self) -> dict:
        return {"account": ONPREM_ACCOUNT, "login": ONPREM_LOGIN, "tls": self.pki,
                "emulator_args": ("--auth", "ntlm", "--throttling", "default", "--server-version", "2019")}

    def sample_throttling(self, stop: threading.Event, seen: dict) -> None:
        """The worst of each listener's throttling fields (``status``) while the drill runs."""
        from exchange_listener.health import snapshot

        while not stop.wait(2.0):
            if self.stack.redis is None:  # the services are still starting
                continue
            try:
                listeners = snapshot(self.stack.redis, self.stack.queue_name)["listeners"]
            except (redis.exceptions.RedisError, OSError):  # Redis is restarted on purpose; sample again
                continue
            for listener in listeners:
                for name, value in (listener.get("throttling") or {}).items():
                    seen[name] = max(seen.get(name, 0), value)

    def refusals_in_logs(self) -> dict:
        """How many log lines of the listeners and workers name each throttling error code (an
        ErrorServerBusy may also be the drill's own ``server_busy`` fault)."""
        counts = dict.fromkeys(THROTTLING_CODES, 0)
        for name in os.listdir(self.stack.log_dir):
            if name.startswith(("listener-", "worker-")) and name.endswith(".log"):
                with open(os.path.join(self.stack.log_dir, name), errors="replace") as fh:
                    for line in fh:
                        for code in THROTTLING_CODES:
                            counts[code] += code in line
        return counts

    def run(self) -> dict:
        seen: dict = {}
        stop = threading.Event()
        sampler = threading.Thread(target=self.sample_throttling, args=(stop, seen), daemon=True)
        sampler.start()
        try:
            report = super().run()
        finally:
            stop.set()
        try:
            emulator_stats = self.stack.emulator.stats()
        except OSError as exc:
            emulator_stats = {"error": str(exc)}
        report["profile"] = self.profile
        report["server"] = {"auth": "ntlm", "login": ONPREM_LOGIN, "version": "2019", "tls": "test CA (ca_file)",
                            "throttling": "default", "ews_version": "probed"}
        report["throttling"] = {
            # the emulator's own refusal counters, when its /emulator/stats carries them
            "emulator": emulator_stats.get("throttling"),
            "emulator_operations": emulator_stats.get("operations"),
            "listener_status_max": seen,
            "log_lines_naming": self.refusals_in_logs(),
        }
        return report


def passed(report: dict) -> bool:
    phase = report.get("mailbox_phase")
    return (report["lost"] == 0 and report["duplicated"] == 0 and report["false_stops"] == 0 and report["wrong"] == 0
            and report["unexplained"] == 0 and all(n > 0 for n in report["faults"].values()) and not report["errors"]
            and (report["redis"] != "sentinel" or report["failover_recovery_s"] is not None)
            and (phase is None or (phase.get("resume_to_last_stop_s") is not None
                                   and phase.get("replayed_after_restart") == 0))
            # the onprem profile: the listeners stay within the default throttling policy's streaming connections
            and ((report.get("throttling") or {}).get("log_lines_naming") or {}).get("ErrorExceededConnectionCount", 0) == 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time-based; printed)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs directory")
    parser.add_argument("--plumbing", choices=["ours", "baseline"], default="ours",
                        help="baseline: run the same drill against bench/baseline.py (to see what it catches)")
    parser.add_argument("--redis", choices=["sentinel", "single"], default=None,
                        help="Redis as a Sentinel group (with the failover fault) or one server (default: by size)")
    parser.add_argument("--no-mailbox-phase", action="store_true", help="leave out the mailbox-behaviour phase")
    parser.add_argument("--profile", choices=["onprem"], default=None,
                        help="onprem: Exchange Server as it runs on premises (EWS only): NTLM only, the default "
                             "throttling policy, Exchange 2019, exchangelib's version probe (OnpremDrill)")
    parser.add_argument("--source", choices=["ews", "graph", "imap"], default="ews",
                        help="the mail source: ews (the EWS emulator, streaming), graph (the Microsoft Graph "
                             "emulator, notifications and delta; bench/graph_chaos.py) or imap (a real Dovecot, "
                             "IDLE per folder; bench/imap_chaos.py)")
    args = parser.parse_args(argv)
    if args.source in ("graph", "imap") and args.plumbing == "baseline":
        parser.error("--plumbing baseline knows EWS only")
    if args.profile and (args.source != "ews" or args.plumbing == "baseline"):
        parser.error("--profile onprem is the EWS drill of our plumbing")
    seed = args.seed if args.seed is not None else int(time.time())
    suffix = {"graph": "-graph", "imap": "-imap"}.get(args.source, "") + (f"-{args.profile}" if args.profile else "")
    log_dir = tempfile.mkdtemp(prefix=f"el-chaos-{args.size}{suffix}-")
    sentinel = None if args.redis is None else args.redis == "sentinel"
    if args.plumbing == "baseline":
        sentinel = False  # the baseline knows plain redis:// URLs only
    drill_class = Drill
    if args.source == "graph":
        # bench/ is on sys.path: this script's own directory
        from graph_chaos import GraphDrill

        drill_class = GraphDrill
    if args.source == "imap":
        from imap_chaos import ImapDrill

        drill_class = ImapDrill
    if args.profile == "onprem":
        drill_class = OnpremDrill
    drill = drill_class(args.size, seed, log_dir, args.plumbing, sentinel=sentinel, phase=not args.no_mailbox_phase)
    report: dict
    try:
        report = drill.run()
    except Exception as exc:  # noqa: BLE001 - recorded in the report, never fatal
        import traceback

        traceback.print_exc()
        report = {"size": args.size, "error": f"{type(exc).__name__}: {exc}", "injected": len(drill.faults),
                  "faults": dict(collections.Counter(f["kind"] for f in drill.faults)), "lost": None,
                  "duplicated": None, "false_stops": None, "max_recovery_s": None, "logs": log_dir}
    finally:
        drill.supervisor.stopping.set()
        drill.stack.stop()
    report["seed"] = seed
    report["plumbing"] = args.plumbing
    report["source"] = args.source
    if args.profile:
        report["profile"] = args.profile
    ok = "error" not in report and passed(report)
    report["passed"] = ok
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results", f"chaos-{args.size}{suffix}{'-baseline' if args.plumbing == 'baseline' else ''}.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    summary = {k: report.get(k) for k in ("size", "redis", "replies", "injected", "lost", "duplicated", "false_stops",
                                          "wrong", "unexplained", "max_recovery_s", "failover_recovery_s", "total_s")}
    phase = report.get("mailbox_phase") or {}
    summary.update(replayed_after_restart=phase.get("replayed_after_restart"), passed=ok)
    if args.profile:
        summary.update(profile=args.profile, throttling_log_lines=(report.get("throttling") or {}).get("log_lines_naming"))
    print("chaos drill: " + ", ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
    if ok and not args.keep_logs:
        import shutil

        shutil.rmtree(log_dir, ignore_errors=True)
        report.pop("logs", None)
    report.pop("details", None) if ok else None
    print(json.dumps(report, separators=(",", ":"), default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
