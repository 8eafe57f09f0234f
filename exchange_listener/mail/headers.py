"""Header blocks as (name, value) pairs: what every source hands the workers.

Graph reads them from MIME when its JSON copy lacks In-Reply-To/References; IMAP always reads
them from ``BODY.PEEK[HEADER]``. One parser for both, so a header means the same whichever
source brought it.
"""
from __future__ import annotations

import email.policy
import email.utils
import re
from collections.abc import Sequence
from email.parser import BytesHeaderParser

_FOLD = re.compile(r"\r?\n[ \t]+")


def clean(text: str) -> str:
    """Unfolded, stripped, and valid UTF-8 (undecodable bytes become U+FFFD, never surrogates)."""
    text = _FOLD.sub(" ", text).replace("\r", "").replace("\n", " ").strip()
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (case-insensitive), or None."""
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


def mime_headers(raw: bytes) -> list[tuple[str, str]]:
    """The header block of a MIME source as (name, value) pairs, in order, encoded words decoded.
    Never raises: a header ``email`` cannot parse keeps its raw (unfolded) text; an unparseable
    source gives []."""
    try:
        msg = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
        items = msg.raw_items()
    except Exception:  # noqa: BLE001 - broken MIME must not crash the job
        return []
    out = []
    for name, value in items:
        try:
            text = str(email.policy.default.header_fetch_parse(name, value))
        except Exception:  # noqa: BLE001 - e.g. an address header email's parser chokes on
            text = str(value)
        out.append((clean(str(name)), clean(text)))
    return out


def addresses(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    """The e-mail addresses in every header ``name`` (To, Cc: may repeat), lower-cased, in order."""
    name = name.lower()
    values = [v for k, v in headers if k.lower() == name]
    return [a.strip().lower() for _n, a in email.utils.getaddresses(values) if a and "@" in a]
