"""``make demo``: the whole product on one machine, under supervisord, in well under a minute.

Starts Redis, the EWS emulator (``--source ews``, the default), the Microsoft Graph emulator
(``--source graph``: Exchange Online, its listener's notification receiver the emulator POSTs
to) or a real Dovecot (``--source imap``: the IMAP source's IDLE connections; the demo runs the
mail server itself, as the world would, not under supervisord), a listener and two workers with
the shipped supervisord configuration
(deploy/demo/supervisord.conf), records one send per enrollment, delivers a reply of every kind
to the rep's mailbox, and prints what happened to each enrollment and how long it took from
delivery. The Salesforce emulator runs too, with a Contact or Lead per
prospect: the workers log each reply, bounce and out-of-office there as a Task, and a second
table shows them. Exits 0 only if every outcome and activity is the expected one; always shuts
supervisord and everything it started down, also on Ctrl-C or an error.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import demo_messages as demo
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from emulators.dovecot import Dovecot, find_dovecot
from emulators.services import (
    free_port,
    redis_server_binary,
    wait_for,
    wait_for_port,
)
from exchange_listener import health
from exchange_listener.core import keys, redis_conn
from exchange_listener.queueing import make_queue
from exchange_listener.sources.imap.scan import item_id as imap_item_id

if TYPE_CHECKING:
    import redis

    from workers.state.enrollments import EnrollmentStore

CONF = ROOT / "deploy" / "demo" / "supervisord.conf"
QUEUE = "exchange-listener"
SALESFORCE_USER = "exchange-listener@northwind.example"
SALESFORCE_CLIENT_ID = "3MVG9demo-consumer-key"
# The Graph emulator's application (deploy/demo/supervisord.conf starts it with the same three)
GRAPH_TENANT = "northwind-tenant"
GRAPH_CLIENT_ID = "demo-graph-app"
GRAPH_CLIENT_SECRET = "demo-graph-secret"
SOURCES = {"ews": "the EWS emulator (Exchange on-premises, streaming notifications)",
           "graph": "the Microsoft Graph emulator (Exchange Online, change notifications + delta)",
           "imap": "a real Dovecot (IMAP IDLE on INBOX and the \\Junk folder, master-user login)"}
# Dovecot's master user the IMAP listener and workers log in as (``rep*master``): the demo's only
IMAP_MASTER_USER = "master"
IMAP_MASTER_PASSWORD = "demo-master-secret"
DOVECOT_MISSING = ("--source imap runs a real Dovecot 2.3, which is not installed: "
                   "apt-get install dovecot-imapd (Debian/Ubuntu; the demo starts its own server, "
                   "no system one is needed)")


class Stop(Exception):
    """SIGTERM: tear down as for Ctrl-C."""


def say(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:5.1f}s] {message}", flush=True)


class Demo:
    def __init__(self, workdir: Path, timeout: float, source: str = "ews"):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
        self.source = source
        self.workdir = workdir
        self.run_dir = workdir / "run"
        if len(str(self.run_dir / "supervisor.sock")) > 100:  # a Unix socket path must stay under ~107 bytes
            self.run_dir = Path(tempfile.gettempdir()) / f"el-demo-{os.getuid()}"
        self.log_dir = workdir / "log"
        self.settings_path = workdir / "settings.toml"
        self.timeout = timeout
        self.bin = Path(sys.executable).parent
        self.started = time.monotonic()
        self.redis_port = free_port()
        self.emulator_port = free_port()
        self.salesforce_port = free_port()
        self.api_port = free_port()  # deploy/programs.conf runs the HTTP API too
        self.graph_port = free_port()  # Graph (http) and its token host (https, CA in graph_ca)
        self.graph_token_port = free_port()
        self.notification_port = free_port()  # the Graph listener's receiver the emulator POSTs to
        self.imap_port = free_port()
        self.dovecot: Dovecot | None = None  # --source imap: started and stopped by the demo itself
        self.dovecot_pid_file = workdir / "dovecot.pid"
        self.inbox_uidvalidity = 0  # the item ids of what the demo APPENDs name it
        self.graph_ca = workdir / "graph-ca.pem"
        self.salesforce_key = workdir / "salesforce.key"
        self.salesforce_cert = workdir / "salesforce.crt"
        self.env: dict[str, str] = {}

    # -- processes ---------------------------------------------------------------------
    def command(self, name: str) -> str:
        found = self.bin / name
        if found.exists():
            return str(found)
        other = shutil.which(name)
        if not other:
            raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH: run `make install`")
        return other

    def supervisorctl(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.command("supervisorctl"), "-c", str(CONF), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def el(self, *args: str) -> str:
        done = subprocess.run([self.command("exchange-listener"), *args, "--config", str(self.settings_path)],
                              env=self.env, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"exchange-listener {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("*.log"):
            old.unlink()
        self.graph_ca.unlink(missing_ok=True)  # the emulator writes it anew; its presence says it is up
        self.settings_path.write_text(
            f"# Written by tools/demo.py for one demo run (source {self.source}).\n"
            f'redis_url = "redis://127.0.0.1:{self.redis_port}/0"\n'
            "# the demo's Redis keeps nothing on disk (deploy/demo/supervisord.conf): fine for a demo only\n"
            "allow_volatile_redis = true\n"
            + (self._graph_settings() if self.source == "graph" else
               self._imap_settings() if self.source == "imap" else
               f'ews_url = "http://127.0.0.1:{self.emulator_port}/EWS/Exchange.asmx"\n'
               'auth_type = "basic"\news_username = "svc"\news_password = "svc-password"\n')
            + "heartbeat_seconds = 5.0\nlease_seconds = 10.0\nworker_ttl = 15\n"
            'log_format = "json"\n'
            f'api_listen = "127.0.0.1:{self.api_port}"\n'
            f'salesforce_login_url = "http://127.0.0.1:{self.salesforce_port}"\n'
            f'salesforce_client_id = "{SALESFORCE_CLIENT_ID}"\nsalesforce_username = "{SALESFORCE_USER}"\n'
            f'salesforce_private_key_file = "{self.salesforce_key}"\n'
        )
        _key_and_certificate(self.salesforce_key, self.salesforce_cert)
        self.env = {  # the demo's own settings file decides; stray EXCHANGE_LISTENER_* would override it
            **{k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")},
            "EL_BIN": str(Path(self.command("exchange-listener")).parent),
            "EL_RUN_DIR": str(self.run_dir),
            "EL_LOG_DIR": str(self.log_dir),
            "EL_REDIS_SERVER": redis_server_binary(),
            "EL_REDIS_PORT": str(self.redis_port),
            "EL_EMULATOR_PORT": str(self.emulator_port),
            "EL_SALESFORCE_PORT": str(self.salesforce_port),
            "EL_SALESFORCE_CERT": str(self.salesforce_cert),
            # supervisord expands every %(ENV_X)s of its file, also the programs it does not start
            "EL_EMULATOR_AUTOSTART": "true" if self.source == "ews" else "false",
            "EL_GRAPH_AUTOSTART": "true" if self.source == "graph" else "false",  # imap: neither
            "EL_GRAPH_PORT": str(self.graph_port),
            "EL_GRAPH_TOKEN_PORT": str(self.graph_token_port),
            "EL_GRAPH_CA_FILE": str(self.graph_ca),
            "EL_DEMO_MAILBOX": demo.MAILBOX,
            "EXCHANGE_LISTENER_CONFIG": str(self.settings_path),
        }
        self.shutdown(quiet=True)  # a demo left running by a killed earlier run

    def _imap_settings(self) -> str:
        """The IMAP listener's and workers' settings: the demo's Dovecot on loopback (no TLS), its
        master user, the default folders (INBOX and the \\Junk special-use folder)."""
        return (
            'source = "imap"\n'
            f'imap_host = "{Dovecot.host}"\nimap_port = {self.imap_port}\n'
            "# loopback only: no TLS for the demo's Dovecot\n"
            'imap_security = "none"\nimap_auth = "master"\n'
            f'imap_username = "{IMAP_MASTER_USER}"\nimap_password = "{IMAP_MASTER_PASSWORD}"\n'
        )

    def start_dovecot(self) -> None:
        """A real Dovecot under the workdir with the rep's mailbox as a user (its pid kept in the
        workdir, so a later run takes down one a killed run left behind)."""
        self.dovecot = Dovecot(self.workdir / "dovecot", port=self.imap_port, master_user=IMAP_MASTER_USER,
                               master_password=IMAP_MASTER_PASSWORD)
        self.dovecot.add_user(demo.MAILBOX)
        self.dovecot.start()
        if self.dovecot.proc is not None:
            self.dovecot_pid_file.write_text(f"{self.dovecot.proc.pid}\n")
        say(f"dovecot {self.dovecot.version.split()[0]} on {self.dovecot.host}:{self.dovecot.port} "
            f"with the mailbox {demo.MAILBOX} (INBOX, Junk)", self.started)

    def stop_dovecot(self, quiet: bool = False) -> None:
        """Stop the demo's Dovecot and every process of its group; drop its runtime dir."""
        if self.dovecot is not None:
            if not quiet and self.dovecot.alive():
                say("stopping dovecot", self.started)
            self.dovecot.stop()
            shutil.rmtree(self.dovecot.run_dir, ignore_errors=True)  # sockets and mail homes (under /tmp)
            self.dovecot = None
        elif self.dovecot_pid_file.exists():  # one a killed earlier run left: its own process group
            text = self.dovecot_pid_file.read_text().strip()
            if text.isdigit() and _is_dovecot(int(text)):
                try:
                    os.killpg(int(text), signal.SIGKILL)
                except OSError:
                    pass
            # and its runtime dir (mail homes, sockets): the base_dir its config names, under /tmp
            conf = self.workdir / "dovecot" / "dovecot.conf"
            found = re.search(r"^base_dir = (.+)/base$", conf.read_text(), re.MULTILINE) if conf.exists() else None
            if found and Path(found.group(1)).name.startswith("el-dc-"):
                shutil.rmtree(found.group(1), ignore_errors=True)
        self.dovecot_pid_file.unlink(missing_ok=True)

    def _graph_settings(self) -> str:
        """The Graph listener's and workers' settings: the emulator's Graph and token host, the
        app's credentials, and the listener's notification receiver."""
        token_url = f"https://127.0.0.1:{self.graph_token_port}/{GRAPH_TENANT}/oauth2/v2.0/token"
        return (
            'source = "graph"\n'
            f'graph_url = "http://127.0.0.1:{self.graph_port}/v1.0"\n'
            f'token_url = "{token_url}"\n'
            f'tenant_id = "{GRAPH_TENANT}"\nclient_id = "{GRAPH_CLIENT_ID}"\nclient_secret = "{GRAPH_CLIENT_SECRET}"\n'
            "# the emulator's token host is HTTPS with a CA certificate it writes at start\n"
            f'ca_file = "{self.graph_ca}"\n'
            f'notification_url = "http://127.0.0.1:{self.notification_port}/graph/notify"\n'
            f'notification_listen = "127.0.0.1:{self.notification_port}"\n'
        )

    def start(self) -> None:
        say(f"source: {self.source}, {SOURCES[self.source]}", self.started)
        if self.source == "imap":
            self.start_dovecot()  # before the listener: it connects at once
        emulator = {"graph": "graph emulator, ", "imap": ""}.get(self.source, "emulator, ")
        say(f"starting supervisord ({CONF.relative_to(ROOT)}): redis, {emulator}salesforce emulator, listener, "
            "2 workers", self.started)
        subprocess.run([self.command("supervisord"), "-c", str(CONF)], env=self.env, check=True, timeout=30)
        wait_for_port(self.redis_port, timeout=15)
        if self.source == "graph":
            wait_for_port(self.graph_port, timeout=15)
            wait_for_port(self.graph_token_port, timeout=15)
            # the listener and workers read it at their first token request (once the mailbox is added)
            wait_for(self.graph_ca.exists, timeout=15, message=f"the graph emulator's CA certificate {self.graph_ca}")
        elif self.source == "ews":
            wait_for_port(self.emulator_port, timeout=15)
        wait_for_port(self.salesforce_port, timeout=15)
        self.salesforce("POST", "/emulator/records/User", {"Username": SALESFORCE_USER, "LastName": "Integration"})
        for index, s in enumerate(demo.SCENARIOS):  # every other prospect is a Lead, the rest Contacts
            kind = "Lead" if index % 2 else "Contact"
            self.salesforce("POST", f"/emulator/records/{kind}", {"Email": s.to[0], "LastName": s.to[0].split("@")[0],
                                                                  **({"Company": s.to[0].split("@")[1]}
                                                                     if kind == "Lead" else {})})
        say(f"salesforce emulator: the integration user and {len(demo.SCENARIOS)} prospects' Contacts and Leads",
            self.started)

    def salesforce(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.salesforce_port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def shutdown(self, quiet: bool = False) -> None:
        """Stop supervisord and everything under it (the listener logs out of Dovecot), then the
        demo's Dovecot; wait until every pid is gone."""
        try:
            self._shutdown_supervisord(quiet)
        finally:
            self.stop_dovecot(quiet)

    def _shutdown_supervisord(self, quiet: bool) -> None:
        pid_file = self.run_dir / "supervisord.pid"
        pid = int(pid_file.read_text().strip()) if pid_file.exists() and pid_file.read_text().strip().isdigit() else None
        if pid is None or not _alive(pid):
            return
        if not quiet:
            say("shutting down supervisord and every process it started", self.started)
        try:
            self.supervisorctl("shutdown", timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):  # supervisord did not stop: take its process group down
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass

    # -- the scenario ------------------------------------------------------------------
    def wait_subscribed(self, conn: redis.Redis) -> None:
        """Until a listener holds the mailbox and is subscribed: EWS, its streaming connection is
        open; Graph, its subscription is made (in Redis and in the listener's heartbeat) and the
        first delta catch-up, which follows it, is done; IMAP, the heartbeat's ``imap`` shows an
        IDLE connection up for every watched folder."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            raw = conn.get(keys.lease(demo.MAILBOX))
            holder = raw.decode() if isinstance(raw, bytes) else raw
            if holder:
                snap = health.snapshot(conn, QUEUE)
                for listener in snap["listeners"]:
                    if listener["id"] != holder:
                        continue
                    if self.source == "ews" and any(g["connected"] for g in listener["groups"]):
                        say(f"listener {listener['id']} holds {demo.MAILBOX} and its stream is open", self.started)
                        return
                    imap = listener.get("imap") or {}
                    if (self.source == "imap" and imap.get("folders", 0) >= 1
                            and imap.get("connected") == imap.get("folders")):
                        say(f"listener {listener['id']} holds {demo.MAILBOX} and IDLEs on its "
                            f"{imap['folders']} folders", self.started)
                        return
                    graph = listener.get("graph") or {}
                    if (self.source == "graph" and graph.get("mode") == "notifications"
                            and (graph.get("subscriptions") or 0) >= 1
                            and conn.hget(keys.graph_subscription(demo.MAILBOX), "id")
                            and conn.hget(keys.graph_delta(demo.MAILBOX), "@caught_up") is not None):
                        say(f"listener {listener['id']} holds {demo.MAILBOX}, its Graph subscription is made and "
                            "its first delta catch-up done", self.started)
                        return
            time.sleep(0.2)
        raise RuntimeError(f"no listener subscribed {demo.MAILBOX} within {self.timeout:.0f}s (see {self.log_dir})")

    def deliver(self, raw: bytes) -> tuple[str, float]:
        """Deliver one message to the rep's inbox; (the item id the listener will give it, when)."""
        if self.dovecot is not None:
            sent_at = time.time()
            uid = self.dovecot.append(demo.MAILBOX, raw, folder="INBOX")
            return imap_item_id("INBOX", self.inbox_uidvalidity, uid), sent_at
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.graph_port if self.source == 'graph' else self.emulator_port}"
            f"/emulator/mailboxes/{demo.MAILBOX}/messages?folder=inbox",
            data=raw, method="POST", headers={"Content-Type": "message/rfc822"})
        sent_at = time.time()  # the pipeline may finish before the emulator's answer is read
        with urllib.request.urlopen(req, timeout=10) as resp:
            item_id = json.loads(resp.read())["item_id"]
        return item_id, sent_at

    def processed_items(self, conn: redis.Redis) -> tuple[set[str], list[str]]:
        """Item ids of every finished job, and the errors of failed ones."""
        queue = make_queue(conn, QUEUE)
        done: set[str] = set()
        errors: list[str] = []
        for registry, failed in ((FinishedJobRegistry(queue=queue), False), (FailedJobRegistry(queue=queue), True)):
            for job in Job.fetch_many(registry.get_job_ids(), connection=conn, serializer=JSONSerializer):
                if job is None or not job.args or not isinstance(job.args[0], dict):
                    continue
                if failed:
                    errors.append(f"job {job.id} failed: {(job.exc_info or '').strip().splitlines()[-1:]}")
                else:
                    done.update(m.get("item_id") for m in job.args[0].get("mails", []))
        return done, errors

    def play(self) -> int:
        from exchange_listener.mail.message_ids import new_message_id
        from workers.state.enrollments import EnrollmentStore, enrollment_key

        conn = redis_conn.connect(f"redis://127.0.0.1:{self.redis_port}/0")
        self.el("mailboxes", "add", demo.MAILBOX, "--source", self.source)
        say(f"watching {demo.MAILBOX} (exchange-listener mailboxes add --source {self.source})", self.started)
        self.wait_subscribed(conn)

        send_ids = {}
        for s in demo.SCENARIOS:
            send_ids[s.enrollment] = new_message_id("northwind.example")
            args = ["sends", "record", "--message-id", send_ids[s.enrollment], "--enrollment", s.enrollment,
                    "--sequence", demo.SEQUENCE, "--mailbox", demo.MAILBOX]
            for address in s.to:
                args += ["--to", address]
            for address in s.cc:
                args += ["--cc", address]
            self.el(*args)
        say(f"recorded {len(send_ids)} sends (exchange-listener sends record)", self.started)

        if self.dovecot is not None:
            self.inbox_uidvalidity = self.dovecot.uidvalidity(demo.MAILBOX, "INBOX")
        now = dt.datetime.now(dt.UTC)
        delivered = {}
        for s in demo.SCENARIOS:
            delivered[s.enrollment] = self.deliver(s.build(s, send_ids[s.enrollment], now))
        target = {"graph": "the graph emulator", "imap": "dovecot (IMAP APPEND)"}.get(self.source, "the emulator")
        say(f"delivered {len(delivered)} messages to {target}; waiting for the workers", self.started)

        store = EnrollmentStore(conn)
        deadline = time.monotonic() + self.timeout
        errors: list[str] = []
        while True:
            states = dict(zip(delivered, store.get_many(delivered)))
            done, errors = self.processed_items(conn)
            settled = all(item in done for item, _ in delivered.values()) and all(
                (states[s.enrollment] or {}).get("status") == s.expect_status for s in demo.SCENARIOS)
            if settled or errors or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        changed_ms = {e: conn.hget(enrollment_key(e), "updated_at_ms") for e in delivered}
        activities = self.wait_activities(store, deadline)
        say("outcomes:", self.started)
        print()
        outcome = self.report(states, delivered, changed_ms, done, errors, now)
        return self.report_salesforce(activities) or outcome

    def expects_activity(self, s: demo.Scenario) -> bool:
        """A reply, bounce or out-of-office is logged in Salesforce; a read receipt or unrelated mail is not."""
        return s.expect_status in ("stopped", "paused")

    def wait_activities(self, store: EnrollmentStore, deadline: float) -> dict[str, list[dict]]:
        """Enrollment -> the Tasks Salesforce holds for its transitions, once every expected one is
        there (or the deadline passed); a little longer, so an unexpected one would show too."""
        while True:
            tasks = self.salesforce("GET", "/emulator/records/Task")["records"]
            by_transition = {t["ExchangeListener_Transition_Id__c"]: t for t in tasks}
            found = {s.enrollment: [by_transition[t.id] for t in store.transitions(s.enrollment) if t.id in by_transition]
                     for s in demo.SCENARIOS}
            if all(found[s.enrollment] for s in demo.SCENARIOS if self.expects_activity(s)):
                time.sleep(0.5)
                return found if len(self.salesforce("GET", "/emulator/records/Task")["records"]) == len(tasks) \
                    else self.wait_activities(store, deadline)
            if time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def report_salesforce(self, activities: dict[str, list[dict]]) -> int:
        records = {r["Id"]: (kind, r) for kind in ("Contact", "Lead")
                   for r in self.salesforce("GET", f"/emulator/records/{kind}")["records"]}
        rows = [("PROSPECT", "SALESFORCE RECORD", "ACTIVITY", "ENROLLMENT", "AS EXPECTED")]
        failures = []
        for s in demo.SCENARIOS:
            tasks = activities[s.enrollment]
            if tasks:
                kind, record = records.get(tasks[0]["WhoId"], ("?", {}))
                where = f"{kind} {record.get('Id', tasks[0]['WhoId'])}"
                what = "; ".join(f"Task \"{t['Subject'].split(':')[0]}\"" for t in tasks)
            else:
                where, what = "-", "none"
            wrong_record = bool(tasks) and (records.get(tasks[0]["WhoId"], ("", {}))[1].get("Email") != s.to[0])
            ok = (len(tasks) == 1 if self.expects_activity(s) else not tasks) and not wrong_record
            rows.append((s.to[0], where, what, s.enrollment, "yes" if ok else "NO"))
            if not ok:
                failures.append(f"{s.enrollment} ({s.label}): salesforce activities {what} on {where}")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print("Salesforce (the workers' third channel, on the prospect's Contact or Lead):")
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        print()
        for line in failures:
            print(f"UNEXPECTED: {line}")
        if failures:
            print(f"logs of every process: {self.log_dir}")
            return 1
        say(f"salesforce: {sum(map(self.expects_activity, demo.SCENARIOS))} activities as expected, none for the "
            "others", self.started)
        return 0

    def report(self, states: dict[str, dict | None], delivered: dict[str, tuple[str, float]],
               changed_ms: dict[str, Any], done: set[str], errors: list[str], now: dt.datetime) -> int:
        rows = [("ENROLLMENT", "SCENARIO", "STATUS", "REASON", "DELIVERY->CHANGE", "AS EXPECTED")]
        failures = []
        for s in demo.SCENARIOS:
            state = states[s.enrollment] or {}
            item_id, delivered_at = delivered[s.enrollment]
            status, reason = state.get("status") or "?", state.get("reason") or "-"
            if status == "paused" and state.get("paused_until"):
                reason = f"{reason}, until {state['paused_until'][:10]}"
            changed = int(state.get("version") or 0) > 0
            if changed and changed_ms[s.enrollment]:
                latency = f"{(int(changed_ms[s.enrollment]) / 1000 - delivered_at) * 1000:.0f} ms"
            else:
                latency = "unchanged"
            problems = []
            if s.expect_status == "active":
                if changed or status != "active":
                    problems.append(f"expected unchanged (active), got {status}/{reason}")
                elif item_id not in done:
                    problems.append("its message was never processed")
            elif status != s.expect_status:
                problems.append(f"expected {s.expect_status}, got {status}")
            elif s.expect_reason and state.get("reason") != s.expect_reason:
                problems.append(f"expected reason {s.expect_reason}, got {state.get('reason')}")
            elif s.expect_status == "paused":
                want = demo.return_date(now).isoformat()
                if not (state.get("paused_until") or "").startswith(want):
                    problems.append(f"expected a pause until {want}, got {state.get('paused_until')}")
            rows.append((s.enrollment, s.label, status, reason, latency, "yes" if not problems else "NO"))
            failures += [f"{s.enrollment} ({s.label}): {p}" for p in problems]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        print()
        for line in errors + failures:
            print(f"UNEXPECTED: {line}")
        if errors or failures:
            print(f"logs of every process: {self.log_dir}")
            return 1
        say(f"all {len(rows) - 1} outcomes as expected", self.started)
        return 0


def _key_and_certificate(key_path: Path, cert_path: Path) -> None:
    """The demo's connected-app key pair: an RSA key and a self-signed certificate for it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exchange-listener demo")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7)).sign(key, hashes.SHA256()))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _is_dovecot(pid: int) -> bool:
    """Whether ``pid`` is a live Dovecot master (a pid file may outlive its process)."""
    try:
        return b"dovecot" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "var" / "demo"), help="settings, sockets and logs (default: var/demo)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each stage")
    parser.add_argument("--source", choices=sorted(SOURCES), default="ews",
                        help="the mail source: ews (the EWS emulator, default), graph (the Microsoft Graph "
                             "emulator) or imap (a real Dovecot: apt-get install dovecot-imapd)")
    args = parser.parse_args(argv)
    if args.source == "imap" and find_dovecot() is None:
        print(f"demo cannot start: {DOVECOT_MISSING}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    run = Demo(Path(args.workdir).resolve(), args.timeout, args.source)
    try:
        run.prepare()
        run.start()
        return run.play()
    except (KeyboardInterrupt, Stop):
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a clear line, the logs' location, and still a clean teardown
        print(f"demo failed: {exc}\nlogs of every process: {run.log_dir}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        run.shutdown()


if __name__ == "__main__":
    sys.exit(main())
