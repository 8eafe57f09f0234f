"""Machines are not people; text-only out-of-office replies are auto-replies (issue 10, point 4).

Fixtures were written for this project from each format's documentation (see the README in
each folder of tests/data/machine and tests/data/ooo_text); every one points at one of our
sends through In-Reply-To/References, which is what makes it dangerous.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from workers.classify import (
    classify_headers,
    classify_message,
    first_text,
    headers_of,
    needs_body,
    needs_text,
    settle_with_text,
)
from workers.classify.auto_reply_text import auto_reply_from_text

DATA = Path(__file__).parent / "data"


def _cases(folder: str) -> list[tuple[Path, dict]]:
    out = []
    for d in sorted((DATA / folder).iterdir()):
        for name, expected in json.loads((d / "expected.json").read_text()).items():
            out.append((d / name, expected))
    return out


MACHINE = _cases("machine")
OOO = _cases("ooo_text")


def _id(case) -> str:
    return f"{case[0].parent.name}/{case[0].name}"


def test_fixture_counts():
    """At least three machine fixtures per family and three out-of-office texts per language,
    each language with human replies that must stay human."""
    per_family: dict[str, int] = {}
    for _path, e in MACHINE:
        if e["kind"] == "machine":
            per_family[e["machine_family"]] = per_family.get(e["machine_family"], 0) + 1
    assert set(per_family) == {"mailing_list", "ticket_system", "crm", "calendar"}
    assert min(per_family.values()) >= 3, per_family
    langs: dict[str, list[str]] = {}
    for path, e in OOO:
        langs.setdefault(path.parent.name, []).append(e["kind"])
    assert set(langs) >= {"en", "de", "fr", "es", "it", "nl", "pt", "pl", "ja"}
    for lang, kinds in langs.items():
        assert kinds.count("auto_reply") >= 3 and kinds.count("human_reply") >= 2, lang


@pytest.mark.parametrize("case", MACHINE, ids=_id)
def test_machine_fixtures_full_message(case):
    path, expected = case
    result = classify_message(path.read_bytes())
    assert result.kind == expected["kind"], result.reasons
    assert result.machine_family == expected.get("machine_family")
    assert result.references == expected["references"]
    json.dumps(result.as_dict())


@pytest.mark.parametrize("case", MACHINE, ids=_id)
def test_machine_fixtures_job_path(case):
    """What the job does: headers first; the body only when needs_body says so; the text only
    when needs_text says so. Machines are never a human reply on any step of that path."""
    path, expected = case
    raw = path.read_bytes()
    headers = headers_of(raw)
    quick = classify_headers(headers)
    if expected["kind"] == "machine":
        assert quick.kind != "human_reply", quick.reasons
    if needs_body(headers):
        final = classify_message(raw)
    else:
        final = quick
        if needs_text(final):
            final = settle_with_text(final, first_text(raw), dict(headers).get("Subject", ""))
    assert (final.kind, final.machine_family) == (expected["kind"], expected.get("machine_family"))


@pytest.mark.parametrize("case", OOO, ids=_id)
def test_text_only_out_of_office_full_message(case):
    path, expected = case
    result = classify_message(path.read_bytes())
    assert result.kind == expected["kind"], result.reasons
    assert result.references == expected["references"]
    got = result.return_date.isoformat() if result.return_date else None
    assert got == expected["return_date"]


@pytest.mark.parametrize("case", OOO, ids=_id)
def test_text_only_out_of_office_job_path(case):
    """Headers alone say human reply (no auto headers, plain 'Re:'), and stay on the cheap
    path (no MIME); the first text part (or EWS UniqueBody) then settles it."""
    path, expected = case
    raw = path.read_bytes()
    headers = headers_of(raw)
    quick = classify_headers(headers)
    assert quick.kind == "human_reply" and not needs_body(headers)
    assert needs_text(quick)
    final = settle_with_text(quick, first_text(raw), dict(headers)["Subject"], dt.date(2026, 12, 1))
    assert final.kind == expected["kind"], final.reasons
    got = final.return_date.isoformat() if final.return_date else None
    assert got == expected["return_date"]


@pytest.mark.parametrize("text", [
    "Thanks, I'm back next week and will call you.",
    "I was out of the office last week, sorry for the delay - yes, let's talk on Monday.",
    "Ich bin ab Montag wieder da, dann telefonieren wir.",
    "",
])
def test_people_mentioning_absence_stay_human(text):
    assert auto_reply_from_text(text, "Re: Intro", dt.date(2026, 12, 1)) is None


def test_auto_reply_from_text_api():
    found = auto_reply_from_text("I am out of the office until 14 December 2026. Limited access to email.",
                                 "Re: Intro", dt.date(2026, 12, 1))
    assert found.kind == "auto_reply" and found.return_date == dt.date(2026, 12, 14)


def test_only_the_start_of_the_text_is_read():
    """An out-of-office far below the reply's own words (quoted, or after 1500 characters)
    does not count."""
    own = "Sounds good, send me the contract please. " * 40
    assert auto_reply_from_text(own + "\nI am out of the office until 14 December 2026, limited access "
                                "to email.", "Re: Intro") is None


def test_first_text_prefers_plain_then_html_and_is_bounded():
    boundary = "b1"
    raw = (f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
           f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html &amp; text</p>\r\n"
           f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain text\r\n--{boundary}--\r\n").encode()
    assert first_text(raw).strip() == "plain text"
    html_only = (b"Content-Type: text/html; charset=utf-8\r\n\r\n<div>I am <b>out of the office</b>"
                 b"</div><blockquote>quoted: I am back on Monday</blockquote>")
    text = first_text(html_only)
    assert "out of the office" in text and "&" not in text and "quoted" not in text
    big = b"Content-Type: text/plain\r\n\r\n" + b"x" * 100_000
    assert len(first_text(big)) == 8192
    assert isinstance(first_text(b"\x00\x01 not mail"), str)  # never raises
    assert first_text(12345) == ""  # not a message at all


def test_ews_item_class_marks_meeting_responses():
    headers = [("From", "anna@prospect.example"), ("Subject", "Re: Intro call"),
               ("In-Reply-To", "<s1@vendor.example>")]
    assert classify_headers(headers).kind == "human_reply"
    result = classify_headers(headers, item_class="IPM.Schedule.Meeting.Resp.Pos")
    assert (result.kind, result.machine_family) == ("machine", "calendar")


def test_list_precedence_on_a_relayed_post_is_not_an_auto_reply():
    """Precedence: bulk set by a list on a person's post (corpus: flanker__from-encoding) is
    the list's, not an auto-responder's; without list headers it still marks an auto-reply."""
    post = [("From", "a@prospect.example"), ("Subject", "Re: PUT method"),
            ("References", "<s1@vendor.example>"), ("Precedence", "bulk")]
    assert classify_headers(post).kind == "auto_reply"
    assert classify_headers([*post, ("Sender", "new-httpd-owner@apache.example")]).kind == "human_reply"
    assert classify_headers([*post, ("List-Id", "<x.lists.example>")]).kind == "human_reply"
