"""Gmail's ways, against a real Dovecot made to speak Gmail's X-GM-EXT-1 (tests/gmail_proxy.py):
a message is in every folder its labels name — INBOX, a label, All Mail — each time under another
UID, and its X-GM-MSGID is the same everywhere. The listener must make one job of it, not one per
label, and the reply must stop its enrollment once; the rep's own sent mail and drafts, which All
Mail holds too (labelled \\Sent, \\Draft), are never taken for incoming mail."""
from __future__ import annotations

import imaplib
import time

import mail_samples as mail
import pytest
from gmail_proxy import SENT_KEYWORD, GmailProxy
from test_imap_listener import REP, System, wait_for

from exchange_listener import queueing
from exchange_listener.core import keys
from exchange_listener.listener import mailboxes
from exchange_listener.mail.message_ids import normalize


@pytest.fixture
def system(redis_server, redis_client, dovecot, tmp_path):
    dovecot.add_users([REP])
    dovecot.create_folder(REP, "All Mail", special_use="\\All")
    dovecot.create_folder(REP, "Prospects")
    sys_ = System(redis_server, redis_client, dovecot, tmp_path)
    yield sys_
    for proc in sys_.procs:
        proc.stop()


def copy(dovecot, uid: int, dst: str) -> None:
    """Another label on the same message: an IMAP COPY keeps Dovecot's X-GUID (the proxy's X-GM-MSGID)."""
    conn = imaplib.IMAP4(dovecot.host, dovecot.port)
    try:
        conn.login(f"{REP}*{dovecot.master_user}", dovecot.master_password)
        conn.select("INBOX")
        typ, _ = conn.uid("COPY", str(uid), f'"{dst}"')
        assert typ == "OK"
    finally:
        conn.logout()


def queued_with(conn, message_id: str) -> int:
    """Mails on the queue (not yet worked) carrying this Message-ID."""
    return sum(1 for job in queueing.make_queue(conn, "exchange-listener").jobs
               for m in job.args[0]["mails"] if m.get("message_id") == message_id)


def test_one_message_under_several_labels_is_one_job(system, tmp_path):
    dovecot = system.dovecot
    with GmailProxy(dovecot.host, dovecot.port) as proxy:
        mailboxes.add(system.redis, [REP], source="imap")
        # INBOX and a label IDLE; the sweep (every renewal: 2 s) reads All Mail, as on Gmail
        system.start("listen", name="listener", imap_port=proxy.port, imap_folders="INBOX,Prospects",
                     imap_idle_seconds=2)
        wait_for(lambda: system.watching(2), message="INBOX and the label watched through the proxy")
        sent = system.send("e-labels")
        raw = mail.reply(sender="pat@prospect.example", to=REP, in_reply_to=sent, references=sent)
        message_id = normalize(mail_header(raw, "Message-ID"))
        uid = dovecot.append(REP, raw)
        copy(dovecot, uid, "Prospects")
        copy(dovecot, uid, "All Mail")
        cursors = keys.imap_cursor(REP)
        wait_for(lambda: all(system.redis.hget(cursors, f) for f in ("INBOX", "Prospects", "All Mail")),
                 message="INBOX, the label and All Mail all read")
        wait_for(lambda: queued_with(system.redis, message_id) >= 1, message="the reply queued")
        # the rep answers in the thread from an alias (Gmail keeps it in All Mail, labelled \Sent)
        # and leaves a draft there: never incoming mail, though they reply to our send
        own = mail.reply(sender="rep.alias@ours.example", to="pat@prospect.example", in_reply_to=sent,
                         references=sent)
        dovecot.append(REP, own, folder="All Mail", flags=SENT_KEYWORD)
        draft = mail.reply(sender="rep.alias@ours.example", to="pat@prospect.example", in_reply_to=sent,
                           references=sent)
        dovecot.append(REP, draft, folder="All Mail", flags="\\Draft")
        own_ids = {normalize(mail_header(own, "Message-ID")), normalize(mail_header(draft, "Message-ID"))}
        # two more renewals with their sweeps: still one job for the three copies, none for the rest
        wait_for(lambda: system.imap_info().get("connected") == 2, message="still connected")
        time.sleep(4.5)
        assert queued_with(system.redis, message_id) == 1
        assert all(queued_with(system.redis, i) == 0 for i in own_ids)

        system.start("work", "--name", "gmail-worker", name="worker", imap_port=proxy.port)
        wait_for(lambda: system.stopped("e-labels"), message="the reply stopped its enrollment")
        assert system.once("e-labels")


def mail_header(raw: bytes, name: str) -> str:
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(name.lower().encode() + b":"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"no {name} header")
