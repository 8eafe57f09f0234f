"""Text of a mail body for reading its first lines: shared by the sources' fetch side (an HTML
body from the server) and the classifier (a MIME part)."""
from __future__ import annotations

import html as html_lib
import re

_HTML_DROP = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BREAK = re.compile(r"<(br|/p|/div|/tr|/li|/h\d|blockquote|/blockquote)\b[^>]{0,2000}>",
                         re.IGNORECASE)
_HTML_QUOTE = re.compile(r"<blockquote\b|<div[^>]{0,300}(gmail_quote|divRplyFwdMsg|OLK_SRC_BODY_SECTION|"
                         r"moz-cite-prefix|yahoo_quoted|appendonsend)", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]{0,2000}>")


def html_to_text(html: str) -> str:
    """Rough text of an HTML body: quoted history (blockquote, client quote markers) dropped,
    breaks kept as new lines. Good enough for reading the first lines; not a renderer."""
    quote = _HTML_QUOTE.search(html)
    if quote:
        html = html[:quote.start()]
    html = _HTML_BREAK.sub("\n", _HTML_DROP.sub(" ", html))
    return html_lib.unescape(_HTML_TAG.sub(" ", html)).replace("\u00a0", " ")
