"""Classify an incoming message: human reply, auto-reply, bounce, read receipt, complaint, other.

Order matters: bounce, read receipt, complaint and auto-reply are decided first, from every
signal available; only a message that is none of those can be a ``human_reply`` (it points
at an earlier message through In-Reply-To/References, or its subject says "Re:").

Two entry points:
- ``classify_headers`` works from internet headers alone (what EWS InternetMessageHeaders
  gives) — the hot path. ``needs_body`` says when headers cannot settle the kind or its
  details (bounce / report / auto-reply return date), so the caller fetches MIME only then.
- ``classify_message`` works from the full MIME message (bytes or ``email.message.Message``).

Robustness: neither function raises on broken MIME, non-UTF-8 bytes, a missing Message-ID,
CR/LF smuggled into header values or a 10,000-id References; they return a Classification
(kind ``other`` when nothing can be said). ``classify_message`` raises ``UnparseableMessage``
only when its input is not a message at all (not bytes/str/Message, or empty).

The top of ``workers.classify``: it reads ``verdict`` (Classification, subject rules),
``return_date``, ``machine_mail`` and ``auto_reply_text``, none of which imports it back.
Callers import the public names from ``workers.classify``.
"""
from __future__ import annotations

import datetime as dt
import email
import email.errors
import email.header
import email.parser
import email.policy
import email.utils
import logging
import re
from collections.abc import Iterable, Iterator, KeysView
from email.message import Message
from typing import Any

from rq.timeouts import BaseTimeoutException

from exchange_listener.mail.message_ids import normalize, references_of
from workers.classify import auto_reply_text, machine_mail
from workers.classify.return_date import find_return_date
from workers.classify.verdict import (
    FORWARD_SUBJECT,
    REPLY_SUBJECT,
    Classification,
    UnparseableMessage,
    automatic_subject,
)

# flufl.bounce logs a traceback for every detector that trips over odd mail, then re-raises;
# _flufl_failures handles that, so its log lines would only be noise in worker logs.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False

MAX_PARTS = 200            # parts walked in one message
MAX_TEXT = 200_000         # characters of body text scanned for bounce details / return dates
MAX_HEADER_VALUE = 1_000_000


# --- signals -------------------------------------------------------------------------------

_BOUNCE_SENDERS = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mailerdaemon|"
                             r"mail\.?delivery\.?(system|subsystem)?|bounces?|"
                             r"microsoftexchange[0-9a-f]*|nobody-bounce)(\+.*)?$", re.IGNORECASE)
_BOUNCE_SENDER_NAMES = re.compile(r"mail delivery (sub)?system|mailer.?daemon|post.?master|"
                                  r"delivery status notification|mdaemon", re.IGNORECASE)
_BOUNCE_SUBJECTS = re.compile(
    r"undeliver|undelivered|delivery (status )?notification|delivery (has )?failed|"
    r"delivery failure|failure notice|returned mail|mail delivery failed|returned to sender|"
    r"non.?delivery|not delivered|could not be delivered|delivery problem|"
    r"mail system error|nondeliverable|unzustellbar|nicht zustellbar|non remis|"
    r"no se puede entregar|non recapitabile|onbestelbaar|delivery report|"
    r"warning: could not send|delayed mail|delivery delayed|message delayed|"
    r"mail could not|message not delivered|rejected|bounce|unable to deliver|"
    r"permanent error|temporary error|failed delivery|return(ed)? mail|"
    r"notice of mail delivery|mail error|delivery error|delivery attempt|delivery warning|"
    r"user unknown|no such user|mailbox (is )?full|over quota|"
    r"メールエラー|エラー通知|不達|送信失敗|退信|投递失败|系统退信", re.IGNORECASE)
_COMPLAINT_SUBJECTS = re.compile(r"complaint about message|abuse report|spam report|"
                                 r"^\s*\[?abuse\]?\s*:", re.IGNORECASE)
_BOUNCE_BODY = re.compile(
    r"transcript of session follows|original message follows|could not be delivered to|"
    r"following address(es)? (had permanent fatal errors|failed)|delivery to the following "
    r"recipients? (failed|has been delayed)|permanent fatal error|user unknown|no such user|"
    r"mailbox unavailable|message was undeliverable|your message (could not|wasn't|was not) "
    r"(be )?delivered|\"notificationType\"\s*:\s*\"Bounce\"|^final-recipient\s*:|"
    r"^diagnostic-code\s*:|undeliverable to|unable to deliver", re.IGNORECASE | re.MULTILINE)
_RECEIPT_SUBJECTS = re.compile(r"^(read|gelesen|lu|leído|letto|gelezen|läst|lest|"
                               r"not read|ungelesen|non lu|no leído)\s*:", re.IGNORECASE)
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_REPLY = re.compile(r"(?<!\d)([45])\d\d[ -](?=\D)")
_MSGID_LINE = re.compile(r"^[ \t>]*message-id[ \t]*:\s*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")
_HTML_TAG = re.compile(r"<[^>]{0,2000}>|&nbsp;")


def _clean(value: object) -> str:
    """A header value as one safe line: decoded, CR/LF and other controls replaced."""
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = str(value)
        except BaseTimeoutException:  # RQ's job timeout must end the job
            raise
        except Exception:  # noqa: BLE001 - bad mail must not crash the worker
            return ""
    value = value[:MAX_HEADER_VALUE]
    if "\r" in value or "\n" in value:
        value = re.sub(r"\r\n[ \t]|\r[ \t]|\n[ \t]", " ", value)  # unfold
        value = value.replace("\r", " ").replace("\n", " ")  # injected line breaks: neutralised
    if _SURROGATE.search(value):  # 8-bit bytes kept by the parser: read them as UTF-8
        value = _LONE_SURROGATE.sub("\ufffd", value)  # not an escaped byte: unreadable
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _decoded(value: str) -> str:
    """RFC 2047 encoded-words decoded, best effort (subjects in any language)."""
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        return value


class _Headers:
    """Case-insensitive multi-valued view of a header list."""

    def __init__(self, pairs: Iterable[tuple[str, Any]]):
        self._values: dict[str, list[Any]] = {}  # raw values; cleaned when read (most never are)
        for name, value in pairs:
            key = _clean(name).strip().lower()
            if key:
                self._values.setdefault(key, []).append(value)

    def get(self, name: str) -> str | None:
        values = self._values.get(name)
        return _clean(values[0]) if values else None

    def all(self, name: str) -> list[str]:
        return [_clean(v) for v in self._values.get(name, [])]

    def has(self, name: str) -> bool:
        return name in self._values

    def names(self) -> KeysView[str]:
        return self._values.keys()


def _address(value: str | None) -> tuple[str, str]:
    """(display name, lower-cased address) of the first address in a header value."""
    if not value:
        return "", ""
    try:
        pairs = email.utils.getaddresses([value])
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        return "", ""
    for name, addr in pairs:
        if addr or name:
            return _decoded(name or ""), (addr or "").strip().lower()
    return "", ""


def _content_type(value: str | None) -> tuple[str, str]:
    """(main type, report-type) of a Content-Type value."""
    if not value:
        return "", ""
    main = value.split(";", 1)[0].strip().lower()
    match = re.search(r"report-type\s*=\s*\"?([\w.-]+)", value, re.IGNORECASE)
    return main, (match.group(1).lower() if match else "")


def _from_headers(h: _Headers, item_class: str | None = None) -> tuple[Classification, dict]:
    """Classification from headers alone, plus the hints ``needs_body`` and the body pass use."""
    c = Classification()
    c.message_id = normalize(h.get("message-id") or "")
    name, addr = _address(h.get("from"))
    c.from_address = addr or None
    in_reply_to = " ".join(h.all("in-reply-to")) or None
    refs = " ".join(h.all("references")) or None
    c.references = references_of(in_reply_to, refs)
    subject = _decoded(h.get("subject") or "").strip()
    ctype, report_type = _content_type(h.get("content-type"))
    local = addr.split("@", 1)[0] if addr else ""
    return_path = h.get("return-path")
    null_return = return_path is not None and return_path.strip() in ("<>", "")

    hints = {"report": ctype == "multipart/report", "suspect_bounce": False}
    # Reports say what they are in their Content-Type.
    if ctype == "multipart/report" and report_type == "delivery-status":
        c.kind = "bounce"
        c.reasons.append("report-type=delivery-status")
    elif ctype == "multipart/report" and report_type == "disposition-notification":
        c.kind = "read_receipt"
        c.reasons.append("report-type=disposition-notification")
    elif ctype == "multipart/report" and report_type == "feedback-report":
        c.kind = "complaint"
        c.reasons.append("report-type=feedback-report")
    if c.kind != "other":
        return c, hints

    failed = [a for _n, a in email.utils.getaddresses(h.all("x-failed-recipients")) if a]
    if failed:
        c.failed_recipients = [a.lower() for a in failed]
        c.reasons.append("x-failed-recipients")
    raw_from = h.get("from") or ""
    bounce_sender = bool(_BOUNCE_SENDERS.match(local)) or bool(_BOUNCE_SENDER_NAMES.search(name)) \
        or bool(re.search(r"mailer-daemon|post_?master@|<>", raw_from, re.IGNORECASE))
    if bounce_sender:
        c.reasons.append("bounce sender")
    if null_return:
        c.reasons.append("null return path")
    bounce_subject = bool(_BOUNCE_SUBJECTS.search(subject))
    if bounce_subject:
        c.reasons.append("bounce subject")
    plain_subject = not (REPLY_SUBJECT.match(subject) or FORWARD_SUBJECT.match(subject))
    if failed or bounce_sender or (null_return and bounce_subject) \
            or (bounce_subject and plain_subject and not c.references) \
            or h.has("x-ms-exchange-message-is-ndr"):
        c.kind = "bounce"
        return c, hints
    hints["suspect_bounce"] = null_return or bounce_subject or ctype == "multipart/report" \
        or h.has("x-amz-sns-message-id")

    if _RECEIPT_SUBJECTS.match(subject) and (null_return or ctype == "multipart/report"
                                             or ctype == "application/ms-tnef"
                                             or not c.references):
        c.kind = "read_receipt"
        c.reasons.append("receipt subject")
        return c, hints
    if h.has("feedback-type") or _COMPLAINT_SUBJECTS.search(subject):
        c.kind = "complaint"
        c.reasons.append("feedback headers")
        return c, hints

    machine = machine_mail.machine_from_headers(h, subject, addr, item_class)
    if machine:
        c.kind, c.machine_family = "machine", machine[0]
        c.reasons.append(machine[1])
        if not machine[2]:
            c.reasons.append(machine_mail.PROVISIONAL)
        return c, hints
    auto = _auto_reply_reasons(h, subject)
    if auto:
        c.kind = "auto_reply"
        c.reasons.extend(auto)
        return c, hints
    if c.references:
        c.kind = "human_reply"
        c.reasons.append("in-reply-to/references")
    elif REPLY_SUBJECT.match(subject):
        c.kind = "human_reply"
        c.reasons.append("reply subject")
    if c.kind == "human_reply" and hints["suspect_bounce"]:
        # a reply in form, but with bounce hints: never settled as human from headers alone
        c.kind = "other"
        hints["deferred_reply"] = True
        c.reasons.append("bounce hints: body decides")
    return c, hints


def _auto_reply_reasons(h: _Headers, subject: str) -> list[str]:
    reasons = []
    auto_submitted = (h.get("auto-submitted") or "").strip().lower()
    if auto_submitted and not auto_submitted.startswith("no"):
        reasons.append(f"auto-submitted: {auto_submitted.split(';')[0][:40]}")
    for name in ("x-autoreply", "x-autorespond", "x-autoresponder", "x-autogenerated",
                 "x-ms-exchange-generated-message-source", "x-ms-exchange-inbox-rules-loop",
                 "x-auto-reply-from", "x-mailer-autoreply"):
        value = (h.get(name) or "").strip().lower()
        if h.has(name) and value not in ("no", "false", "0"):
            reasons.append(name)
    precedence = (h.get("precedence") or "").strip().lower()
    if precedence in ("bulk", "list") and _list_relayed(h):
        precedence = ""  # the list set it on a post it relayed, not an auto-responder
    if precedence in ("auto_reply", "bulk", "junk"):
        reasons.append(f"precedence: {precedence}")
    if (h.get("x-precedence") or "").strip().lower() == "auto_reply":
        reasons.append("x-precedence: auto_reply")
    if automatic_subject(subject):
        reasons.append("out-of-office subject")
    return reasons


_LIST_SENDER = re.compile(r"^(owner-.+|.+-(owner|bounces|admin|request))@", re.IGNORECASE)


def _list_relayed(h: _Headers) -> bool:
    """The mail came through a mailing list (RFC 2369/2919 headers, ezmlm's Mailing-List,
    Mailman's X-BeenThere, a list's -owner/-bounces Sender)."""
    if h.has("list-id") or h.has("mailing-list") or h.has("x-beenthere") or h.has("x-mailman-version"):
        return True
    return bool(_LIST_SENDER.match(_address(h.get("sender"))[1] or ""))


def classify_headers(headers: list[tuple[str, str]], item_class: str | None = None) -> Classification:
    """Classify from internet headers only (EWS InternetMessageHeaders). Never raises.

    ``item_class`` (optional): the EWS ItemClass; ``IPM.Schedule.Meeting.*`` is a calendar
    message whatever its headers say."""
    try:
        return _from_headers(_Headers(headers or []), item_class)[0]
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception as exc:  # noqa: BLE001 - bad mail must not crash the worker
        return Classification(reasons=[f"header parse error: {type(exc).__name__}"])


def needs_body(headers: list[tuple[str, str]]) -> bool:
    """True when the body is needed to settle the kind or its details.

    That is: any bounce / report / complaint / receipt or a hint of one (original Message-ID
    and failed recipients live in the body), auto-replies (the return date is in the body)
    and a calendar-looking subject (the parts say whether it is an invitation). False for an
    ordinary human reply, plain mail and provisional ticket-system / CRM mail (their text is
    read through ``needs_text`` once they matched a send), so the hot path skips MIME.
    """
    try:
        c, hints = _from_headers(_Headers(headers or []))
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        return True
    if c.kind in ("bounce", "read_receipt", "complaint", "auto_reply"):
        return True
    # A provisional ticket-system / CRM verdict is settled by its text (``needs_text``), read
    # only once the mail matched a send: the platforms' marketing mail costs no MIME. Only a
    # calendar-looking subject needs the parts (is there a text/calendar object?).
    return bool(hints["report"] or hints["suspect_bounce"] or c.machine_family == "calendar"
                and machine_mail.PROVISIONAL in c.reasons)


def needs_text(c: Classification) -> bool:
    """True when the start of the reply's text can still change the verdict: a human reply
    (a text-only out-of-office) or a provisional platform mail (an acknowledgement, or a
    person's answer the platform relayed). Ask for it (EWS UniqueBody, or ``first_text`` of
    the MIME) only for mail that matched a send, then call ``settle_with_text``."""
    return c.kind == "human_reply" or (c.kind == "machine" and machine_mail.PROVISIONAL in c.reasons)


def settle_with_text(c: Classification, text: str, subject: str = "",
                     base: dt.date | None = None) -> Classification:
    """The verdict once the first text part / UniqueBody (plain text) is known; ``c`` is
    updated and returned. A provisional platform mail (its headers say ticket system / CRM)
    stays ``machine`` when its text is an acknowledgement that asks for nothing, and is the
    relayed answer of a person (``human_reply``) otherwise. A human reply whose own words are
    an out-of-office becomes ``auto_reply`` (with ``return_date``). Text alone never turns a
    plain human reply into ``machine``: "we have received your email, let's talk" is a person."""
    if not needs_text(c):
        return c
    if c.kind == "machine":  # provisional
        c.reasons.remove(machine_mail.PROVISIONAL)
        calendar = c.machine_family == "calendar"
        if not calendar and auto_reply_text.looks_acknowledgement(auto_reply_text.reply_head(text), subject):
            c.reasons.append("acknowledgement text")
            return c
        c.kind, c.machine_family = ("human_reply" if c.references else "other"), None
        c.reasons.append("no calendar object" if calendar else "a person's answer relayed by the platform")
        if c.kind != "human_reply":
            return c
    found = auto_reply_text.auto_reply_from_text(text, subject, base)
    if found:
        c.kind = "auto_reply"
        c.return_date = found.return_date
        c.reasons.extend(found.reasons)
    return c


# --- full message ----------------------------------------------------------------------------

def _parse(raw: object) -> Message:
    if isinstance(raw, Message):
        return raw
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise UnparseableMessage(f"not a message: {type(raw).__name__}")
    data = bytes(raw)
    if not data.strip():
        raise UnparseableMessage("empty message")
    try:
        return email.message_from_bytes(data, policy=email.policy.compat32)
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception as exc:  # noqa: BLE001 - bad mail must not crash the worker
        raise UnparseableMessage(f"cannot parse message: {type(exc).__name__}") from None


def _salvaged(raw: bytes | bytearray | memoryview | str, msg: Message) -> list[tuple[str, str]]:
    if not any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect) for d in msg.defects):
        return _items(msg)
    try:
        data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
        return headers_of(data)
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        return _items(msg)


def _parts(msg: Message) -> Iterator[Message]:
    """Up to MAX_PARTS parts, depth first, tolerant of broken structure."""
    stack, count = [msg], 0
    while stack and count < MAX_PARTS:
        part = stack.pop()
        count += 1
        yield part
        try:
            payload = part.get_payload()
        except BaseTimeoutException:  # RQ's job timeout must end the job
            raise
        except Exception:  # noqa: BLE001, S112 - bad mail must not crash the worker
            continue
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))


def _own_parts(msg: Message) -> Iterator[Message]:
    """Parts of the message itself: attached messages (a forwarded invitation) not entered."""
    stack, count = [msg], 0
    while stack and count < MAX_PARTS:
        part = stack.pop()
        count += 1
        yield part
        if _ctype(part).startswith("message/"):
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))


def _text_of(part: Message) -> str:
    try:
        data = part.get_payload(decode=True)
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        data = None
    if not isinstance(data, bytes):  # None: no payload to decode (decode=True gives bytes or None)
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except (LookupError, UnicodeError):
        return data.decode("utf-8", "replace")


def _ctype(part: Message) -> str:
    try:
        return part.get_content_type()
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        return "text/plain"


_HEADER_LINE = re.compile(r"^([!-9;-~]{1,200}):[ \t]?(.*)$")


def headers_of(raw: bytes | Message) -> list[tuple[str, str]]:
    """The top-level header list of a message (what EWS InternetMessageHeaders would give).

    When a header block is broken (a continuation line without leading whitespace makes the
    stdlib parser start the body early), the raw block up to the first empty line is read
    line by line instead: lines without ``Name:`` continue the previous header.
    """
    if isinstance(raw, Message):
        return _items(raw)
    data = bytes(raw)
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if not any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect) for d in msg.defects):
        return _items(msg)
    text = data[:MAX_HEADER_VALUE].decode("utf-8", "surrogateescape")
    block = re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]
    headers: list[list[str]] = []
    for line in block.splitlines():
        match = _HEADER_LINE.match(line)
        if match and not line[:1].isspace():
            headers.append([match.group(1), match.group(2)])
        elif headers:
            headers[-1][1] += " " + line.strip()
    return [(name, value) for name, value in headers]


def _items(msg: Message) -> list[tuple[str, str]]:
    try:  # raw values: compat32's items() turns 8-bit values into unreadable Header objects
        return [(k, v) for k, v in msg.raw_items()]
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        return []


def _embedded_id(part: Message) -> str | None:
    """The Message-ID of an attached original (message/rfc822 or text/rfc822-headers)."""
    ctype = _ctype(part)
    if ctype == "message/rfc822":
        payload = part.get_payload()
        text = payload if isinstance(payload, str) else ""
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            found = normalize(_clean(payload[0].get("message-id")))
            if found:
                return found
            try:  # broken header block: the id ended up in the attached message's body
                text = payload[0].as_string()
            except BaseTimeoutException:  # RQ's job timeout must end the job
                raise
            except Exception:  # noqa: BLE001 - bad mail must not crash the worker
                text = ""
    else:
        text = _text_of(part)
    match = _MSGID_LINE.search(text[:MAX_TEXT])
    return normalize(match.group(1).strip()) if match else None


def _dsn_fields(part: Message) -> list[dict[str, str]]:
    """Per-recipient field blocks of a message/delivery-status part."""
    payload = part.get_payload()
    blocks = []
    if isinstance(payload, list):
        for block in payload:
            if isinstance(block, Message):
                blocks.append({k.lower(): _clean(v) for k, v in block.items()})
        return blocks
    text = payload if isinstance(payload, str) else ""
    for chunk in re.split(r"\r?\n\s*\r?\n", text[:MAX_TEXT]):
        try:
            block = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(chunk)
        except BaseTimeoutException:  # RQ's job timeout must end the job
            raise
        except Exception:  # noqa: BLE001, S112 - bad mail must not crash the worker
            continue
        blocks.append({k.lower(): _clean(v) for k, v in block.items()})
    return blocks


def _set_original(c: Classification, msgid: str | None) -> None:
    """Record the original's Message-ID; the report's own id is never its original."""
    if msgid and msgid != c.message_id and not c.original_message_id:
        c.original_message_id = msgid


def _bounce_details(c: Classification, msg: Message, parts: list[Message]) -> None:
    statuses: list[str] = []
    actions: list[str] = []
    recipients: list[str] = list(c.failed_recipients)
    for part in parts:
        ctype = _ctype(part)
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            for block in _dsn_fields(part):
                if "status" in block:
                    statuses.append(block["status"])
                if "action" in block:
                    actions.append(block["action"].strip().lower())
                if block.get("message-id") and not c.original_message_id:
                    _set_original(c, normalize(block["message-id"]))  # original glued on
                rcpt = block.get("final-recipient") or block.get("original-recipient")
                if rcpt and block.get("action", "failed").strip().lower() != "delivered":
                    recipients.append(rcpt.split(";", 1)[-1].strip().strip("<>").lower())
        elif ctype in ("message/rfc822", "text/rfc822-headers") and not c.original_message_id:
            _set_original(c, _embedded_id(part))
        elif part is not msg and part.get("message-id") and not c.original_message_id:
            # a broken bounce whose attached original's headers became the part's headers
            _set_original(c, normalize(_clean(part.get("message-id"))))
    temporary, permanent = _flufl_failures(msg)
    for addr in list(permanent) + list(temporary):
        text = addr.decode("utf-8", "replace") if isinstance(addr, bytes) else str(addr)
        recipients.append(text.strip().strip("<>").lower())
    c.failed_recipients = list(dict.fromkeys(r for r in recipients if r and "@" in r))[:100]

    codes = [m.group(1) for s in statuses for m in _STATUS.finditer(s)]
    if "5" in codes:
        c.bounce_type = "hard"
    elif "4" in codes or "delayed" in actions:
        c.bounce_type = "soft"
    elif "failed" in actions or permanent:
        c.bounce_type = "hard"
    elif temporary:
        c.bounce_type = "soft"
    else:
        text = _body_text(parts)
        codes = [m.group(1) for m in _STATUS.finditer(text)] + \
                [m.group(1) for m in _SMTP_REPLY.finditer(text)]
        if "5" in codes:
            c.bounce_type = "hard"
        elif "4" in codes or re.search(r"delay|will (be )?retr|temporar|deferred|"
                                       r"not yet been delivered", text, re.IGNORECASE):
            c.bounce_type = "soft"
        else:
            c.bounce_type = "hard"
    if not c.original_message_id:
        own = c.message_id
        for match in _MSGID_LINE.finditer(_body_text(parts)):
            found = normalize(match.group(1).strip())
            if found and found != own:
                c.original_message_id = found
                break


def _body_text(parts: list[Message]) -> str:
    chunks, size = [], 0
    for part in parts:
        ctype = _ctype(part)
        broken_multipart = ctype.startswith("multipart/") and isinstance(part.get_payload(), str)
        if broken_multipart or ctype in ("text/plain", "text/html", "message/delivery-status",
                                         "text/rfc822-headers"):
            text = _text_of(part)
            if ctype == "text/html":
                text = _HTML_TAG.sub(" ", text)
            chunks.append(text)
            size += len(text)
            if size > MAX_TEXT:
                break
    return "\n".join(chunks)[:MAX_TEXT]


def classify_message(raw: bytes | Message) -> Classification:
    """Classify a full MIME message. Raises ``UnparseableMessage`` only for non-messages."""
    msg = _parse(raw)
    headers = _items(msg) if isinstance(raw, Message) else _salvaged(raw, msg)
    try:
        c, hints = _from_headers(_Headers(headers))
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception as exc:  # noqa: BLE001 - bad mail must not crash the worker
        c, hints = Classification(reasons=[f"header parse error: {type(exc).__name__}"]), {}
    try:
        _refine(c, hints, msg)
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception as exc:  # noqa: BLE001 - bad mail must not crash the worker
        c.reasons.append(f"body parse error: {type(exc).__name__}")
    return c


def _refine(c: Classification, hints: dict, msg: Message) -> None:
    parts = list(_parts(msg))
    types = {_ctype(p) for p in parts}
    if c.kind in ("other", "human_reply", "auto_reply"):
        if types & {"message/delivery-status", "message/global-delivery-status"}:
            c.kind = "bounce"
            c.reasons.append("message/delivery-status part")
        elif "message/disposition-notification" in types:
            c.kind = "read_receipt"
            c.reasons.append("message/disposition-notification part")
        elif "message/feedback-report" in types:
            c.kind = "complaint"
            c.reasons.append("message/feedback-report part")
        elif _flufl_says_bounce(msg, hints):  # vendor formats; checked only with bounce hints
            c.kind = "bounce"
            c.reasons.append("bounce in body")
    if c.kind == "other" and hints.get("deferred_reply"):
        c.kind = "human_reply"
    if c.kind in ("other", "human_reply", "auto_reply", "machine") and c.machine_family != "mailing_list":
        subject = _decoded(_clean(msg.get("subject")))
        calendar = None if FORWARD_SUBJECT.match(subject) else machine_mail.calendar_in_parts(
            (_ctype(p), _text_of(p)[:4000]) for p in _own_parts(msg)
            if _ctype(p) in ("text/calendar", "application/ics"))
        if calendar:
            c.kind, c.machine_family = "machine", "calendar"
            if machine_mail.PROVISIONAL in c.reasons:
                c.reasons.remove(machine_mail.PROVISIONAL)
            c.reasons.append(calendar)
    if needs_text(c):
        settle_with_text(c, auto_reply_text.first_text(msg), _decoded(_clean(msg.get("subject"))),
                         _message_date(msg))
    if c.kind == "bounce":
        _bounce_details(c, msg, parts)
    elif c.kind in ("read_receipt", "complaint"):
        for part in parts:
            ctype = _ctype(part)
            if ctype == "message/disposition-notification" and not c.original_message_id:
                match = re.search(r"original-message-id\s*:\s*(\S+)", _text_of_any(part), re.IGNORECASE)
                _set_original(c, normalize(match.group(1)) if match else None)
            elif ctype in ("message/rfc822", "text/rfc822-headers") and not c.original_message_id:
                _set_original(c, _embedded_id(part))
        if c.kind == "read_receipt" and not c.original_message_id and c.references:
            c.original_message_id = c.references[0]
    elif c.kind == "auto_reply" and not c.return_date:
        subject = _decoded(_clean(msg.get("subject")))
        c.return_date = find_return_date(f"{subject}\n{_body_text(parts)}", _message_date(msg))
        if c.return_date:
            c.reasons.append("return date in body")


def _text_of_any(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):
        return "\n".join(f"{k}: {v}" for p in payload if isinstance(p, Message)
                         for k, v in p.items())
    return _text_of(part)


def _flufl_failures(msg: Message) -> tuple[frozenset, frozenset]:
    """flufl.bounce's (temporary, permanent) failed addresses, never raising.

    Its detectors call ``.lower()`` on header values, which compat32 gives as ``Header``
    objects when they hold 8-bit bytes; one crashing detector aborts the whole scan, so such a
    message is scanned again as parsed with the modern policy (string header values).
    """
    from flufl.bounce import all_failures

    result: tuple[frozenset, frozenset] = (frozenset(), frozenset())
    try:
        result = all_failures(msg)
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001 - bad mail must not crash the worker
        try:
            modern = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
            result = all_failures(modern)
        except BaseTimeoutException:  # RQ's job timeout must end the job
            raise
        except Exception:  # noqa: BLE001, S110 - bad mail must not crash the worker
            pass
    return result


def _flufl_says_bounce(msg: Message, hints: dict) -> bool:
    """Vendor bounce formats without DSN parts: ask flufl.bounce, but only for messages that
    already look like a bounce (sender, null return path, subject), never for plain replies."""
    if not hints.get("suspect_bounce"):
        return False
    temporary, permanent = _flufl_failures(msg)
    if temporary or permanent:
        return True
    return bool(_BOUNCE_BODY.search(_body_text(list(_parts(msg)))))


def _message_date(msg: Message) -> dt.date:
    try:
        parsed = email.utils.parsedate_to_datetime(_clean(msg.get("date")))
        if parsed:
            return parsed.date()
    except BaseTimeoutException:  # RQ's job timeout must end the job
        raise
    except Exception:  # noqa: BLE001, S110 - bad mail must not crash the worker
        pass
    return dt.datetime.now(dt.UTC).date()
