"""The classifier on hand-written client fixtures, the headers-only hot path, bad input and the CLI."""
from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.classify import (
    KINDS,
    Classification,
    UnparseableMessage,
    classify_headers,
    classify_message,
    find_return_date,
    headers_of,
    needs_body,
)

FIXTURES = Path(__file__).parent / "data" / "replies-clients"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
ROOT = Path(__file__).resolve().parent.parent


def _raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_client_fixtures(name):
    expected = EXPECTED[name]
    result = classify_message(_raw(name))
    assert result.kind == expected["kind"], result.reasons
    assert result.references == expected["references"]
    for key in ("bounce_type", "original_message_id", "failed_recipients"):
        if key in expected:
            assert getattr(result, key) == expected[key], key
    if "return_date" in expected:
        assert result.return_date == dt.date.fromisoformat(expected["return_date"])
    json.dumps(result.as_dict())  # JSON-safe


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_headers_only_hot_path(name):
    """Human replies are settled from headers alone (no MIME fetch); everything else asks for
    the body, and headers alone never call it a human reply."""
    headers = headers_of(_raw(name))
    quick = classify_headers(headers)
    if EXPECTED[name]["kind"] == "human_reply":
        assert not needs_body(headers)
        assert quick.kind == "human_reply"
        assert quick.references == EXPECTED[name]["references"]
    else:
        assert needs_body(headers)
        assert quick.kind == EXPECTED[name]["kind"]


def _message(headers: str, body: str = "Hello\n") -> bytes:
    return (headers.strip("\n").replace("\n", "\r\n") + "\r\n\r\n" + body).encode()


def test_auto_response_suppress_alone_is_not_an_auto_reply():
    raw = _message("""From: a@prospect.example
To: tom@vendor.example
Subject: Re: Intro
In-Reply-To: <s1@vendor.example>
X-Auto-Response-Suppress: All
Message-ID: <r1@prospect.example>""")
    assert classify_message(raw).kind == "human_reply"


@pytest.mark.parametrize("subject", [
    "Automatic reply: Intro", "Out of Office: Intro", "Abwesenheitsnotiz: Intro",
    "Réponse automatique : Intro", "Respuesta automática: Intro", "Risposta automatica: Intro",
    "Automatisch antwoord: Intro", "Autosvar: Intro", "=?utf-8?Q?R=C3=A9ponse_automatique_:_Intro?="])
def test_localized_out_of_office_subjects(subject):
    headers = [("From", "x@prospect.example"), ("Subject", subject),
               ("In-Reply-To", "<s1@vendor.example>")]
    assert classify_headers(headers).kind == "auto_reply"
    assert needs_body(headers)  # the return date is in the body


@pytest.mark.parametrize("name,value", [
    ("Auto-Submitted", "auto-replied"), ("Auto-Submitted", "auto-generated"),
    ("X-Autoreply", "yes"), ("X-Autorespond", "Out of office"), ("Precedence", "bulk"),
    ("Precedence", "auto_reply"), ("Precedence", "junk"),
    ("X-MS-Exchange-Generated-Message-Source", "Mailbox Rules Agent"),
    ("X-MS-Exchange-Inbox-Rules-Loop", "x@prospect.example")])
def test_auto_reply_headers_beat_reply_form(name, value):
    headers = [("From", "x@prospect.example"), ("Subject", "Re: Intro"),
               ("In-Reply-To", "<s1@vendor.example>"), (name, value)]
    assert classify_headers(headers).kind == "auto_reply"
    assert classify_headers([*headers[:3], ("Auto-Submitted", "no")]).kind == "human_reply"


def test_ews_header_list_for_a_plain_reply():
    """As EWS InternetMessageHeaders gives them: unfolded values, any case, duplicates."""
    headers = [("received", "from a by b"), ("received", "from c by d"),
               ("From", "Anna <anna@prospect.example>"), ("Subject", "AW: Intro"),
               ("Message-ID", "<X1@Prospect.Example>"),
               ("References", "<s1@vendor.example> <mid@prospect.example>"),
               ("In-Reply-To", "<mid@prospect.example>"), ("Thread-Index", "AQHbQ3mK")]
    result = classify_headers(headers)
    assert result.kind == "human_reply" and not needs_body(headers)
    assert result.message_id == "<X1@prospect.example>"
    assert result.from_address == "anna@prospect.example"
    assert result.references == ["<mid@prospect.example>", "<s1@vendor.example>"]


def test_bounce_sender_needs_body_for_details():
    headers = [("From", "MAILER-DAEMON@mx.example"), ("Subject", "Undelivered Mail Returned to Sender"),
               ("Return-Path", "<>")]
    assert classify_headers(headers).kind == "bounce"
    assert needs_body(headers)


# --- return dates -------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("I am out of the office until 14 December 2026.", "2026-12-14"),
    ("I will be back on Monday, December 14.", "2026-12-14"),
    ("Ich bin bis zum 18.12.2026 nicht erreichbar.", "2026-12-18"),
    ("Ab dem 11. Dezember bin ich wieder im Büro.", "2026-12-11"),
    ("Je serai de retour le lundi 7 décembre.", "2026-12-07"),
    ("Estaré fuera de la oficina hasta el 4 de enero de 2027.", "2027-01-04"),
    ("Sarò fuori ufficio fino al 10 dicembre 2026.", "2026-12-10"),
    ("Ik ben afwezig tot en met 9 december 2026.", "2026-12-09"),
    ("I will be back on Monday.", "2026-12-07"),            # message sent Tuesday 1 December
    ("Ab Montag bin ich wieder erreichbar.", "2026-12-07"),
    ("De retour le mardi 8 décembre.", "2026-12-08"),
])
def test_return_dates_in_several_languages(text, expected):
    assert find_return_date(text, dt.date(2026, 12, 1)) == dt.date.fromisoformat(expected)


def test_no_return_date_when_none_is_stated():
    base = dt.date(2026, 12, 1)
    assert find_return_date("I am travelling with limited access to email.", base) is None
    assert find_return_date("Back on 3 March 2019.", base) is None  # in the past: not a return date
    assert find_return_date("", base) is None


# --- bad input ----------------------------------------------------------------------------

def test_missing_message_id_and_broken_mime():
    raw = _message("""From: a@prospect.example
Subject: Re: Intro
In-Reply-To: <s1@vendor.example>
Content-Type: multipart/mixed; boundary="never-closed"
""", "--never-closed\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64")
    result = classify_message(raw)
    assert result.kind == "human_reply" and result.message_id is None
    assert result.references == ["<s1@vendor.example>"]


def test_non_utf8_bytes():
    raw = (b"From: =?x-unknown?Q?M=FCller?= <m\xfcller@prospect.example>\r\n"
           b"Subject: Re: Angebot f\xfcr Sie \xff\xfe\r\nIn-Reply-To: <s1@vendor.example>\r\n"
           b"Content-Type: text/plain; charset=klingon-8\r\n\r\nGr\xfc\xdfe \x80\x81\r\n")
    result = classify_message(raw)
    assert result.kind == "human_reply"
    json.dumps(result.as_dict())


def test_header_injection_is_neutralised():
    headers = [("From", "a@prospect.example"),
               ("Subject", "Re: hi\r\nAuto-Submitted: auto-replied"),
               ("In-Reply-To", "<s1@vendor.example>\r\nBcc: evil@x.example"),
               ("References", "<s0@vendor.example>\n<s1@vendor.example>")]
    result = classify_headers(headers)
    assert result.kind == "human_reply"  # the smuggled Auto-Submitted is not a header
    # the smuggled line stays text of the value it was in (an address there may look like an
    # id, which can only ever match a recorded send's id); nothing carries a line break
    assert result.references[0] == "<s1@vendor.example>"
    assert "<s0@vendor.example>" in result.references
    assert all("\r" not in r and "\n" not in r for r in result.references)


def test_ten_thousand_id_references():
    refs = " ".join(f"<{i}.t@vendor.example>" for i in range(10000))
    raw = _message(f"From: a@prospect.example\nSubject: Re: x\nReferences: {refs}\n"
                   f"In-Reply-To: <9999.t@vendor.example>")
    result = classify_message(raw)
    assert result.kind == "human_reply"
    assert len(result.references) == 10000 and result.references[0] == "<9999.t@vendor.example>"


def test_unparseable_input_raises_one_clear_type():
    for bad in (b"", b"   \r\n", None, 12345):
        with pytest.raises(UnparseableMessage):
            classify_message(bad)
    # garbage that is still bytes is a message with nothing to say
    assert classify_message(b"\x00\x01\x02 garbage without headers").kind == "other"


@pytest.mark.parametrize("policy", [email.policy.default, email.policy.compat32])
def test_accepts_a_parsed_message(policy):
    for name, expected in EXPECTED.items():
        result = classify_message(email.message_from_bytes(_raw(name), policy=policy))
        assert result.kind == expected["kind"], name
        assert result.references == expected["references"], name
        assert result.original_message_id == expected.get("original_message_id"), name


@given(st.binary(max_size=3000))
@settings(max_examples=200, deadline=None)
def test_never_crashes_on_arbitrary_bytes(data):
    try:
        result = classify_message(data)
    except UnparseableMessage:
        return
    assert isinstance(result, Classification) and result.kind in KINDS
    json.dumps(result.as_dict())


_header_name = st.sampled_from(["From", "Subject", "References", "In-Reply-To", "Message-ID",
                                "Content-Type", "Auto-Submitted", "Return-Path", "Precedence",
                                "X-Failed-Recipients"]) | st.text(max_size=20)


@given(st.lists(st.tuples(_header_name, st.text(max_size=300)), max_size=20))
@settings(max_examples=300, deadline=None)
def test_headers_never_crash(headers):
    result = classify_headers(headers)
    assert result.kind in KINDS
    assert isinstance(needs_body(headers), bool)
    json.dumps(result.as_dict())


@given(st.sampled_from(sorted(EXPECTED)), st.integers(min_value=0, max_value=4000), st.binary(max_size=40))
@settings(max_examples=150, deadline=None)
def test_corrupted_fixtures_never_crash(name, at, junk):
    raw = _raw(name)
    at = min(at, len(raw))
    result = classify_message(raw[:at] + junk + raw[at + len(junk):])
    assert result.kind in KINDS


# --- CLI contract -------------------------------------------------------------------------

def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exchange_listener.cli", "classify", *args],
                          check=False, cwd=ROOT, input=stdin, capture_output=True, timeout=120)


def test_cli_prints_one_json_object_per_file(tmp_path):
    files = [str(FIXTURES / n) for n in ("gmail-reply.eml", "ndr-exchange.eml", "ooo-de.eml")]
    proc = _cli(*files)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["file"] for r in rows] == files
    assert [r["kind"] for r in rows] == ["human_reply", "bounce", "auto_reply"]
    assert rows[0]["references"] == EXPECTED["gmail-reply.eml"]["references"]
    assert rows[1]["bounce_type"] == "hard"
    assert rows[1]["original_message_id"] == "<seq-c2637485960a@vendor.example>"
    assert rows[2]["return_date"] == "2026-12-18"


def test_cli_unreadable_file_gives_error_object_and_nonzero_exit(tmp_path):
    missing = str(tmp_path / "missing.eml")
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    proc = _cli(missing, str(FIXTURES / "gmail-reply.eml"), str(empty))
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert rows[0]["file"] == missing and "error" in rows[0]
    assert rows[1]["kind"] == "human_reply"
    assert "error" in rows[2]


def test_cli_is_quiet_on_odd_mail():
    """8-bit headers trip flufl.bounce's detectors; the CLI still answers, with nothing on stderr."""
    odd = ROOT / "tests" / "data" / "corpus" / "sisimai" / "lhost-kddi-01.eml"
    proc = _cli(str(odd))
    assert proc.returncode == 0 and proc.stderr == b""
    assert json.loads(proc.stdout)["kind"] == "bounce"


def test_cli_reads_stdin_and_headers_only():
    proc = _cli("--headers-only", "-", stdin=_raw("ooo-fr.eml"))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["kind"] == "auto_reply" and row["needs_body"] is True
