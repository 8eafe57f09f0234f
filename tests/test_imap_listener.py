"""The IMAP source end to end: a real Dovecot, a real redis-server, a real `exchange-listener
listen` with source = imap (IDLE per folder) and a real `exchange-listener work`.

Replies reach the inbox and the Junk folder (found by its special-use flag) while the listener
IDLEs, while no listener runs, while Dovecot is killed and restarted, after the rep's connections
are cut mid-IDLE, after the folder was recreated (a new UIDVALIDITY); one mailbox refusing its
login disturbs no other. Every reply stops its enrollment exactly once, and no flag of the rep's
mail is ever changed.
"""
from __future__ import annotations

import functools
import imaplib
import json
import os
import subprocess
import sys

import mail_samples as mail
import pytest

from emulators.services import CliProcess, wait_for
from exchange_listener.core import keys
from exchange_listener.listener import mailboxes
from workers.state.enrollments import EnrollmentStore
from workers.state.sends import SendRegistry

REP = "rep@ours.example"
OTHER = "other@ours.example"
PROSPECT = "pat@prospect.example"
wait_for = functools.partial(wait_for, timeout=45.0, interval=0.05)


class System:
    def __init__(self, redis_server, redis_client, dovecot, tmp_path):
        self.redis, self.dovecot, self.tmp_path = redis_client, dovecot, tmp_path
        self.redis_url = redis_server.url
        self.sends, self.enrollments = SendRegistry(redis_client), EnrollmentStore(redis_client)
        self.procs: list[CliProcess] = []

    def env(self, **settings) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_LISTENER_")}
        base = {"redis_url": self.redis_url, "log_format": "json", "lease_seconds": 3, "listener_id": "i1",
                "source": "imap", "imap_host": self.dovecot.host, "imap_port": self.dovecot.port,
                "imap_security": "none", "imap_auth": "master", "imap_username": self.dovecot.master_user,
                "imap_password": self.dovecot.master_password, "checkpoint_seconds": 2}
        base.update(settings)
        env.update({f"EXCHANGE_LISTENER_{k.upper()}": str(v) for k, v in base.items()})
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, *args, name: str, **settings) -> CliProcess:
        proc = CliProcess(args, self.env(**settings), self.tmp_path / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def run(self, *, worker: bool = True, **settings) -> CliProcess:
        """Watch REP through a listener (and a worker), both with ``settings``; returns the listener
        once both of REP's folders are in IDLE."""
        mailboxes.add(self.redis, [REP], source="imap")
        listener = self.start("listen", name="listener", **settings)
        if worker:
            self.start("work", "--name", "imap-worker", name="worker", **settings)
        wait_for(lambda: self.watching(2), message="INBOX and Junk watched")
        return listener

    def imap_info(self, listener_id: str = "i1") -> dict:
        raw = self.redis.hget(keys.listener(listener_id), "imap")
        return json.loads(raw) if raw else {}

    def watching(self, folders: int, listener_id: str = "i1") -> bool:
        info = self.imap_info(listener_id)
        return info.get("folders") == folders and info.get("connected") == folders

    def send(self, enrollment: str, mailbox: str = REP) -> str:
        message_id = mail.new_id("ours.example")
        self.sends.record([message_id], enrollment, "seq-imap", mailbox, to=[PROSPECT])
        return message_id

    def reply(self, enrollment: str, mailbox: str = REP, folder: str = "INBOX") -> int:
        message_id = self.send(enrollment, mailbox)
        raw = mail.reply(sender=PROSPECT, to=mailbox, in_reply_to=message_id, references=message_id)
        return self.dovecot.append(mailbox, raw, folder=folder)

    def stopped(self, *enrollments: str) -> bool:
        return all((self.enrollments.get(e) or {}).get("status") == "stopped" for e in enrollments)

    def once(self, *enrollments: str) -> bool:
        return all(len(self.enrollments.history(e)) == 1 for e in enrollments)


@pytest.fixture
def system(redis_server, redis_client, dovecot, tmp_path):
    dovecot.add_users([REP, OTHER])
    sys_ = System(redis_server, redis_client, dovecot, tmp_path)
    yield sys_
    for proc in sys_.procs:
        proc.stop()
    for address in (REP, OTHER):
        dovecot.allow_login(address)


def flags(dovecot, address: str, folder: str) -> list[bytes]:
    """Every message's FLAGS in ``folder``, read-only (EXAMINE), as the harness's master user."""
    conn = imaplib.IMAP4(dovecot.host, dovecot.port)
    try:
        conn.login(f"{address}*{dovecot.master_user}", dovecot.master_password)
        conn.select(f'"{folder}"', readonly=True)
        _typ, data = conn.fetch("1:*", "(FLAGS)")
        return [d for d in data if isinstance(d, bytes)]
    finally:
        conn.logout()


def test_replies_in_the_inbox_and_junk_stop_their_enrollments_once_and_leave_flags_untouched(system):
    system.run()

    system.reply("e-inbox")
    system.reply("e-junk", folder="Junk")  # the folder with the \Junk special-use flag
    wait_for(lambda: system.stopped("e-inbox", "e-junk"), message="both replies stopped their enrollments")
    assert system.once("e-inbox", "e-junk")
    for folder in ("INBOX", "Junk"):
        seen = flags(system.dovecot, REP, folder)
        assert seen and not any(b"\\Seen" in f for f in seen), (folder, seen)  # BODY.PEEK: never marked read


def test_mail_that_came_while_no_listener_ran_is_read_from_the_cursor(system):
    listener = system.run()
    system.reply("e-before")
    wait_for(lambda: system.stopped("e-before"), message="first reply stopped")
    assert listener.terminate() == 0

    # while no listener runs: replies, and a reply the rep files away before any listener saw it
    system.reply("e-gap-1")
    system.reply("e-gap-2", folder="Junk")
    filed = system.reply("e-gap-filed")
    system.dovecot.move(REP, filed, "INBOX", "Customers")
    system.start("listen", name="listener")
    # the one filed away before any listener saw it is found by the sweep of the other folders
    wait_for(lambda: system.stopped("e-gap-1", "e-gap-2", "e-gap-filed"), message="replies from the gap stopped")
    assert system.once("e-before", "e-gap-1", "e-gap-2", "e-gap-filed")


def test_replies_a_rule_files_elsewhere_or_a_burst_all_stop_without_waiting_for_a_renewal(system):
    """Rule-filed mail is found by the sweep at the next renewal (2 s here); a burst into the
    inbox, some of it announced while the listener was reading the rest, needs no renewal at all."""
    system.run(imap_idle_seconds=2)
    system.reply("e-filed", folder="Customers/Filed by rule")
    wait_for(lambda: system.stopped("e-filed"), message="the rule-filed reply stopped")

    burst = [f"e-burst-{i}" for i in range(15)]
    system.procs[0].terminate()
    system.start("listen", name="listener", imap_idle_seconds=600)  # no renewal comes to the rescue
    wait_for(lambda: system.watching(2), message="watching again")
    for enrollment in burst:
        system.reply(enrollment)
    wait_for(lambda: system.stopped(*burst), timeout=20.0, message="every reply of the burst stopped")
    assert system.once("e-filed", *burst)


def test_a_reply_moved_before_a_worker_ran_is_found_where_it_went(system):
    system.run(worker=False)
    moved, trashed = system.reply("e-moved"), system.reply("e-trashed")
    wait_for(lambda: system.redis.llen("rq:queue:exchange-listener") >= 1, message="enqueued")
    wait_for(lambda: system.redis.hget(keys.imap_cursor(REP), "INBOX") is not None
             and int(system.redis.hget(keys.imap_cursor(REP), "INBOX").split(b":")[1]) >= trashed,
             message="both read")
    system.dovecot.move(REP, moved, "INBOX", "Customers/Acme")
    system.dovecot.move(REP, trashed, "INBOX", "Trash")
    system.start("work", "--name", "imap-worker", name="worker")
    wait_for(lambda: system.stopped("e-moved", "e-trashed"), message="moved replies stopped their enrollments")
    assert system.once("e-moved", "e-trashed")


def test_dovecot_killed_and_restarted_and_connections_cut_mid_idle_lose_nothing(system):
    system.run()

    # the rep's connections cut mid-IDLE (doveadm kick: BYE and close); mail right after it
    assert system.dovecot.kick(REP) >= 2
    system.reply("e-after-kick")
    wait_for(lambda: system.stopped("e-after-kick"), message="reply after the cut stopped")

    # the server crashes; mail arrives as it comes back, before the listener reconnected
    system.dovecot.kill()
    system.dovecot.start()
    system.reply("e-after-crash")
    system.reply("e-after-crash-junk", folder="Junk")
    wait_for(lambda: system.stopped("e-after-crash", "e-after-crash-junk"), message="replies after the crash stopped")
    wait_for(lambda: system.watching(2), message="watching again")
    system.reply("e-later")
    wait_for(lambda: system.stopped("e-later"), message="a reply after recovery stopped")
    assert system.once("e-after-kick", "e-after-crash", "e-after-crash-junk", "e-later")


def test_a_recreated_inbox_new_uidvalidity_reads_it_again_without_acting_twice(system):
    listener = system.run()
    system.reply("e-old")
    wait_for(lambda: system.stopped("e-old"), message="first reply stopped")
    before = system.dovecot.uidvalidity(REP)

    assert listener.terminate() == 0
    system.dovecot.recreate_folder(REP, "INBOX")  # its mail re-appended under new UIDs
    assert system.dovecot.uidvalidity(REP) != before
    system.reply("e-new")
    system.start("listen", name="listener")
    wait_for(lambda: system.stopped("e-new"), message="reply in the recreated inbox stopped")
    wait_for(lambda: int(system.redis.hget(keys.imap_cursor(REP), "INBOX").split(b":")[0]) != before,
             message="cursor on the new UIDVALIDITY")
    assert system.once("e-old", "e-new")


def test_a_mailbox_that_refuses_login_is_reported_and_disturbs_no_other(system):
    mailboxes.add(system.redis, [REP, OTHER], source="imap")
    system.dovecot.refuse_login(OTHER)
    system.start("listen", name="listener")
    system.start("work", "--name", "imap-worker", name="worker")
    wait_for(lambda: system.imap_info().get("failing_count") == 2, message="both folders of the refused mailbox failing")
    wait_for(lambda: system.imap_info().get("connected") == 2, message="the other mailbox watched")
    failing = system.imap_info()["failing"]
    assert {f["mailbox"] for f in failing} == {OTHER}
    assert all("refused" in f["error"] for f in failing), failing
    assert all(system.dovecot.master_password not in f["error"] for f in failing)

    shown = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "status"], env=system.env(),
                           capture_output=True, text=True, timeout=30, check=False).stdout
    assert "IMAP: 2/4 folders in IDLE" in shown, shown
    assert f"{OTHER} INBOX: the IMAP server refused to log in as {OTHER}" in shown, shown

    system.reply("e-rep")
    system.reply("e-other", mailbox=OTHER)  # waits on the server until OTHER can log in again
    wait_for(lambda: system.stopped("e-rep"), message="the healthy mailbox's reply stopped")
    assert not system.stopped("e-other")
    system.dovecot.allow_login(OTHER)
    wait_for(lambda: system.stopped("e-other"), timeout=60.0, message="the reply waiting for the login stopped")
    wait_for(lambda: system.imap_info().get("failing_count") == 0, message="nothing failing any more")
    logs = "".join(p.log_path.read_text() for p in system.procs)
    assert system.dovecot.master_password not in logs
