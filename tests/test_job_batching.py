"""A job carrying many mails of one mailbox (issue 13): the matched replies' texts are read in
one GetItem, unrelated mail whose ids match no send is not MIME-fetched unless it may be a
bounce or receipt, and every enrollment ends exactly as one-mail jobs would leave it. Real
emulator over HTTP and real redis-server; GetItem round trips counted by the emulator."""
from __future__ import annotations

import time

import mail_samples as mail
import pytest

from exchange_listener import queueing
from exchange_listener.core import config
from exchange_listener.mail.message_ids import normalize
from exchange_listener.sources import ledger
from exchange_listener.sources.base import ItemGone, NewMail
from exchange_listener.sources.ews.fetch import EwsFetcher
from workers import context, jobs

MAILBOX = "rep@ours.example"
OTHER_MAILBOX = "sam@ours.example"
PROSPECT = "pat@prospect.example"
COLLEAGUE = "chris@prospect.example"


@pytest.fixture
def ctx(redis_server, redis_client, emulator):
    settings = config.load(env={}, overrides={
        "redis_url": redis_server.url, "ews_url": emulator.ews_url, "ews_username": "svc",
        "ews_password": "svc-password", "pause_days": 7})
    current = context.configure(settings)
    current.emulator = emulator
    yield current
    current.close()


def send(ctx, enrollment: str, to: str) -> str:
    message_id = mail.new_id("ours.example")
    ctx.sends.record([message_id], enrollment, "seq-1", MAILBOX, to=[to])
    return message_id


def get_items(ctx) -> int:
    return ctx.emulator.stats()["operations"].get("GetItem", 0)


def run(ctx, *raws: bytes) -> tuple[dict, int]:
    """One job for all ``raws``; (its summary, the GetItem round trips it made)."""
    items = [ctx.emulator.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    before = get_items(ctx)
    summary = jobs.handle_mail(queueing.payload([NewMail(MAILBOX, i, "inbox", time.time()) for i in items]))
    return summary, get_items(ctx) - before


def commands(ctx) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in ctx.redis.info("commandstats").items()}


def marked(ctx, raw: bytes, item_id: str, mailbox: str = MAILBOX) -> bool:
    """The ledger holds this mail as processed (keyed by its Message-ID, as the job marks it)."""
    message_id = normalize(raw.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode())
    member = ledger.identity(message_id, item_id)
    return member in ctx.ledger.processed(mailbox, [member])


def other_thread(n: int) -> bytes:
    elsewhere = f"<t{n}.{time.time_ns()}@elsewhere.example>"
    return mail.reply(sender=f"friend{n}@elsewhere.example", to=MAILBOX, in_reply_to=elsewhere,
                      references=elsewhere, body="See you at noon.")


def test_matched_replies_and_unrelated_mail_in_one_job_stop_exactly_the_replied_enrollments(ctx):
    prospects = [f"p{n}@prospect{n}.example" for n in range(4)]
    sent = [send(ctx, f"e-b{n}", p) for n, p in enumerate(prospects)]
    raws = []
    for n in range(3):  # replies to the first three sends, each after an unrelated mail
        raws.append(other_thread(n))
        raws.append(mail.reply(sender=prospects[n], to=MAILBOX, in_reply_to=sent[n], references=sent[n]))
    raws.append(mail.unrelated(to=MAILBOX))
    summary, round_trips = run(ctx, *raws)
    assert [i["kind"] for i in summary["items"]] == ["human_reply"] * 6 + ["auto_reply"]
    assert [i["matched"] for i in summary["items"]] == [[], ["e-b0"], [], ["e-b1"], [], ["e-b2"], []]
    assert summary["transitions"] == 3 and summary["unmatched"] == 4
    assert [(ctx.enrollments.get(f"e-b{n}")["status"], ctx.enrollments.get(f"e-b{n}")["reason"])
            for n in range(3)] == [("stopped", "replied")] * 3
    assert ctx.enrollments.get("e-b3")["status"] == "active"
    assert round_trips == 2  # headers of all seven, then the three replies' texts together
    assert all(marked(ctx, raw, i["item_id"]) for raw, i in zip(raws, summary["items"]))

    again, round_trips = run(ctx, *raws)  # the same mails again (new items): decisions reused, no new transition
    assert again["transitions"] == 0
    assert [i.get("decision") for i in again["items"] if i["matched"]] == ["reused"] * 3


def test_an_out_of_office_among_replies_is_told_by_its_text_read_in_the_batch(ctx):
    a, b = send(ctx, "e-ooo", "pat@prospect.example"), send(ctx, "e-hum", "sam@prospect.example")
    text = "Vielen Dank für Ihre Nachricht. Ich bin bis einschließlich 14.12.2099 nicht im Büro."
    summary, round_trips = run(ctx, mail.reply(sender="pat@prospect.example", to=MAILBOX, in_reply_to=a,
                                               references=a, body=text),
                               mail.reply(sender="sam@prospect.example", to=MAILBOX, in_reply_to=b, references=b))
    assert [i["kind"] for i in summary["items"]] == ["auto_reply", "human_reply"]
    assert ctx.enrollments.get("e-ooo")["status"] == "paused"
    assert ctx.enrollments.get("e-hum")["status"] == "stopped"
    assert round_trips == 2


def test_unmatched_bulk_mail_is_not_mime_fetched_but_counted_and_marked(ctx):
    raws = [mail.unrelated(to=MAILBOX) for _ in range(5)]
    before = commands(ctx)
    summary, round_trips = run(ctx, *raws)
    assert round_trips == 1  # the headers only: no MIME for mail whose ids match no send
    assert [i["kind"] for i in summary["items"]] == ["auto_reply"] * 5 and summary["unmatched"] == 5
    assert all(marked(ctx, raw, i["item_id"]) for raw, i in zip(raws, summary["items"]))
    for key in (ctx.redis.keys("el:first_received:*")):  # every copy's receipt kept a day, as one-mail jobs do
        assert 0 < ctx.redis.ttl(key) <= jobs.UNMATCHED_RECEIPT_TTL
    assert len(ctx.redis.keys("el:first_received:*")) == 5
    used = {k: v - before.get(k, 0) for k, v in commands(ctx).items()}
    # one look-up for all, one receipt script each (pipelined), one ledger write for the job
    assert (used.get("mget"), used.get("eval", 0) + used.get("evalsha", 0), used.get("zadd")) == (1, 5, 1)


def test_a_bounce_and_a_receipt_naming_a_send_only_in_their_body_still_have_their_mime_read(ctx):
    bounced, read = send(ctx, "e-nd", "gone@prospect.example"), send(ctx, "e-rr", "pat@prospect.example")
    summary, round_trips = run(ctx, mail.dsn(to=MAILBOX, failed="gone@prospect.example", original_id=bounced),
                               mail.read_receipt(sender="pat@prospect.example", to=MAILBOX, original_id=read),
                               mail.unrelated(to=MAILBOX))
    assert [(i["kind"], i["matched"]) for i in summary["items"]] == [
        ("bounce", ["e-nd"]), ("read_receipt", ["e-rr"]), ("auto_reply", [])]
    assert (ctx.enrollments.get("e-nd")["status"], ctx.enrollments.get("e-nd")["reason"]) == ("stopped", "bounced")
    assert ctx.enrollments.get("e-rr")["status"] == "active"
    assert round_trips == 3  # headers, then the bounce's and the receipt's MIME; none for the newsletter


def test_fetch_texts_returns_each_items_text_in_order_and_gone_for_a_missing_one(ctx):
    fetcher = EwsFetcher(ctx.settings)
    try:
        ids = [ctx.emulator.deliver(MAILBOX, mail.reply(sender="pat@prospect.example", to=MAILBOX, in_reply_to=None,
                                                        references=None, body=f"Answer number {n}."))["item_id"]
               for n in range(3)]
        ctx.emulator.delete(ids[1], purge=True)
        before = get_items(ctx)
        texts = fetcher.fetch_texts(MAILBOX, ids)
        assert get_items(ctx) - before == 1
        assert "Answer number 0." in texts[0] and "Answer number 2." in texts[2]
        assert isinstance(texts[1], ItemGone)
        assert fetcher.fetch_texts(MAILBOX, []) == []
    finally:
        fetcher.close()


def test_one_corrupt_stored_send_fails_its_own_mail_not_the_rest_of_the_job(ctx):
    """The batched look-ups fail on one unreadable stored send: the job falls back to each mail
    looking itself up, so the good reply beside it still stops its enrollment and is marked."""
    good_to, bad_to = "good@prospect.example", "bad@prospect.example"
    good, bad = send(ctx, "e-good", good_to), send(ctx, "e-bad", bad_to)
    ctx.redis.set(jobs.keys.send(normalize(bad)), b"{not json")
    raws = [mail.reply(sender=bad_to, to=MAILBOX, in_reply_to=bad, references=bad),
            mail.reply(sender=good_to, to=MAILBOX, in_reply_to=good, references=good), other_thread(9)]
    items = [ctx.emulator.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    with pytest.raises(jobs.ItemsFailed, match="1 of 3 item"):
        jobs.handle_mail(queueing.payload([NewMail(MAILBOX, i, "inbox", time.time()) for i in items]))
    assert ctx.enrollments.get("e-good")["status"] == "stopped"
    assert marked(ctx, raws[1], items[1]) and marked(ctx, raws[2], items[2])
    assert not marked(ctx, raws[0], items[0])  # the failed one stays for its retry


def test_exchange_report_items_keep_their_mime_read_even_without_report_headers():
    """An Exchange NDR or receipt is told by its ItemClass (REPORT.*) even when its header list
    lacks multipart/report: its body may name our send, so it is not classified from headers alone."""
    from exchange_listener.sources.base import FetchedMessage
    from workers.classify import classify_headers

    headers = [("From", "Someone <someone@example.com>"), ("Subject", "Your message"),
               ("Content-Type", "text/plain")]

    def item(item_class: str) -> FetchedMessage:
        return FetchedMessage(mailbox=MAILBOX, item_id="x", internet_message_id="<n@x.example>", subject="Your message",
                              sender=None, from_address="someone@example.com", to=[MAILBOX], cc=[],
                              received_at=None, conversation_id=None, in_reply_to=None, references=None,
                              headers=headers, item_class=item_class)

    verdict = classify_headers(headers, None)
    assert jobs._body_may_cite(verdict, item("REPORT.IPM.Note.NDR"))
    assert not jobs._body_may_cite(verdict, item("IPM.Note"))


def test_one_job_may_carry_mail_of_several_mailboxes_each_asked_once(ctx):
    """Stream mail that arrived together shares a job (RQ's cost paid once); each mailbox's
    items are still fetched in one GetItem of their own, and each reply stops its enrollment."""
    first = send(ctx, "e-first", PROSPECT)
    other_send = mail.new_id("ours.example")
    ctx.sends.record([other_send], "e-other", "seq-1", OTHER_MAILBOX, to=[COLLEAGUE])
    raws = [mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=first, references=first),
            mail.reply(sender="news@else.example", to=MAILBOX, in_reply_to=None, references=None)]
    mine = [ctx.emulator.deliver(MAILBOX, raw)["item_id"] for raw in raws]
    their_raw = mail.reply(sender=COLLEAGUE, to=OTHER_MAILBOX, in_reply_to=other_send, references=other_send)
    theirs = ctx.emulator.deliver(OTHER_MAILBOX, their_raw)["item_id"]
    mails = [NewMail(MAILBOX, mine[0], "inbox", time.time()), NewMail(OTHER_MAILBOX, theirs, "inbox", time.time()),
             NewMail(MAILBOX, mine[1], "inbox", time.time())]
    payload = queueing.payload(mails)
    assert "mailbox" not in payload and payload["mailboxes"] == [MAILBOX, OTHER_MAILBOX]
    before = get_items(ctx)
    summary = jobs.handle_mail(payload)
    # per mailbox, one GetItem for the headers and one for the texts of its matched human replies
    # (one per mail would be 3 + 2)
    assert get_items(ctx) - before == 4
    assert summary["mailboxes"] == [MAILBOX, OTHER_MAILBOX] and summary["split"] == []
    assert summary["transitions"] == 2 and summary["unmatched"] == 1 and len(summary["items"]) == 3
    for enrollment, mailbox in (("e-first", MAILBOX), ("e-other", OTHER_MAILBOX)):
        got = ctx.enrollments.get(enrollment)
        assert (got["status"], got["reason"], got["mailbox"]) == ("stopped", "replied", mailbox)
    # each mail is remembered under its own mailbox, where that mailbox's catch-up looks
    assert marked(ctx, their_raw, theirs, OTHER_MAILBOX) and not marked(ctx, their_raw, theirs, MAILBOX)
    assert all(marked(ctx, raw, item) for raw, item in zip(raws, mine))


def test_a_mailbox_failing_inside_a_shared_job_goes_on_alone_and_the_others_are_done(ctx):
    first = send(ctx, "e-ok", PROSPECT)
    other_send = mail.new_id("ours.example")
    ctx.sends.record([other_send], "e-later", "seq-1", OTHER_MAILBOX, to=[COLLEAGUE])
    ok_item = ctx.emulator.deliver(MAILBOX, mail.reply(sender=PROSPECT, to=MAILBOX, in_reply_to=first,
                                                       references=first))["item_id"]
    failing_item = ctx.emulator.deliver(OTHER_MAILBOX, mail.reply(sender=COLLEAGUE, to=OTHER_MAILBOX,
                                                                  in_reply_to=other_send,
                                                                  references=other_send))["item_id"]
    ctx.emulator.fault(kind="mailbox_error", mailbox=OTHER_MAILBOX, code="ErrorMailboxMoveInProgress",
                       operations=["GetItem"])
    failing = [NewMail(OTHER_MAILBOX, failing_item, "inbox", time.time())]
    summary = jobs.handle_mail(queueing.payload([NewMail(MAILBOX, ok_item, "inbox", time.time()), *failing]))
    assert ctx.enrollments.get("e-ok")["status"] == "stopped"
    assert ctx.enrollments.get("e-later")["status"] == "active"
    (split,) = summary["split"]
    assert split["mailbox"] == OTHER_MAILBOX and split["items"] == 1
    assert "ErrorMailboxMoveInProgress" in split["error"]
    queue = queueing.make_queue(ctx.redis, ctx.settings.queue_name)
    # due when the shared job's first retry would have been, carrying only that mailbox's mail, on
    # the rest of the retry schedule (this attempt was its first)
    assert split["job_id"] in queue.scheduled_job_registry.get_job_ids()
    due = queue.scheduled_job_registry.get_scheduled_time(split["job_id"]).timestamp() - time.time()
    assert 0 < due <= queueing.RETRY_INTERVALS[0]
    job = queue.fetch_job(split["job_id"])
    assert job.args[0] == queueing.payload(failing) and job.retries_left == ctx.settings.job_retries - 1
    assert job.retry_intervals == queueing.retry_policy(ctx.settings.job_retries, 1).intervals
    assert job.id == queueing.job_id(OTHER_MAILBOX, [failing_item])
    ctx.emulator.fault(kind="clear_mailbox_error", mailbox=OTHER_MAILBOX)
    assert jobs.handle_mail(job.args[0])["transitions"] == 1  # what a worker runs when it falls due
    assert ctx.enrollments.get("e-later")["status"] == "stopped"


def test_parts_not_started_by_half_the_job_timeout_go_on_as_jobs_of_their_own(ctx):
    """A slow server must not let one shared job time out with every mailbox's mail in it: past
    half its timeout, the parts not started are enqueued alone (due now), none dropped."""
    boxes = [f"slow{i}@ours.example" for i in range(4)]
    mails = [NewMail(box, ctx.emulator.deliver(box, mail.reply(sender="x@else.example", to=box, in_reply_to=None,
                                                                references=None))["item_id"], "inbox", time.time())
             for box in boxes]
    queue = queueing.make_queue(ctx.redis, ctx.settings.queue_name)
    job = queueing.enqueue_new_mail(queue, mails, job_timeout=2, retries=3)  # half of it: 1 s
    ctx.emulator.fault(kind="latency", ms=600)  # each part's GetItem takes 0.6 s
    try:
        summary = job.perform()  # as a worker runs it (RQ's current job is this one)
    finally:
        ctx.emulator.fault(kind="latency", ms=0)
    done = {i["item_id"] for i in summary["items"]}
    split = {s["mailbox"]: s for s in summary["split"]}
    assert mails[0].item_id in done and boxes[-1] in split  # the first always runs; the last never can
    for m in mails:  # each mail processed here or carried by a job of its own, never both, never neither
        assert (m.item_id in done) != (m.mailbox in split)
    for box, entry in split.items():
        assert "half the job's timeout" in entry["error"]
        later = queue.fetch_job(entry["job_id"])
        assert later.args[0]["mailbox"] == box and later.retries_left == 3  # none of the job's retries spent
        assert entry["job_id"] in queue.scheduled_job_registry.get_job_ids()


def test_a_shared_job_run_again_after_failing_only_splits_into_its_mailboxes(ctx):
    """Its first run failed as a whole (e.g. RQ's timeout in one slow mailbox's part): running
    every part again in one job could fail the same way, so each mailbox goes on alone, on the
    rest of the shared job's retry schedule."""
    boxes = [f"again{i}@ours.example" for i in range(3)]
    mails = [NewMail(box, f"AAMkAgain{i}", "inbox", time.time()) for i, box in enumerate(boxes)]
    queue = queueing.make_queue(ctx.redis, ctx.settings.queue_name)
    job = queueing.enqueue_new_mail(queue, mails, retries=3)
    job.retries_left = 2  # what RQ leaves on the job it retries
    job.save()
    before = get_items(ctx)
    summary = job.perform()
    assert get_items(ctx) == before and summary["items"] == []  # nothing fetched in the shared job
    assert sorted(s["mailbox"] for s in summary["split"]) == sorted(boxes)
    for entry in summary["split"]:
        alone = queue.fetch_job(entry["job_id"])
        assert alone.retries_left == 2 and alone.retry_intervals == queueing.retry_policy(3, 1).intervals
