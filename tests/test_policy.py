"""The policy as a table: what each kind of mail does to the enrollments it names, when the
domain rule applies, and the time rule. No Redis, no clock: every input is in the case."""
from __future__ import annotations

import datetime as dt

import pytest

from workers.classify import Classification
from workers.policy import (
    DIRECT_MATCH_SKEW,
    NOTHING,
    PAUSE,
    RECORD,
    STOP,
    Action,
    PolicySettings,
    decide,
    domain_to_check,
    reply_time,
)
from workers.state.sends import DomainEnrollment, Send

MAILBOX = "rep@ours.example"
PROSPECT = "pat@prospect.example"
NOW = dt.datetime(2026, 11, 20, 12, 0, 0, tzinfo=dt.UTC)
REPLY = NOW - dt.timedelta(minutes=10)  # when the mail was written
DAY = dt.timedelta(days=1)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def send(enrollment: str, *, sent_at: dt.datetime = REPLY - DAY, to=(PROSPECT,), mid: str | None = None) -> Send:
    return Send((mid or f"<{enrollment}@ours.example>",), enrollment, "seq", MAILBOX, tuple(to), ("cc@prospect.example",),
                iso(sent_at))


def mail(kind: str, **fields) -> Classification:
    return Classification(kind=kind, **fields)


def run(c: Classification, sends, *, sender: str | None = PROSPECT, when: dt.datetime = REPLY,
        settings: PolicySettings | None = None, candidates=()) -> list[tuple]:
    actions = decide(c, sends, mailbox=MAILBOX, sender=sender, when=when, now=NOW,
                     settings=settings or PolicySettings(), domain_candidates=candidates)
    return [(a.action, a.enrollment_id, a.reason, a.extra) for a in actions]


KINDS = [
    # (case, classification, sends, expected actions)
    ("human reply stops", mail("human_reply"), [send("e1")], [(STOP, "e1", "replied", {})]),
    ("auto-reply with a return date pauses until it",
     mail("auto_reply", return_date=dt.date(2026, 12, 14)), [send("e1")],
     [(PAUSE, "e1", "auto_reply", {"until": dt.date(2026, 12, 14)})]),
    ("auto-reply without a date pauses pause_days", mail("auto_reply"), [send("e1")],
     [(PAUSE, "e1", "auto_reply", {"until": NOW + 7 * DAY})]),
    ("auto-reply whose date has passed pauses pause_days", mail("auto_reply", return_date=dt.date(2026, 11, 1)),
     [send("e1")], [(PAUSE, "e1", "auto_reply", {"until": NOW + 7 * DAY})]),
    ("auto-reply whose date is today pauses pause_days", mail("auto_reply", return_date=NOW.date()),
     [send("e1")], [(PAUSE, "e1", "auto_reply", {"until": NOW + 7 * DAY})]),
    ("auto-reply dated more than a year ahead pauses pause_days", mail("auto_reply", return_date=dt.date(2028, 1, 1)),
     [send("e1")], [(PAUSE, "e1", "auto_reply", {"until": NOW + 7 * DAY})]),
    ("hard bounce of the to recipient stops", mail("bounce", bounce_type="hard", failed_recipients=[PROSPECT]),
     [send("e1")], [(STOP, "e1", "bounced", {})]),
    ("hard bounce naming no recipient stops", mail("bounce", bounce_type="hard"), [send("e1")],
     [(STOP, "e1", "bounced", {})]),
    ("hard bounce with unknown type stops", mail("bounce"), [send("e1")], [(STOP, "e1", "bounced", {})]),
    ("hard bounce of the to recipient among others stops",
     mail("bounce", bounce_type="hard", failed_recipients=["cc@prospect.example", "PAT@prospect.example"]),
     [send("e1")], [(STOP, "e1", "bounced", {})]),
    ("hard bounce of a cc only is recorded", mail("bounce", bounce_type="hard", failed_recipients=["cc@prospect.example"]),
     [send("e1")], [(RECORD, "e1", "bounce_of_cc", {"failed_recipients": ["cc@prospect.example"]})]),
    ("soft bounce is recorded", mail("bounce", bounce_type="soft", failed_recipients=[PROSPECT]), [send("e1")],
     [(RECORD, "e1", "soft_bounce", {"failed_recipients": [PROSPECT]})]),
    ("soft bounce of a cc only is recorded as soft", mail("bounce", bounce_type="soft",
                                                          failed_recipients=["cc@prospect.example"]),
     [send("e1")], [(RECORD, "e1", "soft_bounce", {"failed_recipients": ["cc@prospect.example"]})]),
    ("complaint stops", mail("complaint"), [send("e1")], [(STOP, "e1", "complaint", {})]),
    ("read receipt is recorded", mail("read_receipt"), [send("e1")], [(RECORD, "e1", "read_receipt", {})]),
    ("other does nothing", mail("other"), [send("e1")], [(NOTHING, "e1", "other", {})]),
    ("machine-written mail does nothing", mail("machine"), [send("e1")], [(NOTHING, "e1", "machine", {})]),
    ("a kind the policy does not know does nothing", mail("calendar_notice"), [send("e1")],
     [(NOTHING, "e1", "calendar_notice", {})]),
    ("several steps of one enrollment act once", mail("human_reply"),
     [send("e1", mid="<step1@ours.example>"), send("e1", mid="<step2@ours.example>")], [(STOP, "e1", "replied", {})]),
    ("several enrollments each act", mail("complaint"), [send("e1"), send("e2")],
     [(STOP, "e1", "complaint", {}), (STOP, "e2", "complaint", {})]),
    ("no sends, no actions", mail("human_reply"), [], []),
]


@pytest.mark.parametrize("case, c, sends, expected", KINDS, ids=[k[0] for k in KINDS])
def test_each_kind(case, c, sends, expected):
    assert run(c, sends) == expected


def test_a_bounce_of_a_cc_checks_the_send_it_names_not_another_step():
    """Per enrollment the first matched send that precedes counts (a bounce's original id is
    matched first): a cc on that send is a cc, whatever a later step's recipients were."""
    c = mail("bounce", bounce_type="hard", failed_recipients=["cc@prospect.example"])
    named = send("e1", mid="<orig@ours.example>")
    later_step = send("e1", mid="<step2@ours.example>", to=("cc@prospect.example",))
    assert run(c, [named, later_step])[0][0] == RECORD
    assert run(c, [later_step, named])[0][0] == STOP


TIME = [
    # (case, kind, send's sent_at relative to the mail's time, acts?)
    ("a send a day before", "human_reply", -DAY, True),
    ("a send in the same second", "human_reply", dt.timedelta(0), True),
    ("a send within the clock-skew allowance after", "human_reply", DIRECT_MATCH_SKEW - dt.timedelta(seconds=1), True),
    ("a send just past the allowance", "human_reply", DIRECT_MATCH_SKEW + dt.timedelta(seconds=1), False),
    ("a send an hour after", "human_reply", dt.timedelta(hours=1), False),
    ("an auto-reply to a later send", "auto_reply", dt.timedelta(hours=1), False),
    ("a bounce of a later send", "bounce", dt.timedelta(hours=1), False),
    ("a complaint about a later send", "complaint", dt.timedelta(hours=1), False),
    ("a receipt for a later send", "read_receipt", dt.timedelta(hours=1), False),
]


@pytest.mark.parametrize("case, kind, offset, acts", TIME, ids=[t[0] for t in TIME])
def test_a_mail_acts_only_on_sends_that_precede_it(case, kind, offset, acts):
    later = send("e1", sent_at=REPLY + offset)
    got = run(mail(kind, bounce_type="hard"), [later])
    if acts:
        assert got[0][0] != NOTHING
    else:
        assert got == [(NOTHING, "e1", "sent_after_reply", {"sent_at": later.sent_at})]


def test_of_two_steps_only_the_one_before_the_mail_counts():
    early, late = send("e1", mid="<s1@ours.example>"), send("e1", mid="<s2@ours.example>", sent_at=REPLY + DAY)
    assert run(mail("human_reply"), [late, early]) == [(STOP, "e1", "replied", {})]
    assert run(mail("human_reply"), [late, send("e2")]) == [
        (NOTHING, "e1", "sent_after_reply", {"sent_at": late.sent_at}), (STOP, "e2", "replied", {})]


DOMAIN_ON = PolicySettings(stop_whole_domain=True)


def candidate(enrollment: str, first: dt.datetime | None, last: dt.datetime | None = None) -> DomainEnrollment:
    return DomainEnrollment(enrollment, first, last or first or NOW)


DOMAIN = [
    # (case, sender, settings, kind, candidates, enrollments stopped as domain_replied)
    ("stops enrollments whose first send precedes the reply", "chris@prospect.example", DOMAIN_ON, "human_reply",
     [candidate("e-before", REPLY - DAY), candidate("e-same-second", REPLY + dt.timedelta(microseconds=500_000))],
     ["e-before", "e-same-second"]),
    ("never an enrollment begun after the reply, even seconds after", "chris@prospect.example", DOMAIN_ON, "human_reply",
     [candidate("e-after", REPLY + dt.timedelta(seconds=1)), candidate("e-much-later", NOW)], []),
    ("an enrollment begun before and written to again after counts", "chris@prospect.example", DOMAIN_ON,
     "human_reply", [candidate("e-long", REPLY - DAY, NOW)], ["e-long"]),
    ("a first send that is not known never stops", "chris@prospect.example", DOMAIN_ON, "human_reply",
     [candidate("e-unknown", None)], []),
    ("the matched enrollment is not stopped twice", "chris@prospect.example", DOMAIN_ON, "human_reply",
     [candidate("e1", REPLY - DAY), candidate("e2", REPLY - DAY)], ["e2"]),
    ("off by default", "chris@prospect.example", PolicySettings(), "human_reply",
     [candidate("e2", REPLY - DAY)], []),
    ("never the mailbox's own domain", "boss@ours.example", DOMAIN_ON, "human_reply",
     [candidate("e2", REPLY - DAY)], []),
    ("never a free-mail domain", "someone@gmail.com", DOMAIN_ON, "human_reply", [candidate("e2", REPLY - DAY)], []),
    ("never for an auto-reply", "chris@prospect.example", DOMAIN_ON, "auto_reply", [candidate("e2", REPLY - DAY)], []),
    ("never for machine mail", "chris@prospect.example", DOMAIN_ON, "machine", [candidate("e2", REPLY - DAY)], []),
    ("never without a sender", None, DOMAIN_ON, "human_reply", [candidate("e2", REPLY - DAY)], []),
]


@pytest.mark.parametrize("case, sender, settings, kind, candidates, stopped", DOMAIN, ids=[d[0] for d in DOMAIN])
def test_domain_rule(case, sender, settings, kind, candidates, stopped):
    got = run(mail(kind), [send("e1")], sender=sender, settings=settings, candidates=candidates)
    assert [e for action, e, reason, _ in got if reason == "domain_replied" and action == STOP] == stopped
    rule_applies = settings.stop_whole_domain and kind == "human_reply" and sender == "chris@prospect.example"
    assert domain_to_check(mail(kind), [send("e1")], MAILBOX, sender, settings) == (
        "prospect.example" if rule_applies else None)


def test_the_domain_rule_needs_a_reply_to_a_send_that_precedes_it():
    """A reply whose only named send went out after it answers none of ours: no domain stops."""
    got = run(mail("human_reply"), [send("e1", sent_at=REPLY + DAY)], sender="chris@prospect.example",
              settings=DOMAIN_ON, candidates=[candidate("e2", REPLY - DAY)])
    assert [a[0] for a in got] == [NOTHING]
    assert domain_to_check(mail("human_reply"), [], MAILBOX, "chris@prospect.example", DOMAIN_ON) is None


RECEIVED = dt.datetime(2026, 11, 20, 11, 0, 0, tzinfo=dt.UTC)
REPLY_TIMES = [
    ("the Date header when it is earlier", "Fri, 20 Nov 2026 10:30:00 +0000", dt.datetime(2026, 11, 20, 10, 30, tzinfo=dt.UTC)),
    ("with its zone", "Fri, 20 Nov 2026 11:30:00 +0100", dt.datetime(2026, 11, 20, 10, 30, tzinfo=dt.UTC)),
    ("-0000 means UTC", "Fri, 20 Nov 2026 10:30:00 -0000", dt.datetime(2026, 11, 20, 10, 30, tzinfo=dt.UTC)),
    ("never later than the first copy's receipt", "Fri, 20 Nov 2026 13:00:00 +0000", RECEIVED),
    ("a missing Date is the first receipt", None, RECEIVED),
    ("an unparseable Date is the first receipt", "next tuesday-ish", RECEIVED),
    ("an empty Date is the first receipt", "  ", RECEIVED),
    ("an impossible Date is the first receipt", "Fri, 45 Nov 2026 10:30:00 +0000", RECEIVED),
    ("a reset clock (1970) is the first receipt", "Thu, 01 Jan 1970 00:00:00 +0000", RECEIVED),
    ("a reset clock (2000) is the first receipt", "Sat, 01 Jan 2000 00:00:00 -0000", RECEIVED),
    ("a week-old Date is not believed", "Fri, 13 Nov 2026 10:59:00 +0000", RECEIVED),
    ("six days in an outbox is believed", "Sat, 14 Nov 2026 11:00:00 +0000", dt.datetime(2026, 11, 14, 11, 0, tzinfo=dt.UTC)),
]


@pytest.mark.parametrize("case, date, expected", REPLY_TIMES, ids=[r[0] for r in REPLY_TIMES])
def test_reply_time(case, date, expected):
    got = reply_time(date, RECEIVED)
    assert got == expected and got.tzinfo is not None


def test_actions_name_the_status_they_move_to():
    assert [Action(a, "e", "r").status for a in (STOP, PAUSE, RECORD, NOTHING)] == ["stopped", "paused", None, None]


def test_policy_settings_come_from_the_settings():
    from exchange_listener.core import config

    settings = config.load(env={}, overrides={"stop_whole_domain": True, "pause_days": 3})
    assert PolicySettings.from_settings(settings) == PolicySettings(stop_whole_domain=True, pause_days=3)
