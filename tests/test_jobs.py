"""handle_mail in-process against the emulator (real HTTP, exchangelib) and a real redis-server."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import time

import mail_samples as mail
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulators.services import wait_for
from exchange_listener import queueing
from exchange_listener.core import config
from exchange_listener.mail.message_ids import normalize
from exchange_listener.sources import ledger
from exchange_listener.sources.base import NewMail
from exchange_listener.sources.ews.fetch import EwsFetcher, FetchError
from workers import context, jobs
from workers.classify import KINDS

MAILBOX = "rep@ours.example"
OTHER_MAILBOX = "sam@ours.example"
PROSPECT = "pat@prospect.example"
COLLEAGUE = "chris@prospect.example"
CCD = "cam@prospect.example"
CALLED: list[dict] = []


def record_transition(transition: dict) -> None:
    """The callable named in settings.callback: the platform's side of option (3)."""
    CALLED.append(transition)


@pytest.fixture
def ctx(redis_server, redis_client, emulator):
    CALLED.clear()
    settings = config.load(env={}, overrides={
        "redis_url": redis_server.url, "ews_url": emulator.ews_url, "ews_username": "svc",
        "ews_password": "svc-password", "callback": f"{__name__}:record_transition", "pause_days": 7})
    current = context.configure(settings)
    current.emulator = emulator
    yield current
    current.close()


def send(ctx, enrollment: str, *, to=PROSPECT, cc=()) -> str:
    message_id = mail.new_id("ours.example")
    ctx.sends.record([message_id], enrollment, "seq-1", MAILBOX, to=[to], cc=list(cc))
    return message_id


def deliver(ctx, *raws: bytes) -> dict:
    """Deliver to the mailbox and run one job for the new items, as the listener would enqueue it."""
    items = [ctx.emulator.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    mails = [NewMail(MAILBOX, item_id, "inbox", time.time()) for item_id in items]
    return jobs.handle_mail(queueing.payload(mails))


def state(ctx, enrollment: str) -> dict:
    return ctx.enrollments.get(enrollment)


def test_reply_from_prospect_colleague_or_ccd_person_stops_with_reason_replied(ctx):
    direct, via_refs, via_cc = send(ctx, "e-direct"), send(ctx, "e-refs"), send(ctx, "e-cc", cc=[CCD])
    summary = deliver(
        ctx,
        mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=direct, references=direct),
        # a colleague writing from another address; only References names our send (Exchange commas)
        mail.reply(sender=COLLEAGUE, to=MAILBOX, in_reply_to=None, references=f"<older@x.example>, {via_refs}"),
        mail.reply(sender=CCD, to=MAILBOX, in_reply_to=via_cc, references=via_cc),
    )
    assert [i["kind"] for i in summary["items"]] == ["human_reply"] * 3
    assert summary["transitions"] == 3 and summary["unmatched"] == 0
    for enrollment, who in (("e-direct", PROSPECT), ("e-refs", COLLEAGUE), ("e-cc", CCD)):
        got = state(ctx, enrollment)
        assert (got["status"], got["reason"], got["by"]) == ("stopped", "replied", who)
        assert got["mailbox"] == MAILBOX and got["item_id"]
    assert sorted(t["enrollment_id"] for t in CALLED) == ["e-cc", "e-direct", "e-refs"]
    json.dumps(summary)  # the summary is what RQ stores: JSON-safe


def test_out_of_office_pauses_until_its_return_date_and_never_stops(ctx):
    sent = send(ctx, "e-ooo")
    back = dt.date.today() + dt.timedelta(days=20)  # from the clock: a fixed date would pass one day
    summary = deliver(ctx, mail.out_of_office(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                              return_text=f"I will be back on {back.day} {back:%B %Y}."))
    assert summary["items"][0]["kind"] == "auto_reply"
    got = state(ctx, "e-ooo")
    assert (got["status"], got["reason"]) == ("paused", "auto_reply")
    assert got["paused_until"].startswith(back.isoformat())
    # a second auto-reply stating no date: a pause never turns into a stop
    deliver(ctx, mail.out_of_office(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, return_text=""))
    assert state(ctx, "e-ooo")["status"] == "paused"
    # the human answer after the holiday does stop it
    deliver(ctx, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent))
    assert (state(ctx, "e-ooo")["status"], state(ctx, "e-ooo")["reason"]) == ("stopped", "replied")


def test_out_of_office_without_a_date_pauses_for_pause_days(ctx):
    sent = send(ctx, "e-ooo2")
    deliver(ctx, mail.out_of_office(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, return_text=""))
    got = state(ctx, "e-ooo2")
    until = dt.datetime.fromisoformat(got["paused_until"])
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(days=7)
    assert got["status"] == "paused" and abs((until - expected).total_seconds()) < 120


def test_hard_bounce_stops_soft_bounce_and_cc_bounce_are_only_recorded(ctx):
    hard, soft, cc_only = send(ctx, "e-hard"), send(ctx, "e-soft"), send(ctx, "e-ccb", cc=[CCD])
    summary = deliver(
        ctx,
        mail.dsn(to=MAILBOX, failed=PROSPECT, original_id=hard),
        mail.dsn(to=MAILBOX, failed=PROSPECT, original_id=soft, status="4.2.2", action="delayed"),
        mail.dsn(to=MAILBOX, failed=CCD, original_id=cc_only),
    )
    assert [(i["kind"], i.get("bounce_type")) for i in summary["items"]] == [
        ("bounce", "hard"), ("bounce", "soft"), ("bounce", "hard")]
    assert (state(ctx, "e-hard")["status"], state(ctx, "e-hard")["reason"]) == ("stopped", "bounced")
    assert state(ctx, "e-soft")["status"] == "active"
    assert state(ctx, "e-ccb")["status"] == "active"
    observed = [json.loads(f[b"data"]) for _id, f in ctx.redis.xrange(jobs.OBSERVED_KEY)]
    assert {(o["enrollment_id"], o["kind"]) for o in observed} == {("e-soft", "soft_bounce"), ("e-ccb", "bounce_of_cc")}


def test_receipt_and_unrelated_mail_leave_state_alone_complaint_stops(ctx):
    sent, spam = send(ctx, "e-rr"), send(ctx, "e-spam")
    summary = deliver(ctx, mail.read_receipt(sender=PROSPECT, to=MAILBOX, original_id=sent),
                      mail.unrelated(to=MAILBOX), mail.complaint(to=MAILBOX, original_id=spam))
    kinds = [i["kind"] for i in summary["items"]]
    assert kinds[0] == "read_receipt" and kinds[2] == "complaint"
    assert summary["items"][1]["matched"] == [] and summary["unmatched"] == 1
    got = state(ctx, "e-rr")
    assert (got["status"], got["version"]) == ("active", 0)
    assert (state(ctx, "e-spam")["status"], state(ctx, "e-spam")["reason"]) == ("stopped", "complaint")
    assert [t["enrollment_id"] for t in CALLED] == ["e-spam"]


def test_the_same_mail_twice_makes_one_transition(ctx):
    sent = send(ctx, "e-dup")
    raw = mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent)
    first = deliver(ctx, raw, raw)  # two items, one job
    second = deliver(ctx, raw)  # and again later, as a new item
    again = jobs.handle_mail(queueing.payload([NewMail(MAILBOX, first["items"][0]["item_id"], "inbox", 0.0)]))  # replay
    assert first["transitions"] == 1 and second["transitions"] == 0 and again["transitions"] == 0
    assert len(ctx.enrollments.history("e-dup")) == 1
    assert len(CALLED) == 1


def test_domain_policy_stops_every_enrollment_sent_to_the_domain(ctx):
    sent = send(ctx, "e-a")
    send(ctx, "e-b", to="blair@prospect.example")
    send(ctx, "e-free", to="someone@gmail.com")
    deliver(ctx, mail.reply(sender=COLLEAGUE, to=MAILBOX, in_reply_to=sent, references=sent))
    assert state(ctx, "e-b")["status"] == "active"  # policy off by default

    send(ctx, "e-c", to="casey@prospect.example")
    sent2 = send(ctx, "e-d", to="dana@prospect.example")
    context.configure(ctx.settings.replace(stop_whole_domain=True)).emulator = ctx.emulator
    deliver(ctx, mail.reply(sender=COLLEAGUE, to=MAILBOX, in_reply_to=sent2, references=sent2))
    current = context.get()
    assert current.enrollments.get("e-d")["reason"] == "replied"
    assert (current.enrollments.get("e-c")["status"], current.enrollments.get("e-c")["reason"]) == ("stopped", "domain_replied")
    assert current.enrollments.get("e-b")["status"] == "stopped"
    # a reply from a free-mail address says nothing about anyone else at gmail.com
    sent3 = send(ctx, "e-free2", to="other@gmail.com")
    deliver(ctx, mail.reply(sender="other@gmail.com", to=MAILBOX, in_reply_to=sent3, references=sent3))
    assert current.enrollments.get("e-free2")["reason"] == "replied"
    assert current.enrollments.get("e-free")["status"] == "active"


def test_mail_from_the_mailbox_itself_or_a_copy_of_our_send_is_skipped(ctx):
    sent = send(ctx, "e-own")
    own = mail.reply(sender=MAILBOX, to=PROSPECT, in_reply_to=sent, references=sent)
    copy = mail.reply(sender="assistant@ours.example", to=PROSPECT, in_reply_to=None, references=None,
                      subject="Quick question about your pipeline", message_id=sent)
    summary = deliver(ctx, own, copy)
    assert [i.get("skipped") for i in summary["items"]] == ["sent by the mailbox itself", "a copy of one of our sends"]
    assert state(ctx, "e-own")["status"] == "active"


def test_gone_items_are_skipped_and_the_others_processed(ctx):
    sent = send(ctx, "e-gone")
    item_id = ctx.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                       references=sent))["item_id"]
    mails = [NewMail(MAILBOX, "AAMkAGdvbmU=", "inbox", 0.0), NewMail(MAILBOX, item_id, "inbox", 0.0)]
    summary = jobs.handle_mail(queueing.payload(mails))
    assert summary["gone"] == 1 and summary["transitions"] == 1


def test_a_job_of_several_mailboxes_delivers_every_transition_once_it_is_done(ctx):
    sent = send(ctx, "e-here")
    theirs = mail.new_id("ours.example")
    ctx.sends.record([theirs], "e-there", "seq-1", OTHER_MAILBOX, to=[COLLEAGUE])
    here = ctx.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                    references=sent))["item_id"]
    there = ctx.emulator.deliver(OTHER_MAILBOX, mail.reply(sender=COLLEAGUE, to=OTHER_MAILBOX, in_reply_to=theirs,
                                                           references=theirs))["item_id"]
    summary = jobs.handle_mail(queueing.payload([NewMail(MAILBOX, here, "inbox", time.time()),
                                                 NewMail(OTHER_MAILBOX, there, "inbox", time.time())]))
    assert summary["transitions"] == 2
    # the callback ran before the job returned, for both mailboxes' transitions
    assert sorted((t["enrollment_id"], t["mailbox"]) for t in CALLED) == [("e-here", MAILBOX), ("e-there", OTHER_MAILBOX)]


@pytest.mark.parametrize("payload, message", [
    (None, "object"),
    ({"mailbox": "not-an-address", "mails": [{"item_id": "x"}]}, "mailbox"),
    ({"mailbox": MAILBOX, "mails": []}, "non-empty list"),
    ({"mailbox": MAILBOX, "mails": [{"item_id": ""}]}, "item_id"),
    ({"mailbox": MAILBOX, "mails": [{"item_id": "x", "mailbox": "other@ours.example"}]}, "another mailbox"),
    ({"mailbox": MAILBOX, "source": "pop3", "mails": [{"item_id": "x"}]}, "unknown mail source"),
    ({"mailboxes": [MAILBOX, "not-an-address"], "mails": [{"item_id": "x", "mailbox": MAILBOX}]}, "mailboxes"),
    ({"mailboxes": [MAILBOX, OTHER_MAILBOX], "mails": [{"item_id": "x"}]}, "needs a mailbox"),
    ({"mailboxes": [MAILBOX, OTHER_MAILBOX], "mails": [{"item_id": "x", "mailbox": "third@ours.example"}]},
     "another mailbox"),
    ({"mailboxes": [MAILBOX, OTHER_MAILBOX], "source": "pop3",
      "mails": [{"item_id": "x", "mailbox": MAILBOX}, {"item_id": "y", "mailbox": OTHER_MAILBOX}]}, "unknown mail source"),
])
def test_a_bad_payload_fails_with_a_clear_error(ctx, payload, message):
    with pytest.raises(ValueError, match=message):
        jobs.handle_mail(payload)


def test_exchange_trouble_fails_the_job_for_rq_to_retry(ctx):
    sent = send(ctx, "e-busy")
    item_id = ctx.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                       references=sent))["item_id"]
    payload = queueing.payload([NewMail(MAILBOX, item_id, "inbox", 0.0)])
    ctx.emulator.fault(kind="server_busy", count=1, back_off_ms=10)
    with pytest.raises(FetchError):
        jobs.handle_mail(payload)
    assert state(ctx, "e-busy")["status"] == "active"
    assert jobs.handle_mail(payload)["transitions"] == 1  # the retry


def test_hostile_input_never_crashes_the_job(ctx):
    sent = send(ctx, "e-hostile")
    broken_mime = (b"From: x@prospect.example\r\nTo: rep@ours.example\r\nSubject: Re: hi\r\n"
                   b"Message-ID: <broken@prospect.example>\r\nIn-Reply-To: <nothing@ours.example>\r\n"
                   b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"nope\r\n\r\n"
                   b"--nope\r\nContent-Type: message/delivery-status\r\n\r\nStatus: 5.\xff\xfe\r\n")
    latin1_body = (b"From: Rene <latin@prospect.example>\r\nTo: rep@ours.example\r\nSubject: Re: cafe\r\n"
                   b"Message-ID: <latin1@prospect.example>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                   b"Merci, caf\xe9 cr\xe8me \xff\xfe\r\n")
    no_message_id = mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=None, references=None)
    no_message_id = b"\r\n".join(l for l in no_message_id.split(b"\r\n") if not l.startswith(b"Message-ID:"))
    injection = mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to="<x@y.example>\r\nBcc: victim@x.example",
                           references=None, subject="Re: hi\r\nX-Injected: yes")
    many = " ".join(f"<id{n}@thread.example>" for n in range(10_000))
    huge_refs = mail.reply(sender=COLLEAGUE, to=MAILBOX, in_reply_to=None, references=f"{sent} {many}")
    summary = deliver(ctx, broken_mime, latin1_body, no_message_id, injection, huge_refs)
    assert len(summary["items"]) == 5 and summary["gone"] == 0
    assert [i["kind"] for i in summary["items"]][1:] == ["human_reply"] * 4  # readable despite the damage
    assert summary["items"][0]["kind"] in KINDS
    assert summary["items"][3]["matched"] == []  # the injected header did not smuggle an id in
    assert state(ctx, "e-hostile")["status"] == "stopped"  # the 10,000-id References still matched


def test_raw_8bit_header_bytes_are_read_and_do_not_hold_the_others_back(ctx):
    """8-bit bytes in headers (no RFC 2047 encoding): the server returns them as text and the
    job processes every item of the batch."""
    sent = send(ctx, "e-8bit")
    eight_bit = (b"From: \xe9\xe8 <latin@prospect.example>\r\nTo: rep@ours.example\r\nSubject: Re: caf\xe9\r\n"
                 b"Message-ID: <latin2@prospect.example>\r\n\r\nbody\r\n")
    good = mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent)
    summary = deliver(ctx, eight_bit, good)
    assert len(summary["items"]) == 2
    assert state(ctx, "e-8bit")["status"] == "stopped"


def test_under_rq_a_bad_payload_fails_at_once_and_exchange_trouble_is_retried(ctx, redis_client):
    from rq.registry import FailedJobRegistry, ScheduledJobRegistry

    from workers.worker import make_worker

    sent = send(ctx, "e-rq")
    item_id = ctx.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                       references=sent))["item_id"]
    queue = queueing.make_queue(redis_client, ctx.settings.queue_name)
    bad = queue.enqueue(queueing.JOB_FUNC, {"mailbox": MAILBOX, "mails": "nope"}, retry=queueing.retry_policy(5))
    ctx.emulator.fault(kind="server_busy", count=1, back_off_ms=10)
    busy = queueing.enqueue_new_mail(queue, [NewMail(MAILBOX, item_id, "inbox", 0.0)])
    make_worker(ctx.settings).work(burst=True)
    assert bad.get_status(refresh=True) == "failed" and bad.id in FailedJobRegistry(queue=queue)
    assert "payload.mails" in bad.latest_result().exc_string
    assert busy.get_status(refresh=True) == "scheduled" and busy.id in ScheduledJobRegistry(queue=queue)
    assert state(ctx, "e-rq")["status"] == "active"


def test_under_rq_the_job_timeout_is_enforced_in_process(ctx, redis_client):
    from rq.registry import ScheduledJobRegistry

    from workers.worker import make_worker

    sent = send(ctx, "e-slow")
    item_id = ctx.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                       references=sent))["item_id"]
    queue = queueing.make_queue(redis_client, ctx.settings.queue_name)
    ctx.emulator.fault(kind="latency", ms=15_000)
    try:
        job = queueing.enqueue_new_mail(queue, [NewMail(MAILBOX, item_id, "inbox", 0.0)], job_timeout=2)
        started = time.monotonic()
        make_worker(ctx.settings).work(burst=True)
        elapsed = time.monotonic() - started
    finally:
        ctx.emulator.fault(kind="latency", ms=0)
    assert elapsed < 12, f"the job ran {elapsed:.1f}s past its 2 s timeout"
    assert job.get_status(refresh=True) == "scheduled" and job.id in ScheduledJobRegistry(queue=queue)  # retried later
    assert jobs.handle_mail(job.args[0])["transitions"] == 1  # the retry succeeds (fresh sessions)


def test_a_reply_naming_several_steps_of_one_sequence_acts_once(ctx):
    step1 = mail.new_id("ours.example")
    step2 = mail.new_id("ours.example")
    ctx.sends.record([step1], "e-steps", "seq-1", MAILBOX, to=[PROSPECT])
    ctx.sends.record([step2], "e-steps", "seq-1", MAILBOX, to=[PROSPECT])
    summary = deliver(ctx, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=step2, references=f"{step1} {step2}"))
    assert summary["items"][0]["matched"] == ["e-steps"]
    assert summary["items"][0]["actions"] == [{"enrollment_id": "e-steps", "action": "stopped", "reason": "replied",
                                               "applied": True}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
payload_like = st.fixed_dictionaries(
    {}, optional={"mailbox": st.one_of(st.just(MAILBOX), json_values), "source": st.one_of(st.just("ews"), json_values),
                  "mailboxes": st.one_of(st.just([MAILBOX, OTHER_MAILBOX]), json_values),
                  "mails": st.one_of(st.lists(st.one_of(st.fixed_dictionaries(
                      {"item_id": st.one_of(st.text(min_size=1, max_size=30), json_values)},
                      optional={"seen_at": json_values, "via": json_values,
                                "mailbox": st.one_of(st.sampled_from([MAILBOX, OTHER_MAILBOX]), json_values),
                                "folder": json_values, "extra": json_values}), json_values), max_size=3), json_values)})


@given(st.one_of(json_values, payload_like))
@settings(max_examples=300, deadline=None)
def test_any_json_payload_is_accepted_or_refused_with_invalid_payload(payload):
    try:
        source, groups = jobs._validate(payload)
    except jobs.InvalidPayload as exc:
        assert str(exc).startswith("payload")
    else:
        assert isinstance(source, str) and groups
        for mailbox, mails in groups:
            assert "@" in mailbox and mails
            assert all(m.mailbox.lower() == mailbox.lower() and m.item_id for m in mails)


HEADER_NAMES = ["From", "To", "Cc", "Subject", "Message-ID", "In-Reply-To", "References", "Content-Type",
                "Auto-Submitted", "Return-Path", "X-Failed-Recipients", "Precedence", "X-Autoreply"]
header_values = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["<>", "auto-replied", "multipart/report; report-type=delivery-status; boundary=b",
                     "multipart/report; report-type=disposition-notification", "MAILER-DAEMON@x.example",
                     "Re: hello", "Automatic reply: out", "=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "<a@b> <c@d>, e@f"]),
)


@given(headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values), max_size=8),
       body=st.binary(max_size=300), cite_send=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_delivered_mail_completes_or_fails_visibly(ctx, headers, body, cite_send):
    sent = "<prop-send@ours.example>"
    if not ctx.sends.lookup_many([sent]):
        ctx.sends.record([sent], "e-prop", "seq-1", MAILBOX, to=[PROSPECT])
    lines = [f"{name}: {' '.join(value.split())}" for name, value in headers]  # one line each: no accidental body
    if cite_send:
        lines.append(f"References: {sent}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    if not raw.strip():
        raw = b"X-Empty: 1\r\n\r\n"
    summary = deliver(ctx, raw)  # any mail the server accepted is processed: a failure would retry forever
    (item,) = summary["items"]
    assert item["kind"] in KINDS
    if cite_send and not item.get("skipped"):
        assert item["matched"] == ["e-prop"]  # whatever else the headers say, the reply to our send is found
    json.dumps(summary)


# -- time: a mail acts only on sends that precede it; one decision per Message-ID --------------
MAILBOX2 = "rep2@ours.example"


def dated(raw: bytes, when: dt.datetime | None) -> bytes:
    """The same mail with its Date header set to ``when`` (None: no Date header at all)."""
    lines = [line for line in raw.split(b"\r\n") if not line.startswith(b"Date:")]
    if when is not None:
        lines.insert(1, f"Date: {when.strftime('%a, %d %b %Y %H:%M:%S +0000')}".encode())
    return b"\r\n".join(lines)


def run_job(mailbox: str, item_id: str) -> dict:
    return jobs.handle_mail(queueing.payload([NewMail(mailbox, item_id, "inbox", time.time())]))


def record(ctx, enrollment: str, to: str, sent_at: dt.datetime) -> str:
    message_id = mail.new_id("ours.example")
    ctx.sends.record([message_id], enrollment, "seq-1", MAILBOX, to=[to], sent_at=sent_at)
    return message_id


def decision(summary: dict) -> list[tuple]:
    return sorted((a["enrollment_id"], a["action"], a.get("reason")) for a in summary["items"][0]["actions"])


def test_a_reply_does_not_act_on_a_send_made_after_it_was_written(ctx):
    now = dt.datetime.now(dt.UTC)
    sent = record(ctx, "e-later", PROSPECT, now)
    # written two hours ago (it sat in an outbox): it cannot answer a send made just now
    summary = deliver(ctx, dated(mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent),
                                 now - dt.timedelta(hours=2)))
    assert summary["items"][0]["actions"] == [{"enrollment_id": "e-later", "action": "none",
                                               "reason": "sent_after_reply"}]
    assert state(ctx, "e-later")["status"] == "active" and CALLED == []


def test_the_same_reply_in_two_mailboxes_makes_one_decision(ctx):
    """Issue 10's report: a reply-all reaches a second rep's mailbox seconds later, and an
    enrollment created in between must not be stopped by the second copy."""
    context.configure(ctx.settings.replace(stop_whole_domain=True)).emulator = ctx.emulator
    current = context.get()
    hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    sent = record(current, "e-a", PROSPECT, hour_ago)
    record(current, "e-b", "blair@prospect.example", hour_ago)
    raw = dated(mail.reply(sender=COLLEAGUE, to=MAILBOX, cc=MAILBOX2, in_reply_to=sent, references=sent),
                dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30))
    copy_a = ctx.emulator.deliver(MAILBOX, raw)["item_id"]
    copy_b = ctx.emulator.deliver(MAILBOX2, raw)["item_id"]
    first = run_job(MAILBOX, copy_a)
    record(current, "e-late", "dana@prospect.example", dt.datetime.now(dt.UTC))  # between the two copies
    second = run_job(MAILBOX2, copy_b)
    assert decision(first) == decision(second) == [("e-a", "stopped", "replied"), ("e-b", "stopped", "domain_replied")]
    assert second["items"][0]["decision"] == "reused" and second["transitions"] == 0
    assert current.enrollments.get("e-late")["status"] == "active"
    assert [current.enrollments.get(e)["reason"] for e in ("e-a", "e-b")] == ["replied", "domain_replied"]


def test_without_a_date_the_first_copy_received_sets_the_time_for_every_copy(ctx):
    """A copy processed before its send was recorded decides nothing (no match); the copy that
    matches later still takes the mail's time from the first copy's receipt, not its own."""
    context.configure(ctx.settings.replace(stop_whole_domain=True)).emulator = ctx.emulator
    current = context.get()
    sent = mail.new_id("ours.example")  # the platform records this send late
    raw = dated(mail.reply(sender=COLLEAGUE, to=MAILBOX, cc=MAILBOX2, in_reply_to=sent, references=sent), None)
    copy_a = ctx.emulator.deliver(MAILBOX, raw)["item_id"]
    first = run_job(MAILBOX, copy_a)
    after_a = dt.datetime.now(dt.UTC)
    assert first["unmatched"] == 1
    wait_for(lambda: dt.datetime.now(dt.UTC).replace(microsecond=0) > after_a, timeout=5, interval=0.05,
             message="the clock past the first copy's second")
    current.sends.record([sent], "e-a2", "seq-1", MAILBOX, to=[PROSPECT],
                         sent_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    record(current, "e-mid", "dana@prospect.example", dt.datetime.now(dt.UTC))  # after copy A arrived
    copy_b = ctx.emulator.deliver(MAILBOX2, raw)["item_id"]
    second = run_job(MAILBOX2, copy_b)
    assert dt.datetime.fromisoformat(second["items"][0]["reply_time"]) <= after_a
    assert decision(second) == [("e-a2", "stopped", "replied")]
    assert current.enrollments.get("e-mid")["status"] == "active"


def test_copies_processed_in_any_order_make_one_decision(ctx):
    """The copy a worker gets to first decides, whichever mailbox it is in; an auto-reply's pause
    is the same length for every copy."""
    sent = send(ctx, "e-ooo-two")
    raw = mail.out_of_office(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, return_text="")
    copy_a, copy_b = ctx.emulator.deliver(MAILBOX, raw)["item_id"], ctx.emulator.deliver(MAILBOX2, raw)["item_id"]
    first = run_job(MAILBOX2, copy_b)
    paused_until = state(ctx, "e-ooo-two")["paused_until"]
    second = run_job(MAILBOX, copy_a)
    assert decision(first) == decision(second) == [("e-ooo-two", "paused", "auto_reply")]
    assert second["items"][0]["decision"] == "reused" and "decision" not in first["items"][0]
    assert state(ctx, "e-ooo-two")["paused_until"] == paused_until and len(ctx.enrollments.history("e-ooo-two")) == 1


# -- issue 9: a reply counts wherever it is; processed mail is remembered ----------------------
def gone_count(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("el_items_gone_total", {"outcome": outcome}) or 0.0


def processed(ctx, mailbox: str, message_id: str | None, item_id: str) -> bool:
    identity = ledger.identity(normalize(message_id), item_id)
    return identity in ctx.ledger.processed(mailbox, [identity])


def test_a_reply_moved_before_the_worker_came_is_processed_where_it_is_now(ctx):
    sent = send(ctx, "e-moved")
    reply_id = mail.new_id()
    item_id = ctx.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                       references=sent, message_id=reply_id))["item_id"]
    moved = ctx.emulator.move(item_id, "deleteditems")["item_id"]
    ctx.ledger.record_moves(MAILBOX, [(item_id, moved)])  # what the listener does with the MovedEvent
    before = gone_count("relocated")
    summary = run_job(MAILBOX, item_id)
    (item,) = summary["items"]
    assert item["relocated"] is True and item["item_id"] == item_id and item["relocated_item_id"] == moved
    assert summary["gone"] == 0 and not item.get("gone")
    assert (state(ctx, "e-moved")["status"], state(ctx, "e-moved")["item_id"]) == ("stopped", moved)
    assert gone_count("relocated") == before + 1
    assert processed(ctx, MAILBOX, reply_id, item_id)


def test_a_mail_that_exists_nowhere_is_reported_not_marked_processed(ctx):
    from structlog.testing import capture_logs

    sent = send(ctx, "e-nowhere")
    reply_id = mail.new_id()
    item_id = ctx.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent,
                                                       references=sent, message_id=reply_id))["item_id"]
    ctx.emulator.delete(item_id)  # hard delete, and no move recorded: nothing leads to it
    before = gone_count("nowhere")
    with capture_logs() as logs:
        summary = run_job(MAILBOX, item_id)
    (item,) = summary["items"]
    assert summary["gone"] == 1 and item["gone"] is True and item["gone_reason"]
    assert gone_count("nowhere") == before + 1
    assert [e for e in logs if e["event"] == "mail exists nowhere" and e["log_level"] == "warning"]
    assert not processed(ctx, MAILBOX, reply_id, item_id)
    assert state(ctx, "e-nowhere")["status"] == "active"


def test_every_decided_mail_is_marked_processed_and_a_failed_one_is_not(ctx):
    sent, receipt_for = send(ctx, "e-led"), send(ctx, "e-led-rr")
    ids = [mail.new_id() for _ in range(4)]
    raws = [mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent, message_id=ids[0]),  # acted
            mail.unrelated(to=MAILBOX, message_id=ids[1]),  # unmatched
            mail.reply(sender=MAILBOX, to=PROSPECT, in_reply_to=sent, references=sent, message_id=ids[2]),  # skipped
            mail.read_receipt(sender=PROSPECT, to=MAILBOX, original_id=receipt_for, message_id=ids[3])]  # recorded
    items = [ctx.emulator.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    payload = queueing.payload([NewMail(MAILBOX, i, "inbox", time.time()) for i in items])
    ctx.emulator.fault(kind="server_busy", count=len(items) + 1, back_off_ms=10)  # the batch and each retry of it
    with pytest.raises(FetchError):
        jobs.handle_mail(payload)
    assert not any(processed(ctx, MAILBOX, m, i) for m, i in zip(ids, items))
    summary = jobs.handle_mail(payload)
    assert [i.get("skipped") for i in summary["items"]][2] == "sent by the mailbox itself"
    assert [processed(ctx, MAILBOX, m, i) for m, i in zip(ids, items)] == [True] * 4


# -- issue 10 point 4: read the text only for mail that matched a send -------------------------
class CountingFetcher(EwsFetcher):
    """The real fetcher, counting the body reads (every call goes to the emulator unchanged)."""

    def __init__(self, settings):
        super().__init__(settings)
        self.mime_reads: list[str] = []

    def fetch_mime(self, mailbox, item_id):
        self.mime_reads.append(item_id)
        return super().fetch_mime(mailbox, item_id)

    def fetch_text(self, mailbox, item_id):  # a body read too (UniqueBody), far smaller than the MIME
        self.mime_reads.append(item_id)
        return super().fetch_text(mailbox, item_id)

    def fetch_texts(self, mailbox, item_ids):  # the job's matched replies, in one GetItem
        self.mime_reads.extend(item_ids)
        self.text_batches = getattr(self, "text_batches", 0) + 1
        return super().fetch_texts(mailbox, item_ids)


OOO_TEXT_ONLY = ("Vielen Dank für Ihre Nachricht. Ich bin bis einschließlich {day} nicht im Büro und habe keinen "
                 "Zugriff auf meine E-Mails.")
TICKET_ACK = ("Thank you for contacting support. Your request #4821 has been received and a member of our team "
              "will respond shortly.")


def test_text_only_auto_replies_and_acknowledgements_never_stop_and_unrelated_mail_is_not_read(ctx):
    counting = ctx._fetchers["ews"] = CountingFetcher(ctx.settings)
    back = dt.date.today() + dt.timedelta(days=10)
    ooo_to, ack_to, human_to = send(ctx, "e-txt-ooo"), send(ctx, "e-txt-ack"), send(ctx, "e-txt-human")
    summary = deliver(
        ctx,
        mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=ooo_to, references=ooo_to,
                   body=OOO_TEXT_ONLY.format(day=back.strftime("%d.%m.%Y"))),
        mail.reply(sender="support@prospect.zendesk.com", to=MAILBOX, in_reply_to=ack_to, references=ack_to,
                   body=TICKET_ACK),  # a ticket system's acknowledgement: text alone never makes a reply a machine
        mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=human_to, references=human_to),
        mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to="<someone-else@elsewhere.example>", references=None,
                   body=OOO_TEXT_ONLY.format(day=back.strftime("%d.%m.%Y"))),  # matches nothing of ours
    )
    assert [i["kind"] for i in summary["items"]] == ["auto_reply", "machine", "human_reply", "human_reply"]
    got = state(ctx, "e-txt-ooo")
    assert (got["status"], got["paused_until"][:10]) == ("paused", back.isoformat())
    assert state(ctx, "e-txt-ack")["status"] == "active"
    assert state(ctx, "e-txt-human")["reason"] == "replied"
    items = [i["item_id"] for i in summary["items"]]
    assert counting.mime_reads == items[:3]  # the unrelated mail stayed on the headers-only path


def test_no_broad_except_in_job_code_swallows_rqs_timeout():
    """Every ``except Exception`` in the job's code comes after an ``except BaseTimeoutException``
    that re-raises (RQ's job timeout is an Exception subclass)."""
    import ast
    import inspect

    from workers import context as context_module
    from workers import policy

    for module in (jobs, context_module, policy):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            names = [ast.unparse(h.type) if h.type is not None else "" for h in node.handlers]
            for index, name in enumerate(names):
                if name in ("", "Exception", "BaseException"):
                    earlier = names[:index]
                    assert "BaseTimeoutException" in earlier or any(
                        isinstance(s, ast.Raise) for s in node.handlers[index].body), \
                        f"{module.__name__} line {node.handlers[index].lineno}: broad except without the timeout first"


def test_the_first_receipt_is_kept_for_the_retention_once_matched_and_briefly_otherwise(ctx, redis_client):
    """Memory: every received mail leaves a first-receipt key; only mail that matched a send
    keeps it for the whole retention."""
    sent = send(ctx, "e-ttl")
    unrelated_id, reply_id = mail.new_id(), mail.new_id()
    deliver(ctx, mail.unrelated(to=MAILBOX, message_id=unrelated_id),
            mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=sent, references=sent, message_id=reply_id))

    def ttl_days(message_id: str) -> float:
        key = "el:first_received:" + hashlib.sha256(f"mid\n{normalize(message_id)}".encode()).hexdigest()[:32]
        return redis_client.ttl(key) / 86400

    assert 0.9 < ttl_days(unrelated_id) <= jobs.UNMATCHED_RECEIPT_TTL / 86400
    assert ctx.settings.retention_days - 1 < ttl_days(reply_id) <= ctx.settings.retention_days


def test_a_later_copy_also_acts_on_a_send_recorded_after_the_first_copy_decided(ctx):
    """The first copy's decision covers the sends it matched; a send recorded since (here the id
    a mail server gave our second enrollment's send) is acted on by the next copy, with the
    first copy's time, and the first decision is not changed or repeated."""
    hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    first_send = record(ctx, "e-first", PROSPECT, hour_ago)
    rewritten = mail.new_id("ses.example")  # recorded only later, for another enrollment
    raw = dated(mail.reply(sender=PROSPECT, to=MAILBOX, cc=MAILBOX2, in_reply_to=first_send,
                           references=f"{rewritten} {first_send}"), dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    copy_a = ctx.emulator.deliver(MAILBOX, raw)["item_id"]
    copy_b = ctx.emulator.deliver(MAILBOX2, raw)["item_id"]
    first = run_job(MAILBOX, copy_a)
    assert decision(first) == [("e-first", "stopped", "replied")]
    ctx.sends.record([rewritten], "e-second", "seq-2", MAILBOX, to=[PROSPECT], sent_at=hour_ago)
    second = run_job(MAILBOX2, copy_b)
    assert second["items"][0]["decision"] == "reused"
    assert decision(second) == [("e-first", "stopped", "replied"), ("e-second", "stopped", "replied")]
    assert ctx.enrollments.get("e-second")["status"] == "stopped"
    assert len(ctx.enrollments.history("e-first")) == 1
