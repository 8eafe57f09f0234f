"""What a classified mail does to enrollments: one pure function, so the rules are data.

``decide`` takes what the job has already fetched — the classification, the sends the mail
matched, the sender's domain candidates, the reply's time, the mailbox and the settings —
and returns the list of actions. It does no I/O and reads no clock (``now`` is passed in),
so every rule is tested as a table of cases (tests/test_policy.py) and the job code only
fetches, calls ``decide`` and applies what it returns.

The rules
=========

============  ========================================================================
human_reply   stop, reason ``replied``; with ``stop_whole_domain`` also every enrollment
              sent to the sender's domain, reason ``domain_replied`` — never for the
              mailbox's own domain or a free-mail domain
auto_reply    pause until the stated return date (within a year) or ``pause_days``
bounce hard   stop, reason ``bounced`` — unless the failed recipients are known and none
              was a ``to`` recipient of the send: then record ``bounce_of_cc``
bounce soft   record ``soft_bounce`` (the mail server is still trying)
complaint     stop, reason ``complaint``
read_receipt  record ``read_receipt``
machine,      nothing (mail written by software never stops or pauses a sequence;
other, any    a kind this module does not know is treated the same way)
unknown kind
============  ========================================================================

Time: a mail acts only on sends that precede it. Its time is ``reply_time`` (its Date
header, bounded by when its first copy was received; a Date more than ``MAX_DATE_LAG``
before that receipt is a broken clock and is not believed: see ``reply_time``). A send counts
when its ``sent_at`` is at or before that time, compared in whole seconds (the resolution of a
Date header). For the domain rule the comparison is strict: an enrollment whose first send
to the domain is later than the reply was never seen by the person replying. For a send the
mail names itself (In-Reply-To, References, a bounce's original Message-ID) the reference
already proves the send existed when the mail was written, so a sender's clock running up to
``DIRECT_MATCH_SKEW`` slow must not lose the reply; later than that, the send is not acted on
(``nothing``, reason ``sent_after_reply``).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import math
from collections.abc import Iterable, Sequence
from typing import Any

from exchange_listener.core.config import Settings, default
from workers.classify import Classification
from workers.state.sends import DomainEnrollment, Send

STOP, PAUSE, RECORD, NOTHING = "stop", "pause", "record", "nothing"
MAX_PAUSE_DAYS = 365
DIRECT_MATCH_SKEW = dt.timedelta(minutes=5)
# A Date this long before the mail's first receipt is a reset or broken clock (1970, 2000),
# not a mail that waited in an outbox: the receipt is the mail's time then.
MAX_DATE_LAG = dt.timedelta(days=7)
# A reply from one of these domains says nothing about the prospect's company.
FREE_MAIL_DOMAINS = frozenset({
    "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com", "yahoo.com",
    "ymail.com", "icloud.com", "me.com", "mac.com", "aol.com", "gmx.de", "gmx.net", "web.de", "mail.com",
    "proton.me", "protonmail.com", "yandex.ru", "mail.ru", "qq.com", "163.com", "t-online.de", "orange.fr",
})


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing to do to one enrollment. ``extra``: ``until`` for a pause, ``failed_recipients``
    for a recorded bounce, ``sent_at`` for a send not acted on because it followed the mail."""

    action: str  # stop | pause | record | nothing
    enrollment_id: str
    reason: str  # stop/pause: the transition's reason; record: the observed kind; nothing: why
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def status(self) -> str | None:
        """The enrollment status this action moves to (None: no transition)."""
        return {STOP: "stopped", PAUSE: "paused"}.get(self.action)


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    stop_whole_domain: bool = default("stop_whole_domain")
    pause_days: int = default("pause_days")
    direct_match_skew: dt.timedelta = DIRECT_MATCH_SKEW

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicySettings:
        return cls(stop_whole_domain=bool(settings.stop_whole_domain), pause_days=int(settings.pause_days))


def domain_of(address: str | None) -> str:
    _, at, domain = (address or "").strip().rpartition("@")
    return domain.strip().strip(">").lower() if at else ""


def parse_time(value: str | None) -> dt.datetime | None:
    """An ISO 8601 timestamp (``Z`` or offset; naive = UTC) as aware UTC, None if unusable."""
    if not value:
        return None
    text = value.strip()
    try:
        moment = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def reply_time(date_header: str | None, first_received: dt.datetime) -> dt.datetime:
    """When the mail was written, as far as we can trust it: its Date header, but never later
    than when its first copy was received (a clock running fast cannot push a reply past sends
    made after it arrived). A missing or unparseable Date means ``first_received``."""
    first = first_received if first_received.tzinfo else first_received.replace(tzinfo=dt.UTC)
    try:
        written = email.utils.parsedate_to_datetime(date_header.strip()) if date_header else None
    except (TypeError, ValueError, IndexError, OverflowError):
        written = None
    if written is None:
        return first.astimezone(dt.UTC)
    if written.tzinfo is None:  # "-0000": UTC with no claim about the local zone
        written = written.replace(tzinfo=dt.UTC)
    if written < first - MAX_DATE_LAG:
        return first.astimezone(dt.UTC)
    return min(written, first).astimezone(dt.UTC)


def _precedes(sent_at: dt.datetime | None, when: dt.datetime, allowance: dt.timedelta) -> bool:
    if sent_at is None:
        return True
    return math.floor(sent_at.timestamp()) <= math.floor((when + allowance).timestamp())


def domain_to_check(c: Classification, sends: Sequence[Send], mailbox: str, sender: str | None,
                    settings: PolicySettings) -> str | None:
    """The domain whose enrollments ``decide`` needs as candidates, or None when the domain
    rule does not apply (the job fetches candidates only then)."""
    if c.kind != "human_reply" or not settings.stop_whole_domain or not sends:
        return None
    domain = domain_of(sender)
    if not domain or domain == domain_of(mailbox) or domain in FREE_MAIL_DOMAINS:
        return None
    return domain


def pause_until(return_date: dt.date | None, now: dt.datetime, pause_days: int) -> dt.date | dt.datetime:
    today = now.date()
    if return_date and today < return_date <= today + dt.timedelta(days=MAX_PAUSE_DAYS):
        return return_date
    return now + dt.timedelta(days=pause_days)


def _by_enrollment(sends: Iterable[Send]) -> dict[str, list[Send]]:
    grouped: dict[str, list[Send]] = {}
    for send in sends:  # several steps of one sequence may be named: act once per enrollment
        grouped.setdefault(send.enrollment_id, []).append(send)
    return grouped


def decide(c: Classification, sends: Sequence[Send], *, mailbox: str, sender: str | None, when: dt.datetime,
           now: dt.datetime, settings: PolicySettings,
           domain_candidates: Sequence[DomainEnrollment] = ()) -> list[Action]:
    """Every action for one mail (see the module docstring); at most one per enrollment.

    ``sends``: the sends the mail names, in match order; ``when``: ``reply_time``; ``now``:
    the current time (pause lengths); ``domain_candidates``: for ``domain_to_check``'s domain.
    """
    actions: list[Action] = []
    acting: list[tuple[str, Send]] = []
    for enrollment_id, group in _by_enrollment(sends).items():
        preceding = [s for s in group if _precedes(parse_time(s.sent_at), when, settings.direct_match_skew)]
        if preceding:
            acting.append((enrollment_id, preceding[0]))
        else:
            actions.append(Action(NOTHING, enrollment_id, "sent_after_reply", {"sent_at": group[0].sent_at}))

    kind = c.kind
    for enrollment_id, send in acting:
        if kind == "human_reply":
            actions.append(Action(STOP, enrollment_id, "replied"))
        elif kind == "auto_reply":
            actions.append(Action(PAUSE, enrollment_id, "auto_reply",
                                  {"until": pause_until(c.return_date, now, settings.pause_days)}))
        elif kind == "complaint":
            actions.append(Action(STOP, enrollment_id, "complaint"))
        elif kind == "bounce" and c.bounce_type != "soft":
            failed = {a.lower() for a in c.failed_recipients}
            if failed and not failed & {a.lower() for a in send.to}:
                actions.append(Action(RECORD, enrollment_id, "bounce_of_cc", {"failed_recipients": sorted(failed)}))
            else:
                actions.append(Action(STOP, enrollment_id, "bounced"))
        elif kind == "bounce":
            actions.append(Action(RECORD, enrollment_id, "soft_bounce",
                                  {"failed_recipients": list(c.failed_recipients) or None}))
        elif kind == "read_receipt":
            actions.append(Action(RECORD, enrollment_id, "read_receipt"))
        else:  # other, machine, and any kind this policy does not know: never a state change
            actions.append(Action(NOTHING, enrollment_id, kind or "unknown"))

    if acting and domain_to_check(c, sends, mailbox, sender, settings):
        named = {a.enrollment_id for a in actions}
        for candidate in domain_candidates:
            if candidate.enrollment_id in named or candidate.first_sent_at is None:
                continue
            if _precedes(candidate.first_sent_at, when, dt.timedelta(0)):
                named.add(candidate.enrollment_id)
                actions.append(Action(STOP, candidate.enrollment_id, "domain_replied"))
    return actions
