"""What the text alone may and may not decide (issue 10, point 4, after review).

A person's answer must stay a ``human_reply`` even when it mentions being away, says "urgent"
or "until", quotes a ticket number or carries an "out of office Fridays" signature: an
out-of-office has to *state* the absence in its opening, in the present or future, and ask
for nothing. A text acknowledgement ("we have received your message") makes a machine only of
mail whose headers already say it came from a ticket system or CRM. Each table runs the path
the job runs: headers first (``classify_headers``), then ``settle_with_text`` on the first text.
"""
from __future__ import annotations

import datetime as dt

import pytest

from workers.classify import (
    classify_headers,
    classify_message,
    find_return_date,
    machine_mail,
    needs_body,
    needs_text,
    settle_with_text,
)
from workers.classify.auto_reply_text import auto_reply_from_text

BASE = dt.date(2026, 12, 1)  # a Tuesday
PLAIN = [("From", "Anna Prospect <anna@prospect.example>"), ("To", "tom@vendor.example"),
         ("Message-ID", "<r1@prospect.example>"), ("In-Reply-To", "<s1@vendor.example>"),
         ("References", "<s1@vendor.example>")]


def _job_path(text: str, subject: str = "Re: Intro", headers=PLAIN, base: dt.date = BASE):
    """Headers, then (as the job does for mail that matched a send) the text when asked for."""
    headers = [*headers, ("Subject", subject)]
    c = classify_headers(headers)
    if needs_text(c):
        c = settle_with_text(c, text, subject, base)
    return c


# --- people who mention being away, "urgent", "until" -----------------------------------------

HUMAN = [
    "I'm traveling until Friday but this looks interesting - let's talk next week",
    "I'm on vacation until 20 January, but yes please send the deck",
    "Ich bin bis Freitag im Urlaub, aber ja, schicken Sie mir gerne das Angebot",
    "I was out of the office last week, sorry for the silence. This is urgent for us now.",
    "I was out of the office last week… This is urgent for us",
    ("Please remove me from your list.\n\nAnna Prospect\nHead of Operations\n"
     "Out of office Fridays\nFor urgent matters call +49 30 1234567"),
    ("Please remove me from your list.\n\nBest regards,\nAnna\nI am out of the office on Fridays. "
     "For urgent matters call +49 30 1234567."),
    "Can we talk on Thursday? I am out of the office until Wednesday.",
    "I'm out of the office until 14 December but I'm interested - call me on the 15th.",
    "Sounds good. I'm away until Monday, send it over and I'll read it then.",
    "Je suis en vacances jusqu'au 20 janvier, mais oui, envoyez-moi la présentation.",
    "Estoy de vacaciones hasta el 20 de enero, pero sí, envíeme la propuesta.",
    "Sono in ferie fino al 20 gennaio, ma sì, mi mandi pure la presentazione.",
    "Ik ben met vakantie tot 20 januari, maar ja, stuur me de offerte.",
    "Estou de férias até 20 de janeiro, mas sim, envie-me a proposta.",
    "Jestem na urlopie do 20 stycznia, ale tak, proszę przesłać ofertę.",
    "12月14日まで不在にしておりますが、ぜひ資料をお送りください。",
    "Ich war letzte Woche im Urlaub. Das Thema ist dringend für uns, rufen Sie mich an.",
    "Sono stato fuori ufficio la settimana scorsa. È urgente per noi.",
    "Thanks for following up. I'm out of the office until Friday but happy to chat next week.",
    "Ich bin bis 14.12. nicht im Büro, melden Sie sich danach gerne wieder, dann sprechen wir.",
    "Not interested, I'm on leave until January anyway.",
]


@pytest.mark.parametrize("text", HUMAN)
def test_people_mentioning_absence_stay_human(text):
    assert auto_reply_from_text(text, "Re: Intro", BASE) is None
    c = _job_path(text)
    assert c.kind == "human_reply", c.reasons


@pytest.mark.parametrize("text", [
    "We have received your email and will discuss internally. Let's set up a call next week.",
    "We've received your message, thanks. Please send pricing.",
    "Our ticket number 12345 was opened with your support team last month, so we know your product.",
    "Your request has been received by our CFO, who liked it. Let's talk.",
])
def test_a_plain_reply_is_never_a_machine_by_its_text(text):
    c = _job_path(text)
    assert (c.kind, c.machine_family) == ("human_reply", None), c.reasons


def test_our_own_subject_is_not_an_automatic_reply_subject():
    """The campaign's subject was "Auto-reply templates that convert"; "Re:" before it means
    a person answered it."""
    text = "Yes, this is urgent for us, let's talk. I'm away next week though."
    for subject in ("Re: Auto-reply templates that convert", "RE: Out of office? Not with us",
                    "AW: Abwesenheitsnotiz-Vorlagen", "SV: Autosvar", "Antw: Automatisch antwoord",
                    "R: Risposta automatica", "RIF: fuori ufficio", "回复：自动回复"):
        assert classify_headers([*PLAIN, ("Subject", subject)]).kind == "human_reply", subject
        assert _job_path(text, subject).kind == "human_reply", subject
    # the automatic-reply prefix before the "Re:" is still an auto-reply
    for subject in ("Automatic reply: Re: Auto-reply templates", "Abwesend: AW: Intro", "Out of Office: RE: Intro"):
        assert classify_headers([*PLAIN, ("Subject", subject)]).kind == "auto_reply", subject


# --- out-of-office texts that must still be recognised, with their return dates ----------------

OOO = [
    ("I am out of the office until 14 December 2026 with limited access to email.", BASE, "2026-12-14"),
    ("Thank you for your email. I am currently out of the office and will be back on Monday, December 7.",
     BASE, "2026-12-07"),
    ("I am out of the office until Friday.", BASE, "2026-12-04"),
    ("I will be out of office from 1 Dec to 14 Dec. For anything urgent please contact sales@prospect.example.",
     dt.date(2026, 11, 25), "2026-12-14"),
    ("I will be out of office from 1 Dec to 14 Dec. For anything urgent please contact sales@prospect.example.",
     dt.date(2026, 12, 2), "2026-12-14"),
    ("I am on leave from 28 December to 3 January. For urgent matters please contact sales@prospect.example.",
     dt.date(2026, 12, 20), "2027-01-03"),
    ("I'm away 21-23 December with no access to email.", dt.date(2026, 12, 18), "2026-12-23"),
    (("Thank you for your message. Please note that I am on annual leave between 21 December and "
      "4 January. I will reply when I am back."), dt.date(2026, 12, 18), "2027-01-04"),
    ("Je suis absent du 1er au 14 décembre. En cas d'urgence, contactez support@prospect.example.",
     BASE, "2026-12-14"),
    ("Estoy de vacaciones del 1 al 14 de diciembre. Para asuntos urgentes escriba a ventas@prospect.example.",
     BASE, "2026-12-14"),
    ("Sono in ferie dal 1 al 14 dicembre. Per urgenze contattare info@prospect.example.", BASE, "2026-12-14"),
    ("Ich bin vom 1. bis 14. Dezember im Urlaub. In dringenden Fällen wenden Sie sich an info@prospect.example.",
     BASE, "2026-12-14"),
    (("Vielen Dank für Ihre Nachricht. Ich bin bis einschließlich 11.12.2026 nicht im Büro und habe keinen "
      "Zugriff auf meine E-Mails."), BASE, "2026-12-11"),
    (("Hello,\n\nI am out of the office until 14 December 2026. Please send urgent requests to "
      "info@prospect.example or call me on my mobile +49 171 2345678.\n\nBest regards,\nAnna"), BASE, "2026-12-14"),
]


@pytest.mark.parametrize("text,base,expected", OOO)
def test_out_of_office_texts_are_auto_replies_with_their_return_date(text, base, expected):
    c = _job_path(text, base=base)
    assert c.kind == "auto_reply", c.reasons
    assert c.return_date == dt.date.fromisoformat(expected)


@pytest.mark.parametrize("text,base,expected", [
    ("I will be out of office from 1 Dec to 14 Dec.", dt.date(2026, 11, 25), "2026-12-14"),
    ("Out of office 28 Dec - 3 Jan.", dt.date(2026, 12, 20), "2027-01-03"),
    ("Absent du 28 décembre au 3 janvier.", dt.date(2026, 12, 20), "2027-01-03"),
    ("Fuera de la oficina del 28 de diciembre al 3 de enero.", dt.date(2026, 12, 20), "2027-01-03"),
    ("Fuori ufficio dal 28 dicembre al 3 gennaio.", dt.date(2026, 12, 20), "2027-01-03"),
    ("Fora do escritório de 28 de dezembro a 3 de janeiro.", dt.date(2026, 12, 20), "2027-01-03"),
    ("Nieobecny od 28 grudnia do 3 stycznia.", dt.date(2026, 12, 20), "2027-01-03"),
    ("Afwezig van 28 december tot 3 januari.", dt.date(2026, 12, 20), "2027-01-03"),
])
def test_a_date_range_returns_its_end(text, base, expected):
    assert find_return_date(text, base) == dt.date.fromisoformat(expected)


def test_a_phone_number_is_not_a_date_range():
    assert find_return_date("For urgent matters call +49 171-1234567 or 030 12-34.", BASE) is None


# --- platform mail: the text decides only there, and only once it matched a send ---------------

ZENDESK = [("From", "Prospect Support <support@prospect.zendesk.com>"), ("To", "tom@vendor.example"),
           ("Message-ID", "<1G7EOR_x@zendesk.com>"), ("X-Zendesk-From-Account-Id", "a1b2c3"),
           ("In-Reply-To", "<s1@vendor.example>"), ("References", "<s1@vendor.example>")]


@pytest.mark.parametrize("text,kind", [
    ("Your request (4821) has been received and is being reviewed by our support staff.", "machine"),
    ("We have received your request and a ticket has been created with Ticket ID - 1287.", "machine"),
    ("Hi Tom, thanks - not for us this year, please remove us from your list.", "human_reply"),
    ("We've received your message, thanks. Please send pricing.", "human_reply"),
    ("We have received your email and will discuss internally. Let's set up a call next week.", "human_reply"),
])
def test_platform_mail_is_settled_by_its_text(text, kind):
    c = _job_path(text, "Re: Intro", ZENDESK)
    assert c.kind == kind, c.reasons
    assert machine_mail.PROVISIONAL not in c.reasons


@pytest.mark.parametrize("headers", [
    ZENDESK,
    [("From", "HubSpot <noreply@hubspot.com>"), ("Subject", "Your weekly marketing report"),
     ("Message-ID", "<1764579600.x@hubspotemail.net>"), ("X-HubSpot-Message-Type", "marketing")],
    [("From", "Ben <ben@prospect.example>"), ("Sender", "<no-reply@salesforce.com>"),
     ("Message-ID", "<Qw55@sfdc.net>"), ("X-SFDC-User", "0055e"), ("In-Reply-To", "<s1@vendor.example>")],
    [("From", "Help <help@prospect.freshdesk.com>"), ("Subject", "Re: Intro"),
     ("Message-ID", "<6761.fd@prospect.freshdesk.com>")],
])
def test_platform_mail_costs_no_mime_before_it_matches_a_send(headers):
    """Provisional platform mail stays on the headers-only path (needs_body False); the job
    reads its text only after it matched a send (needs_text True)."""
    assert not needs_body(headers)
    c = classify_headers(headers)
    assert c.kind == "machine" and machine_mail.PROVISIONAL in c.reasons
    assert needs_text(c)


# --- a person at a CRM / ticket-system vendor is still a person ------------------------------

def _vendor_ooo(domain: str, subject: str, extra=()) -> bytes:
    return (f"From: Anna Smith <anna@{domain}>\r\nTo: tom@vendor.example\r\nSubject: {subject}\r\n"
            f"Date: Tue, 1 Dec 2026 09:00:00 +0000\r\nMessage-ID: <ooo-1@{domain}>\r\n"
            f"Return-Path: <anna@{domain}>\r\nAuto-Submitted: auto-replied\r\n"
            "In-Reply-To: <s1@vendor.example>\r\nReferences: <s1@vendor.example>\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in extra)
            + "Content-Type: text/plain; charset=utf-8\r\n\r\n"
            "I am out of the office until 14 December 2026. For urgent matters please contact "
            "sales@example.com.\r\n").encode()


@pytest.mark.parametrize("domain", ["salesforce.com", "hubspot.com", "zendesk.com", "freshdesk.com",
                                    "servicenow.com"])
@pytest.mark.parametrize("subject", ["Automatic reply: Intro", "Out of Office: Intro", "Re: Intro"])
def test_an_out_of_office_from_someone_working_at_a_platform_vendor_pauses(domain, subject):
    raw = _vendor_ooo(domain, subject)
    c = classify_message(raw)
    assert (c.kind, c.machine_family) == ("auto_reply", None), c.reasons
    assert c.return_date == dt.date(2026, 12, 14)
    headers = [tuple(line.split(": ", 1)) for line in raw.decode().split("\r\n\r\n")[0].split("\r\n")]
    assert classify_headers(headers).kind == "auto_reply"


def test_an_out_of_office_through_a_crm_connected_mailbox_pauses():
    """CRM headers on a person's own RFC 3834 out-of-office (a rep's mailbox connected to the
    CRM) do not make it CRM mail."""
    c = classify_message(_vendor_ooo("prospect.example", "Automatic reply: Intro",
                                     [("X-HubSpot-Connected-Inbox", "1")]))
    assert c.kind == "auto_reply", c.reasons
