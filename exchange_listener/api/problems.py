"""Every error the HTTP API answers is an RFC 9457 problem (``application/problem+json``).

One shape for all of them (``type``, ``title``, ``status``, ``detail``, and ``field`` / ``index``
when one input is at fault) lets a platform handle errors in one place; the ``type`` URNs are
listed in docs/api.md. A problem never carries a stack trace, a token or a Redis password.
"""
from __future__ import annotations

import http
import json
from typing import Any

from aiohttp import web

CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:exchange-listener:problem:"


class Problem(Exception):
    """Raised by a handler (or the guard) to answer with a problem document."""

    def __init__(self, status: int, kind: str, detail: str, *, headers: dict[str, str] | None = None,
                 **members: Any):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail
        self.headers = headers or {}
        self.members = {k: v for k, v in members.items() if v is not None}

    def document(self) -> dict[str, Any]:
        """The problem as JSON data (also the data of an event stream's ``event: error``)."""
        return {"type": TYPE_PREFIX + self.kind, "title": http.HTTPStatus(self.status).phrase,
                "status": self.status, "detail": self.detail, **self.members}

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=json.dumps(self.document()).encode(), content_type=CONTENT_TYPE,
                            headers=self.headers)


def from_http_error(exc: web.HTTPException) -> Problem:
    """aiohttp's own refusals (no such route, wrong method, body too large) as problems."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        return Problem(405, "method-not-allowed", f"{exc.method} is not allowed here; allowed: {', '.join(allowed)}",
                       headers={"Allow": ", ".join(allowed)})
    if isinstance(exc, web.HTTPNotFound):
        return Problem(404, "not-found", "no such resource (the endpoints are listed in /v1/openapi.json)")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return Problem(413, "body-too-large", "the request body is larger than api_max_body_bytes allows")
    return Problem(exc.status, "http-error", exc.reason)
