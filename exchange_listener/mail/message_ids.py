"""Message-IDs: one canonical form, tolerant parsing of In-Reply-To/References, and a generator.

Matching a reply to its send compares Message-IDs, so every id is stored and compared in one
form: ``<local@domain>`` with the domain lower-cased (the local part is case-sensitive).
Real headers are messy — commas (Exchange, iOS), missing angle brackets, folded lines, ids
jammed together, Gnus comments, quoted lists, truncated lists — so parsing never raises and
runs in time linear in the header's length.
"""
from __future__ import annotations

import re
import secrets

MAX_ID_LENGTH = 998  # RFC 5322 line limit: no real id is longer
DEFAULT_LIMIT = 10000

_WS = re.compile(r"\s+")
_BAD_CHARS = re.compile(r"[<>\x00-\x1f\x7f]")
# One token of an id list: a bracketed id (folding may put whitespace inside), an unclosed
# bracket (a truncated id: up to the next separator), a comment (one left open ends before the
# next "<", so it never hides the ids after it), or a bare word.
_TOKEN = re.compile(r"<[^<>]*>|<[^<>\s,]*|\([^()<>]*\)?|[^\s<>(),;\"]+")
_DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


def normalize(value: str | None) -> str | None:
    """One Message-ID in canonical ``<local@domain>`` form, or None when it is not an id.

    Surrounding whitespace and one pair of angle brackets are removed, whitespace inside (left
    by line folding) is dropped, and the domain is lower-cased. An id without ``@`` is accepted
    only when it was written in angle brackets (some senders use such ids); a bare word
    without ``@`` is not an id.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    if len(text) > MAX_ID_LENGTH + 2 or not text:
        return None
    bracketed = text.startswith("<")
    if bracketed:
        text = text[1:]
        text = text.removesuffix(">")
    elif text.endswith(">"):
        return None
    text = _WS.sub("", text)
    if not text or _BAD_CHARS.search(text) or len(text) > MAX_ID_LENGTH:
        return None
    local, at, domain = text.rpartition("@")
    if at:
        if not local or not domain:
            return None
        text = f"{local}@{domain.lower()}"
    elif not bracketed:
        return None
    return f"<{text}>"


def parse_id_list(value: str | None, limit: int = DEFAULT_LIMIT) -> list[str]:
    """Every Message-ID in an In-Reply-To or References value, in order, without duplicates.

    Accepts ids separated by whitespace, commas or nothing at all, folded over lines, wrapped
    in quotes, followed by comments, without brackets (then they need an ``@``), or cut off
    at the end. Stops after ``limit`` ids. Never raises.
    """
    if not value or not isinstance(value, str):
        return []
    text = value.replace('"', " ")
    seen: set[str] = set()
    ids: list[str] = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token[0] == "(":
            continue  # a comment, e.g. Gnus' "(Name's message of ...)"
        if token[0] != "<" and "@" not in token:
            continue  # a bare word is not an id
        msgid = normalize(token)
        if msgid is None or msgid in seen:
            continue
        seen.add(msgid)
        ids.append(msgid)
        if len(ids) >= limit:
            break
    return ids


def references_of(in_reply_to: str | None, references: str | None,
                  limit: int = DEFAULT_LIMIT) -> list[str]:
    """The ids a reply points at: In-Reply-To's first, then References', without duplicates."""
    ids = parse_id_list(in_reply_to, limit)
    seen = set(ids)
    for msgid in parse_id_list(references, limit):
        if len(ids) >= limit:
            break
        if msgid not in seen:
            seen.add(msgid)
            ids.append(msgid)
    return ids


def new_message_id(domain: str) -> str:
    """A fresh Message-ID for an outbound send: 160 random bits from ``secrets``, so unique
    and unguessable, in RFC 5322 ``<dot-atom@dot-atom>`` form (already canonical)."""
    host = (domain or "").strip().lower().rstrip(".")
    if not _DOMAIN.match(host) or len(host) > 253:
        raise ValueError(f"not a valid domain for a Message-ID: {domain!r}")
    return f"<{secrets.token_urlsafe(20)}@{host}>"
