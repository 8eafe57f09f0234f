"""How our EWS services read an answer: the whole body parsed in one piece.

exchangelib hands lxml ``response.iter_content()``, whose default chunk size is one byte: lxml
then pulls the body through a Python generator one byte per step, which costs more CPU than
everything else a request does (10 ms for a 14-folder GetFolder answer, 2.6 ms for a
Subscribe). Every service here except GetStreamingEvents has its body in memory already
(requests reads it whole), so ``WholeBody`` parses that. Requests, auth, throttling and error
responses stay exchangelib's.

exchangelib's parser recovers from broken XML, so an answer cut off halfway (a backend or proxy
dying mid-response, still HTTP 200) would parse as a shorter document: a GetItem missing its
In-Reply-To, a GetFolder missing folders, a SyncFolderItems page whose SyncState (it comes
first) arrived without all of its changes, taken as the truth. An answer must therefore end with
its closing Envelope tag (any prefix, whitespace or NULs after it), or it is a ``SOAPError``
naming its last bytes, and the caller retries.

GetStreamingEvents is the exception: its answer is one long chunked HTTP body of many envelopes.
exchangelib splits it one byte at a time (about 1 ms of listener CPU per notification) and its
splitter misses an Envelope tag followed by a newline or tab. ``envelopes`` splits whatever
arrives, chunk by chunk, at each complete Envelope end tag.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import requests
from exchangelib.errors import MalformedResponseError, SOAPError
from exchangelib.util import SOAPNS, ParseError, to_xml

_ENDS_WITH_ENVELOPE = re.compile(rb"</(?:[\w.-]+:)?Envelope\s*>[\s\x00]*\Z")
_ENVELOPE_START = re.compile(rb"<(?:[\w.-]+:)?Envelope[\s>/]")
_ENVELOPE_END = re.compile(rb"</(?:[\w.-]+:)?Envelope\s*>")
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024  # one notification envelope; beyond it the stream is broken

# a mixin's super() is the exchangelib service it is mixed into; exchangelib is untyped (Any)
Service: Any = object


class WholeBody(Service):
    """Mixin for a non-streaming exchangelib service: parse ``response.content`` at once."""

    def _get_soap_parts(self, response: requests.Response) -> tuple[Any, Any]:
        if self.streaming:  # exchangelib's own incremental path; the body is not in memory
            return super()._get_soap_parts(response=response)
        content = response.content
        if not _ENDS_WITH_ENVELOPE.search(content[-256:]):
            raise SOAPError(f"Bad SOAP response: cut off after {len(content)} bytes (no closing Envelope tag; "
                            f"it ends {content[-64:]!r})")
        try:
            root = to_xml(content)
        except ParseError as exc:
            raise SOAPError(f"Bad SOAP response: {exc}") from None
        header = root.find(f"{{{SOAPNS}}}Header")
        body = root.find(f"{{{SOAPNS}}}Body")
        if body is None:
            raise MalformedResponseError("No Body element in SOAP response")
        return header, body


def envelopes(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Each complete SOAP envelope in a stream of byte chunks, as soon as its end tag arrives.

    Bytes between envelopes (whitespace, an XML declaration) are dropped; a partial envelope at the
    end of the stream is never yielded (the connection broke: the stream's caller reconnects and
    catches up).
    """
    buffer = bytearray()
    scan_from = 0  # the end tag cannot be in what was scanned already (minus a tag's length)
    for chunk in chunks:
        if not chunk:
            continue
        buffer += chunk
        while True:
            start = _ENVELOPE_START.search(buffer)
            if start is None:
                del buffer[:max(0, len(buffer) - 64)]  # keep a tail in case a start tag is split
                scan_from = 0
                break
            if start.start():
                del buffer[:start.start()]
                scan_from = 0
            end = _ENVELOPE_END.search(buffer, max(scan_from, 1))
            if end is None:
                if len(buffer) > MAX_ENVELOPE_BYTES:
                    raise ValueError(f"a streamed envelope exceeds {MAX_ENVELOPE_BYTES} bytes")
                scan_from = max(0, len(buffer) - 64)
                break
            yield bytes(buffer[:end.end()])
            del buffer[:end.end()]
            scan_from = 0
