"""A delivered RFC 5322 message read once, and its Graph JSON (the message resource, v1.0).

Parsing is forgiving (compat32, raw header values kept) because what Graph shows in
``internetMessageHeaders`` is the transport headers as they arrived, not a normalised copy.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import email
import email.errors
import email.policy
import email.utils
import html
import re
from email.header import decode_header, make_header
from email.message import Message as MimeMessage
from typing import Any
from urllib.parse import quote

from emulators.graph.errors import GraphError

# every property of microsoft.graph.message that $select may name, in the order Graph writes them
PROPERTIES = (
    "createdDateTime", "lastModifiedDateTime", "changeKey", "categories", "receivedDateTime", "sentDateTime",
    "hasAttachments", "internetMessageId", "internetMessageHeaders", "subject", "bodyPreview", "importance",
    "parentFolderId", "conversationId", "conversationIndex", "isDeliveryReceiptRequested", "isReadReceiptRequested",
    "isRead", "isDraft", "webLink", "inferenceClassification", "body", "uniqueBody", "sender", "from",
    "toRecipients", "ccRecipients", "bccRecipients", "replyTo", "flag",
)
# what Graph leaves out unless $select names it
SELECT_ONLY = frozenset({"internetMessageHeaders", "uniqueBody"})
_CANONICAL = {name.lower(): name for name in PROPERTIES + ("id",)}
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_SPACE = re.compile(r"\s+")
_TAGS = re.compile(r"<[^>]+>")
REPLY_HEADERS = frozenset({"in-reply-to", "references"})
_ATTRIBUTION = re.compile(r"^(on\s.{1,300}\swrote:|le\s.{1,300}\sa\s+écrit\s*:|am\s.{1,300}\sschrieb\s.{0,200}:)$",
                          re.IGNORECASE)
_SEPARATOR = re.compile(r"^(-{2,}\s*original message\s*-{2,}|_{10,})$", re.IGNORECASE)


def select_list(text: str | None) -> tuple[str, ...] | None:
    """``$select`` as canonical property names (None: none given); an unknown name is Graph's 400."""
    if text is None or not text.strip():
        return None
    names = []
    for part in text.split(","):
        name = part.strip()
        canonical = _CANONICAL.get(name.lower())
        if canonical is None:
            raise GraphError(400, "RequestBroker--ParseUri",
                             f"Could not find a property named '{name}' on type 'microsoft.graph.message'.")
        if canonical not in names:
            names.append(canonical)
    return tuple(names)


def _text(value: str | None) -> str:
    """A header value with RFC 2047 encoded words decoded (the raw text if they do not decode)."""
    if value is None:
        return ""
    try:
        return str(make_header(decode_header(_FOLD.sub("", value))))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        return _FOLD.sub("", value)


def _recipients(values: list[str]) -> list[dict[str, Any]]:
    out = []
    for name, address in email.utils.getaddresses([_FOLD.sub("", v) for v in values]):
        if address:
            out.append({"emailAddress": {"name": _text(name) or address, "address": address}})
    return out


def _decoded(part: MimeMessage) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


@dataclasses.dataclass
class Parsed:
    """What Graph shows of a message, computed once at delivery."""

    headers: list[dict[str, str]]  # internetMessageHeaders: name/value, unfolded, in arrival order
    subject: str
    internet_message_id: str | None
    sender: dict | None
    from_: dict | None
    to: list[dict]
    cc: list[dict]
    bcc: list[dict]
    reply_to: list[dict]
    sent: str | None  # the Date header as Graph's UTC text
    text: str
    html: str | None
    has_attachments: bool
    importance: str
    read_receipt: bool
    thread_root: str  # the first References id, else In-Reply-To, else the own Message-ID
    thread_index: str | None


def parse(raw: bytes) -> Parsed:
    mime = email.message_from_bytes(raw, policy=email.policy.compat32)
    headers = [{"name": name, "value": _FOLD.sub("", str(value))} for name, value in mime.raw_items()]

    def first(name: str) -> str | None:
        value = mime.get(name)
        return None if value is None else _FOLD.sub("", str(value)).strip()

    def one(name: str) -> dict | None:
        found = _recipients(mime.get_all(name) or [])
        return found[0] if found else None

    text, html_body, attachments = "", None, False
    for part in mime.walk():
        if part.is_multipart():
            continue
        disposition = (part.get("Content-Disposition") or "").lower()
        if disposition.startswith("attachment") or part.get_filename():
            attachments = True
            continue
        kind = part.get_content_type()
        if kind == "text/plain" and not text:
            text = _decoded(part)
        elif kind == "text/html" and html_body is None:
            html_body = _decoded(part)
    sent = None
    if first("Date"):
        try:
            when = email.utils.parsedate_to_datetime(first("Date"))
            if when.tzinfo is not None:
                sent = when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (TypeError, ValueError, IndexError):
            sent = None
    references = (first("References") or "").split()
    message_id = first("Message-ID")
    root = references[0] if references else (first("In-Reply-To") or message_id or "")
    priority = (first("Importance") or first("X-Priority") or "").lower()
    importance = ("high" if priority.startswith(("high", "1", "2")) else
                  "low" if priority.startswith(("low", "4", "5")) else "normal")
    from_ = one("From")
    return Parsed(
        headers=headers, subject=_text(mime.get("Subject")), internet_message_id=message_id,
        sender=one("Sender") or from_, from_=from_, to=_recipients(mime.get_all("To") or []),
        cc=_recipients(mime.get_all("Cc") or []), bcc=_recipients(mime.get_all("Bcc") or []),
        reply_to=_recipients(mime.get_all("Reply-To") or []), sent=sent, text=text, html=html_body,
        has_attachments=attachments, importance=importance,
        read_receipt=mime.get("Disposition-Notification-To") is not None, thread_root=root,
        thread_index=first("Thread-Index"))


def preview(parsed: Parsed) -> str:
    source = parsed.text or _TAGS.sub(" ", html.unescape(parsed.html or ""))
    return _SPACE.sub(" ", source).strip()[:255]


def _plain(parsed: Parsed) -> str:
    if parsed.text:
        return parsed.text
    source = re.sub(r"(?i)<br\s*/?>|</p>|</div>", "\n", parsed.html or "")
    return html.unescape(_TAGS.sub("", source)).strip()


def _starts_quote(lines: list[str], i: int) -> bool:
    """Line ``i`` opens the quoted part of a reply: an attribution ("On ... wrote:", possibly on
    two lines), an "Original Message" or underscore separator, or a From:/Sent: header block."""
    line = lines[i].strip()
    if _ATTRIBUTION.match(line) or _SEPARATOR.match(line):
        return True
    if line.lower().startswith("on ") and i + 1 < len(lines) and lines[i + 1].strip().lower().endswith("wrote:"):
        return True
    if line.lower().startswith("from:"):
        return any(n.strip().lower().startswith(("sent:", "date:", "to:", "subject:")) for n in lines[i + 1:i + 4])
    return False


def unique_text(parsed: Parsed) -> str:
    """What this message added to its thread: the text above the quoted part, without ``>`` lines."""
    lines = _plain(parsed).replace("\r\n", "\n").split("\n")
    kept = []
    for i, line in enumerate(lines):
        if _starts_quote(lines, i):
            break
        if not line.lstrip().startswith(">"):
            kept.append(line)
    return "\n".join(kept).strip()


def body(parsed: Parsed, as_text: bool, unique: bool = False) -> dict[str, str]:
    """The body (or uniqueBody) in the format asked for (Prefer: outlook.body-content-type), HTML by default."""
    if unique:
        text = unique_text(parsed)
        if as_text:
            return {"contentType": "text", "content": text}
        escaped = html.escape(text).replace("\n", "<br>\r\n")
        return {"contentType": "html", "content": f"<div>{escaped}</div>"}
    if as_text:
        return {"contentType": "text", "content": _plain(parsed)}
    if parsed.html is not None:
        return {"contentType": "html", "content": parsed.html}
    escaped = html.escape(parsed.text).replace("\r\n", "\n").replace("\n", "<br>\r\n")
    return {"contentType": "html", "content": (
        "<html><head>\r\n<meta http-equiv=\"Content-Type\" content=\"text/html; charset=utf-8\">"
        f"</head><body><div>{escaped}</div></body></html>")}


def web_link(message_id: str) -> str:
    return (f"https://outlook.office365.com/owa/?ItemID={quote(message_id, safe='')}"
            "&exvsurl=1&viewmodel=ReadMessageItem")


def conversation_index(parsed: Parsed, seed: bytes) -> str:
    if parsed.thread_index:
        return parsed.thread_index
    return base64.b64encode(b"\x01" + seed[:21]).decode()
